"""A store written by schema version 1 is upgraded in place when it is opened."""

from __future__ import annotations

import json
import time

import pytest
import sqlalchemy as sa

from controller.errors import ConflictError
from controller.store import SqlBackend
from controller.store.engine import normalize_url
from controller.store.schema import SCHEMA_VERSION

# The version-1 tables that version 2 changed, as version 1 created them.
V1 = sa.MetaData()
_RowId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
v1_meta = sa.Table("meta", V1, sa.Column("key", sa.String(64), primary_key=True), sa.Column("value", sa.Text))
v1_queues = sa.Table(
    "queues", V1, sa.Column("name", sa.String(128), primary_key=True), sa.Column("created_at", sa.Float)
)
v1_tasks = sa.Table(
    "tasks",
    V1,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(256), nullable=False),
    sa.Column("project", sa.String(256), nullable=False),
    sa.Column("type", sa.String(32), nullable=False),
    sa.Column("parent", sa.String(64)),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("status_reason", sa.String(64), nullable=False),
    sa.Column("status_message", sa.Text, nullable=False),
    sa.Column("worker", sa.String(256)),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("log_lines", sa.Integer, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("queued_at", sa.Float),
    sa.Column("started_at", sa.Float),
    sa.Column("finished_at", sa.Float),
    sa.Column("lease_expires_at", sa.Float),
    sa.Column("body", sa.Text, nullable=False),
    sa.Index("ix_tasks_status", "status"),
)
v1_entries = sa.Table(
    "queue_entries",
    V1,
    sa.Column("seq", _RowId, primary_key=True, autoincrement=True),
    sa.Column("task_id", sa.String(64), nullable=False, unique=True),
    sa.Column("queue", sa.String(128), nullable=False),
    sa.Column("priority", sa.Integer, nullable=False),
    sa.Column("enqueued_at", sa.Float, nullable=False),
)
v1_history = sa.Table(
    "status_changes",
    V1,
    sa.Column("id", _RowId, primary_key=True, autoincrement=True),
    sa.Column("task_id", sa.String(64), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("reason", sa.String(64), nullable=False),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("time", sa.Float, nullable=False),
)


def _task_row(task_id: str, status: str, execution: dict, now: float) -> dict:
    body = {"script": {"entry_point": "train.py"}, "execution": execution, "runtime": {}}
    return dict(
        id=task_id, name=task_id, project="p", type="training", status=status, status_reason=status,
        status_message="", attempt=0, log_lines=0, created_at=now, updated_at=now,
        queued_at=now if status == "queued" else None, body=json.dumps(body),
    )


def _write_v1_store(url: str) -> None:
    """A version-1 store: `waiting` and `urgent` queued on 'gpu', `draft` created."""
    engine = sa.create_engine(normalize_url(url))
    now = time.time()
    with engine.begin() as conn:
        V1.create_all(conn)
        conn.execute(v1_meta.insert().values(key="schema_version", value="1"))
        for name in ("default", "services", "gpu"):
            conn.execute(v1_queues.insert().values(name=name, created_at=now))
        conn.execute(v1_tasks.insert(), [
            _task_row("draft", "created", {"queue": "services", "priority": 3}, now),
            _task_row("waiting", "queued", {"queue": "gpu", "priority": 0}, now),
            _task_row("urgent", "queued", {"queue": "gpu", "priority": 5}, now + 1),
        ])
        conn.execute(v1_entries.insert(), [
            dict(task_id="waiting", queue="gpu", priority=0, enqueued_at=now),
            dict(task_id="urgent", queue="gpu", priority=5, enqueued_at=now + 1),
        ])
        conn.execute(v1_history.insert(), [
            dict(task_id=t, status=s, reason=s, message="", time=now)
            for t, statuses in (("draft", ["created"]), ("waiting", ["created", "queued"]),
                                ("urgent", ["created", "queued"]))
            for s in statuses
        ])
    engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue(f"{request.param}_url")


def test_version_1_store_is_migrated_and_keeps_its_queues(store_url: str) -> None:
    _write_v1_store(store_url)
    store = SqlBackend(store_url)
    try:
        engine = sa.create_engine(normalize_url(store_url))
        with engine.connect() as conn:
            version = conn.execute(sa.text("SELECT value FROM meta WHERE key = 'schema_version'")).scalar()
            assert not sa.inspect(conn).has_table("queue_entries")
            assert not sa.inspect(conn).has_table("status_changes")
        engine.dispose()
        assert version == str(SCHEMA_VERSION)

        draft = store.get_task("draft")
        assert (draft.execution.queue, draft.execution.priority) == ("services", 3)
        assert draft.script.entry_point == "train.py"
        assert [h.status.value for h in store.get_task("waiting").status_history] == ["created", "queued"]

        assert store.get_queue("gpu").length == 2
        assert [t.id for t in store.queue_tasks("gpu")] == ["urgent", "waiting"]
        assert store.claim(["gpu"], "w1").id == "urgent"  # priority kept
        assert store.claim(["gpu"], "w1").id == "waiting"
        assert store.claim(["gpu"], "w1") is None

        # The migrated store works like a new one: history appended, enqueue on its own queue.
        queued = store.enqueue("draft")
        assert (queued.status.value, queued.execution.queue) == ("queued", "services")
        assert [h.status.value for h in store.get_task("draft").status_history] == ["created", "queued"]
    finally:
        store.close()
    SqlBackend(store_url).close()  # opening it again is a no-op


def test_a_store_newer_than_this_code_is_refused(store_url: str) -> None:
    SqlBackend(store_url).close()
    engine = sa.create_engine(normalize_url(store_url))
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE meta SET value = :v WHERE key = 'schema_version'"), {"v": str(SCHEMA_VERSION + 1)})
    engine.dispose()
    with pytest.raises(ConflictError, match=f"version {SCHEMA_VERSION + 1}, newer than"):
        SqlBackend(store_url)
