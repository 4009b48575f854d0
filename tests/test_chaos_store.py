"""Fault injection on the store side, with real processes: a restarted server's first
lease sweep, a SQLite write lock held past the busy timeout while an agent runs a step,
`pg_terminate_backend` of every PostgreSQL connection mid-pipeline, and kill -9 of an
agent restarted with the same id on PostgreSQL.

Each case asserts what an operator sees: every task ends in a terminal status with a
true reason within lease + 5 s of the fault's end, no step process is left, and no log
line is lost.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.backend import Backend
from controller.client import HttpBackend
from controller.connect import backend_from_url
from controller.models import DEFAULT_LEASE_S, TaskStatus
from tests.helpers_server import free_port
from tests.test_agent_e2e import assert_all_gone, code_task, read_pids, wait_for, wait_for_line
from tests.test_chaos_agent import Processes, kill9, wait_until

pytestmark = pytest.mark.chaos

#: How long the SQLite case holds the write lock: six busy timeouts of its URL (1 s).
LOCK_HELD_S = 6.0


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


#: A step that records its pid, says "ready", waits for the test's cue that the store is
#: locked, tries a write through the SDK (the error's class is printed), then prints
#: numbered lines until it is stopped. Every line also goes to a side file, so the test
#: knows what the step printed.
LOCKED_STORE_STEP = """
import os, time
from pathlib import Path
from controller import Task
task = Task.init()
side = Path(os.environ["SIDE_FILE"])
Path(os.environ["PIDS_FILE"]).write_text(f"{os.getpid()}\\n")
def say(text):
    print(text, flush=True)
    with side.open("a") as f:
        f.write(text + "\\n")
say("ready")
while not os.path.exists(os.environ["LOCKED_FILE"]):
    time.sleep(0.05)
try:
    task.set_parameter("Args/written_during_the_lock", 1)
    say("sdk: no error")
except Exception as exc:
    say(f"sdk error: {type(exc).__module__}.{type(exc).__name__}")
i = 0
while True:
    say(f"line {i}")
    i += 1
    time.sleep(0.1)
"""

#: A step that prints numbered lines (also to a side file), records its pid, then sleeps.
SLEEPING_STEP = """
import os, time
from pathlib import Path
side = Path(os.environ["SIDE_FILE"])
for i in range(20):
    print(f"line {i}", flush=True)
    with side.open("a") as f:
        f.write(f"line {i}\\n")
Path(os.environ["PIDS_FILE"]).write_text(f"{os.getpid()}\\n")
time.sleep(300)
"""


def _last_seen(store: Backend, worker_id: str) -> float:
    return next(w.last_seen for w in store.list_workers() if w.id == worker_id)


def assert_printed_lines_logged_once(store: Backend, task_id: str, side_file: Path) -> int:
    """Every line the step printed (its side file) is in the task log exactly once;
    returns how many."""
    printed = side_file.read_text().splitlines()
    logged = [line.line for line in store.get_log(task_id)]
    lost = [text for text in printed if text not in logged]
    assert not lost, f"{len(lost)} log line(s) lost: {lost[:10]}"
    doubled = sorted({text for text in printed if logged.count(text) > 1})
    assert not doubled, f"log lines delivered twice: {doubled[:10]}"
    return len(printed)


def test_a_sqlite_write_lock_past_the_busy_timeout_while_a_step_runs(
    tmp_path: Path, processes: Processes
) -> None:
    """Another process holds the write lock 6 times the busy timeout (1 s here, from the
    URL) while the agent runs a step: the heartbeat thread logs and retries, the task is
    not failed as lost, the step's SDK sees BackendUnavailableError (not sqlite3's
    OperationalError), an abort issued after the lock is released is delivered, and no
    log line is lost."""
    db_path = tmp_path / "conveyor.db"
    url = f"sqlite:///{db_path}?timeout=1"
    store = backend_from_url(url)
    side_file, pids_file, locked_file = tmp_path / "side", tmp_path / "pids", tmp_path / "locked"
    try:
        task = code_task(store, LOCKED_STORE_STEP, hyperparams={"Environment": {
            "SIDE_FILE": str(side_file), "PIDS_FILE": str(pids_file), "LOCKED_FILE": str(locked_file)}})
        agent = processes.agent(url, "chaos-locked")
        wait_for_line(store, task.id, "ready")
        [step_pid] = read_pids(pids_file, 1)
        holder = sqlite3.connect(db_path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            locked_file.touch()
            time.sleep(LOCK_HELD_S)
        finally:
            holder.rollback()
            holder.close()
        released_at = time.time()
        assert agent.poll() is None, processes.output()
        # heartbeats resume (the thread survived) and the task is still running
        wait_until(lambda: _last_seen(store, "chaos-locked") > released_at, DEFAULT_LEASE_S,
                   "a heartbeat after the lock was released")
        assert store.get_task(task.id).status == TaskStatus.in_progress
        store.abort_task(task.id, message="abort after the lock")
        aborted_at = time.monotonic()
        stopped = wait_for(store, task.id, "stopped", "failed", "completed", timeout=DEFAULT_LEASE_S + 5)
        abort_s = time.monotonic() - aborted_at
        assert stopped.status == TaskStatus.stopped and stopped.status_reason == "aborted", stopped.status_message
        assert_all_gone([step_pid])
        lines = assert_printed_lines_logged_once(store, task.id, side_file)
        logged = [line.line for line in store.get_log(task.id)]
        assert "sdk error: controller.errors.BackendUnavailableError" in logged, [
            text for text in logged if "sdk" in text]
        assert not any("OperationalError" in text for text in logged)
        output = processes.output()
        assert "heartbeat failed: BackendUnavailableError" in output, output
        assert "sqlite3.OperationalError" not in output
        print(f"abort delivered after {abort_s:.1f} s; {lines} lines, 0 lost")
    finally:
        store.close()


def test_kill_9_of_an_agent_restarted_with_the_same_id_on_postgresql(
    postgres_url: str, tmp_path: Path, processes: Processes
) -> None:
    """The new run of the worker ends the dead run's task at once when it registers
    (failed, worker_restarted); the watchdog left no step process; no line lost."""
    store = backend_from_url(postgres_url)
    side_file, pids_file = tmp_path / "side", tmp_path / "pids"
    try:
        task = code_task(store, SLEEPING_STEP, hyperparams={"Environment": {
            "SIDE_FILE": str(side_file), "PIDS_FILE": str(pids_file)}})
        victim = processes.agent(postgres_url, "chaos-pg-restart")
        [step_pid] = read_pids(pids_file, 1)
        wait_for_line(store, task.id, "line 19")
        kill9(victim)
        assert_all_gone([step_pid])
        processes.agent(postgres_url, "chaos-pg-restart")
        restarted_at = time.monotonic()
        failed = wait_for(store, task.id, "failed", "stopped", "completed", timeout=DEFAULT_LEASE_S + 5)
        ended_s = time.monotonic() - restarted_at
        assert failed.status == TaskStatus.failed and failed.status_reason == "worker_restarted", failed.status_message
        assert "chaos-pg-restart" in failed.status_message
        lines = assert_printed_lines_logged_once(store, task.id, side_file)
        assert lines == 20
        print(f"dead run's task ended {ended_s:.1f} s after the restart")
    finally:
        store.close()
