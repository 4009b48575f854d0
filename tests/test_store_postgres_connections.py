"""Connections to PostgreSQL that the server ended are replaced, not reused.

A database restart, an administrator's `pg_terminate_backend` or an idle timeout ends
the pooled connections of the hot one-statement calls (enqueue, claim, status reports).
The next call must take a fresh connection instead of failing, both in a direct client
and in the API server (which runs those calls on asyncio connections of its own).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import psycopg
import pytest

from controller.backend import Backend
from controller.connect import backend_from_url
from tests.conftest import POSTGRES_URL
from tests.helpers_server import start_server, stop_server

pytestmark = pytest.mark.postgres


def _connections(application_name: str) -> int:
    with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
        return admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (application_name,)
        ).fetchone()[0]


def _terminate(application_name: str) -> int:
    """End every connection of `application_name`; returns how many there were."""
    with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
        rows = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            (application_name,),
        ).fetchall()
    deadline = time.monotonic() + 5
    while _connections(application_name) and time.monotonic() < deadline:
        time.sleep(0.05)
    return len(rows)


def _hot_calls_after_a_cut(backend: Backend, application_name: str) -> None:
    first, second = (backend.create_task({"name": n}) for n in ("first", "second"))
    backend.enqueue(first.id, "default")
    claimed = backend.claim(["default"], "w1")
    assert claimed is not None and claimed.id == first.id

    assert _terminate(application_name) >= 1

    # Each of these is one statement on a pooled connection that the server ended.
    assert backend.enqueue(second.id, "default").status == "queued"
    assert backend.set_status(first.id, "completed", worker_id="w1").status == "completed"
    assert backend.get_task(second.id).status == "queued"


def test_a_direct_client_replaces_connections_the_server_ended(postgres_url: str) -> None:
    name = f"conveyor-test-{uuid.uuid4().hex[:8]}"
    backend = backend_from_url(f"{postgres_url}&application_name={name}")
    try:
        _hot_calls_after_a_cut(backend, name)
    finally:
        backend.close()


def test_the_api_server_replaces_connections_the_server_ended(postgres_url: str) -> None:
    name = f"conveyor-test-{uuid.uuid4().hex[:8]}"
    proc, url = start_server(f"{postgres_url}&application_name={name}")
    backend = backend_from_url(url)
    try:
        _hot_calls_after_a_cut(backend, name)
    finally:
        backend.close()
        stop_server(proc)
    deadline = time.monotonic() + 5
    while _connections(name) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _connections(name) == 0, "the stopped server left database connections open"


def _wait_until(condition: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_a_process_hears_other_processes_enqueues_once_and_not_its_own_echo(postgres_url: str) -> None:
    from controller.store import SqlBackend

    here, elsewhere = SqlBackend(postgres_url), SqlBackend(postgres_url)
    heard: list[str] = []
    try:
        here.add_enqueue_listener(heard.append)  # starts LISTENing
        probe = here.create_task({"name": "probe"})
        # Until the LISTEN connection is up, enqueues by others are not heard.
        deadline = time.monotonic() + 10
        while not heard and time.monotonic() < deadline:
            other = elsewhere.create_task({"name": "probe-elsewhere"})
            elsewhere.enqueue(other.id, "default")
            _wait_until(lambda: bool(heard), timeout_s=0.5)
        assert heard and set(heard) == {"default"}, heard
        time.sleep(0.3)
        heard.clear()

        here.enqueue(probe.id, "services")
        assert heard == ["services"]  # fired at once, by the enqueue itself
        time.sleep(0.5)  # the NOTIFY of our own enqueue has arrived by now
        assert heard == ["services"], "our own enqueue woke this process twice"

        task = elsewhere.create_task({"name": "from-elsewhere"})
        elsewhere.enqueue(task.id, "default")
        assert _wait_until(lambda: heard == ["services", "default"]), heard
    finally:
        here.close()
        elsewhere.close()
