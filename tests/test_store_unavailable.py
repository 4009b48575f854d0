"""Database outages reach the caller as BackendUnavailableError, from every store method:
a SQLite write lock held past the busy timeout, a PostgreSQL server that refuses
connections."""

from __future__ import annotations

import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from controller.backend import Backend
from controller.errors import BackendUnavailableError
from controller.store import SqlBackend
from tests.conftest import POSTGRES_URL

#: Every write a client makes, as (name, call) with a running task `t` of worker "w1".
WRITES: list[tuple[str, Callable[[Backend, str], object]]] = [
    ("create_task", lambda b, t: b.create_task({"name": "x"})),
    ("set_status", lambda b, t: b.set_status(t, "completed", worker_id="w1")),
    ("heartbeat", lambda b, t: b.heartbeat("w1", current_tasks=[t])),
    ("append_log", lambda b, t: b.append_log(t, ["line"])),
    ("report_scalars", lambda b, t: b.report_scalars(t, [{"title": "a", "series": "b", "value": 1}])),
    ("register_worker", lambda b, t: b.register_worker("w2")),
    ("abort_task", lambda b, t: b.abort_task(t)),
    ("create_queue", lambda b, t: b.create_queue("q2")),
    ("expire_leases", lambda b, t: b.expire_leases()),
]


def _with_running_task(store: SqlBackend) -> str:
    store.register_worker("w1")
    task = store.create_task({"name": "t"})
    store.enqueue(task.id)
    assert store.claim(["default"], "w1") is not None
    return task.id


@pytest.mark.parametrize("name", [name for name, _ in WRITES])
def test_a_sqlite_lock_held_past_the_busy_timeout_is_backend_unavailable(tmp_path: Path, name: str) -> None:
    path = tmp_path / "conveyor.db"
    store = SqlBackend(f"sqlite:///{path}?timeout=0.2")
    try:
        task_id = _with_running_task(store)
        if name == "expire_leases":  # a lease to expire, so that it has to write
            short = store.create_task({"name": "short"})
            store.enqueue(short.id)
            assert store.claim(["default"], "w1", lease_s=0.01) is not None
            time.sleep(0.05)
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        try:
            call = dict(WRITES)[name]
            with pytest.raises(BackendUnavailableError, match="locked"):
                call(store, task_id)
        finally:
            holder.rollback()
            holder.close()
        assert store.get_task(task_id).status.value in ("in_progress", "stopping", "completed")
    finally:
        store.close()


@pytest.fixture
def doomed_database_url() -> Iterator[tuple[str, str]]:
    """A PostgreSQL database of its own (so that it can be shut to connections)."""
    try:
        admin = psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=3)
    except Exception as exc:  # noqa: BLE001
        from tests.conftest import _need

        _need(f"PostgreSQL not reachable at {POSTGRES_URL}: {exc}")
    name = f"conveyor_down_{uuid.uuid4().hex[:8]}"
    admin.execute(f"CREATE DATABASE {name}")
    base = POSTGRES_URL.split("?")[0].rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}?connect_timeout=2", name
    finally:
        admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
        admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
        admin.close()


@pytest.mark.postgres
def test_a_postgres_server_refusing_connections_is_backend_unavailable(doomed_database_url: tuple[str, str]) -> None:
    url, name = doomed_database_url
    store = SqlBackend(url)
    try:
        task_id = _with_running_task(store)
        with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
            admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        for call_name, call in WRITES:
            with pytest.raises(BackendUnavailableError):
                call(store, task_id)
                pytest.fail(f"{call_name} did not fail")
        with pytest.raises(BackendUnavailableError):
            store.get_task(task_id)
        with pytest.raises(BackendUnavailableError):
            store.claim(["default"], "w1")
    finally:
        store.close()
