"""One notifier: every status change wakes waiters, in this process and (PostgreSQL,
through the NOTIFY of every status change) in others."""

from __future__ import annotations

import json
import threading
import time

import psycopg
import pytest
import sqlalchemy as sa

from controller.store import SqlBackend
from controller.store.engine import normalize_url
from controller.store.schema import SCHEMA_VERSION


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue(f"{request.param}_url")


def _later(delay_s: float, action) -> threading.Timer:  # noqa: ANN001
    timer = threading.Timer(delay_s, action)
    timer.start()
    return timer


def test_a_status_wait_wakes_on_a_finish_reported_by_another_client(store_url: str) -> None:
    here, elsewhere = SqlBackend(store_url), SqlBackend(store_url)
    try:
        task = here.create_task({"name": "t"})
        here.enqueue(task.id)
        assert here.claim(["default"], "w1") is not None
        here.wait_for_status_change({task.id: "created"}, wait_s=0)  # warm up (LISTEN on PG)
        time.sleep(0.3)
        timer = _later(0.2, lambda: elsewhere.set_status(task.id, "completed", worker_id="w1"))
        started = time.monotonic()
        changed = here.wait_for_status_change({task.id: "in_progress"}, wait_s=10)
        waited_s = time.monotonic() - started
        timer.join()
        assert [t.status.value for t in changed] == ["completed"]
        assert waited_s < 0.2 + 0.3, f"woken {waited_s - 0.2:.3f} s after the change"
    finally:
        here.close()
        elsewhere.close()


def test_a_claim_in_this_process_wakes_at_once_on_an_enqueue_here(store_url: str) -> None:
    store = SqlBackend(store_url)
    try:
        task = store.create_task({"name": "t"})
        timer = _later(0.2, lambda: store.enqueue(task.id))
        started = time.monotonic()
        claimed = store.claim(["default"], "w1", wait_s=10)
        waited_s = time.monotonic() - started
        timer.join()
        assert claimed is not None and claimed.id == task.id
        assert waited_s < 0.2 + 0.1
    finally:
        store.close()


@pytest.mark.postgres
def test_a_version_2_store_gets_the_trigger_of_every_status_change(postgres_url: str) -> None:
    SqlBackend(postgres_url).close()
    engine = sa.create_engine(normalize_url(postgres_url))
    with engine.begin() as conn:  # back to what version 2 had: a NOTIFY for enqueues only
        conn.exec_driver_sql("DROP TRIGGER tasks_status_changed ON tasks")
        conn.exec_driver_sql(
            "CREATE FUNCTION conveyor_task_enqueued() RETURNS trigger LANGUAGE plpgsql AS $$ "
            "BEGIN PERFORM pg_notify('conveyor_enqueue', NEW.queue); RETURN NULL; END $$"
        )
        conn.exec_driver_sql(
            "CREATE TRIGGER tasks_enqueued AFTER UPDATE OF status ON tasks FOR EACH ROW "
            "WHEN (NEW.status = 'queued') EXECUTE FUNCTION conveyor_task_enqueued()"
        )
        conn.exec_driver_sql("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    SqlBackend(postgres_url).close()
    with engine.connect() as conn:
        triggers = {r[0] for r in conn.exec_driver_sql(
            "SELECT tgname FROM pg_trigger WHERE tgrelid = 'tasks'::regclass AND NOT tgisinternal")}
        version = conn.exec_driver_sql("SELECT value FROM meta WHERE key = 'schema_version'").scalar()
    engine.dispose()
    assert triggers == {"tasks_status_changed"} and version == str(SCHEMA_VERSION)

    store = SqlBackend(postgres_url)
    try:
        task = store.create_task({"name": "t"})
        with psycopg.connect(postgres_url, autocommit=True) as listener:
            listener.execute("LISTEN conveyor_task_status")
            store.set_status(task.id, "failed", message="gave up")
            notes = [
                json.loads(n.payload) for n in listener.notifies(timeout=2.0)
                if task.id in n.payload  # other stores of the database notify on it too
            ]
        assert [(n["id"], n["status"]) for n in notes] == [(task.id, "failed")]
    finally:
        store.close()


def test_a_status_wait_on_a_task_deleted_meanwhile_says_it_is_gone(store_url: str) -> None:
    from controller.errors import NotFoundError

    store = SqlBackend(store_url)
    try:
        task = store.create_task({"name": "t"})
        timer = _later(0.2, lambda: store.delete_task(task.id))
        started = time.monotonic()
        with pytest.raises(NotFoundError, match=task.id):
            store.wait_for_status_change({task.id: "created"}, wait_s=10)
        timer.join()
        assert time.monotonic() - started < 0.2 + 0.3
    finally:
        store.close()


@pytest.mark.postgres
def test_stores_in_other_schemas_of_the_database_are_not_heard(postgres_url: str) -> None:
    import uuid

    from tests.conftest import POSTGRES_URL

    other_schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {other_schema}")
    other_url = postgres_url.rsplit("search_path%3D", 1)[0] + f"search_path%3D{other_schema}"
    here, neighbour = SqlBackend(postgres_url), SqlBackend(other_url)
    heard: list[str] = []
    try:
        here.add_enqueue_listener(heard.append)
        elsewhere = SqlBackend(postgres_url)  # same store, another client: heard
        try:
            deadline = time.monotonic() + 10
            while not heard and time.monotonic() < deadline:
                probe = elsewhere.create_task({"name": "probe"})
                elsewhere.enqueue(probe.id, "services")
                time.sleep(0.2)
        finally:
            elsewhere.close()
        assert heard and set(heard) == {"services"}
        heard.clear()
        for _ in range(3):
            neighbour.enqueue(neighbour.create_task({"name": "n"}).id, "default")
        time.sleep(0.5)
        assert heard == []
    finally:
        here.close()
        neighbour.close()
        with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
            admin.execute(f"DROP SCHEMA {other_schema} CASCADE")


def test_a_claim_on_sqlite_wakes_on_an_enqueue_by_another_process(sqlite_url: str) -> None:
    import subprocess
    import sys
    import textwrap

    store = SqlBackend(sqlite_url)
    try:
        task = store.create_task({"name": "t"})
        code = textwrap.dedent(f"""
            import time
            from controller.store import SqlBackend
            time.sleep(0.3)
            SqlBackend({sqlite_url!r}).enqueue({task.id!r})
        """)
        other = subprocess.Popen([sys.executable, "-c", code])
        try:
            claimed = store.claim(["default"], "w1", wait_s=30)
        finally:
            other.wait(60)
        assert claimed is not None and claimed.id == task.id
    finally:
        store.close()


def test_an_idle_waiter_on_sqlite_does_not_query_the_database_on_a_timer(sqlite_url: str) -> None:
    """Waiting costs the database nothing while nothing changes: the waiters are woken
    by the data_version thread, whose reads do not go through SQLAlchemy statements."""
    store = SqlBackend(sqlite_url)
    statements: list[str] = []

    def count(_conn, _cursor, statement, *_args) -> None:  # noqa: ANN001
        statements.append(statement)

    try:
        task = store.create_task({"name": "t"})
        sa.event.listen(sa.engine.Engine, "before_cursor_execute", count)
        try:
            assert store.wait_for_status_change({task.id: "created"}, wait_s=0.8) == []
            assert store.claim(["default"], "w1", wait_s=0.8) is None
        finally:
            sa.event.remove(sa.engine.Engine, "before_cursor_execute", count)
        # each: the first check, and one re-check when the data_version thread starts
        # reading; a 10 ms poll would have made some 160
        assert len(statements) <= 8, statements
    finally:
        store.close()
