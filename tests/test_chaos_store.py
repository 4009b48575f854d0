"""Fault injection on the store side, with real processes: a restarted server's first
lease sweep, a SQLite write lock held past the busy timeout while an agent runs a step,
`pg_terminate_backend` of every PostgreSQL connection mid-pipeline, and kill -9 of an
agent restarted with the same id on PostgreSQL.

Each case asserts what an operator sees: every task ends in a terminal status with a
true reason within lease + 5 s of the fault's end, no step process is left, and no log
line is lost.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.backend import Backend
from controller.client import HttpBackend
from controller.connect import backend_from_url
from controller.models import DEFAULT_LEASE_S, TaskStatus
from tests.helpers_server import free_port
from tests.test_agent_e2e import wait_for
from tests.test_chaos_agent import Processes

pytestmark = pytest.mark.chaos


@pytest.fixture(scope="module")
def agent_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One CONVEYOR_HOME (venv and git caches) for the agents of this module."""
    return tmp_path_factory.mktemp("chaos-store-home")


@pytest.fixture
def processes(agent_home: Path, tmp_path: Path) -> Iterator[Processes]:
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    started = Processes(agent_home, log_dir)
    yield started
    started.stop_all()


def _claimed(store: Backend, worker_id: str, lease_s: float) -> str:
    store.register_worker(worker_id)
    task = store.create_task({"name": f"held by {worker_id}"})
    store.enqueue(task.id)
    claimed = store.claim(["default"], worker_id, lease_s=lease_s)
    assert claimed is not None and claimed.id == task.id
    return task.id


def test_a_restarted_server_sweeps_leases_only_one_lease_after_its_start(
    sqlite_url: str, processes: Processes
) -> None:
    """Both leases lapsed while the server was down. The agent that is alive reconnects
    and heartbeats within the first lease after the restart: its task keeps running;
    the task of the agent that never comes back fails at the first sweep."""
    store = backend_from_url(sqlite_url)
    try:
        alive_task = _claimed(store, "alive", lease_s=0.5)
        lost_task = _claimed(store, "gone", lease_s=0.5)
        time.sleep(1.0)  # an outage longer than both leases
        port = free_port()
        processes.server(sqlite_url, port)
        healthy_at = time.monotonic()
        api = HttpBackend(f"http://127.0.0.1:{port}")
        try:
            time.sleep(2.5)  # the live agent takes a while to reconnect
            while store.get_task(lost_task).status == TaskStatus.in_progress:
                api.heartbeat("alive", current_tasks=[alive_task])
                assert time.monotonic() - healthy_at < DEFAULT_LEASE_S + 5, "no sweep"
                time.sleep(0.5)
            swept_after_s = time.monotonic() - healthy_at
        finally:
            api.close()
        lost = store.get_task(lost_task)
        assert lost.status == TaskStatus.failed and lost.status_reason == "lease_expired"
        assert "worker gone was lost" in lost.status_message
        # The server became healthy a moment after it started (its clock starts first).
        assert DEFAULT_LEASE_S - 2 <= swept_after_s <= DEFAULT_LEASE_S + 3, swept_after_s
        assert store.get_task(alive_task).status == TaskStatus.in_progress
    finally:
        store.close()
