"""Tables of the task store (SQLAlchemy Core), one definition for SQLite and PostgreSQL.

Columns that are filtered, ordered or changed by the hot paths (status, queue, priority,
leases, log line counter) are real columns; the rest of the task record (script,
packages, container, hyperparams, configuration, execution, runtime, artifacts, models)
is one JSON document in `tasks.body`, read and written whole.

Built so that each hot state change is ONE statement touching few pages:

- a task is in a queue exactly while its status is `queued`: the queue, priority and
  position (`queue_seq`) are columns of `tasks`, and the partial index `ix_tasks_queued`
  holds only queued tasks, in claim order. Enqueue and claim are one UPDATE each;
- the partial index `ix_tasks_active` holds only tasks a worker owns (leases, heartbeats);
  there is no index over every status, so finishing a task does not move index entries;
- the status history is a column of `tasks` (`history`: one JSON line per change, each
  change appends its line in the same UPDATE), so a status change writes no other table;
  on PostgreSQL a trigger sends a NOTIFY for every status change (task id, status,
  queue), which wakes claimers and status waiters in other processes (`notify`).

The schema version is recorded in `meta`; `SCHEMA_VERSION` and `MIGRATIONS` upgrade an
older database in place.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import sqlalchemy as sa

from controller.store.records import dumps

#: Version of the schema this code writes. Bump it and add a migration on change.
SCHEMA_VERSION = 4

#: PostgreSQL channel carrying every status change: {"schema", "id", "status", "queue"} as
#: JSON (channels are per database: the schema tells stores in one database apart).
NOTIFY_CHANNEL = "conveyor_task_status"
QUEUED = "queued"
#: Statuses in which a worker owns a task (it holds a lease).
ACTIVE_STATUSES = ("in_progress", "stopping")

metadata = sa.MetaData()

# An integer primary key that is SQLite's rowid (fast) and a BIGSERIAL on PostgreSQL.
_RowId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

meta = sa.Table(
    "meta",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

tasks = sa.Table(
    "tasks",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(256), nullable=False),
    sa.Column("project", sa.String(256), nullable=False, default=""),
    sa.Column("type", sa.String(32), nullable=False),
    sa.Column("parent", sa.String(64)),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("status_reason", sa.String(64), nullable=False, default=""),
    sa.Column("status_message", sa.Text, nullable=False, default=""),
    sa.Column("worker", sa.String(256)),
    sa.Column("attempt", sa.Integer, nullable=False, default=0),
    sa.Column("log_lines", sa.Integer, nullable=False, default=0),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("queued_at", sa.Float),
    sa.Column("started_at", sa.Float),
    sa.Column("finished_at", sa.Float),
    sa.Column("lease_expires_at", sa.Float),
    # Where the task runs (execution.queue / execution.priority of the record) and, while
    # queued, its place in the queue: claims take the highest priority, then the lowest seq.
    sa.Column("queue", sa.String(128)),
    sa.Column("priority", sa.Integer, nullable=False, default=0),
    sa.Column("queue_seq", sa.BigInteger),
    sa.Column("body", sa.Text, nullable=False),
    # Status changes, oldest first: one JSON object per line (see `history_line`).
    sa.Column("history", sa.Text, nullable=False, server_default=""),
    sa.Index("ix_tasks_project_name", "project", "name"),
    sa.Index("ix_tasks_parent", "parent"),
    sa.Index("ix_tasks_created_at", "created_at"),
)


def _status_in(*statuses: str) -> sa.ColumnElement[bool]:
    # Literal values, so the partial index predicate is plain SQL both databases accept.
    literals = [sa.literal_column(f"'{s}'") for s in statuses]
    return tasks.c.status == literals[0] if len(literals) == 1 else tasks.c.status.in_(literals)


#: The condition of `ix_tasks_queued`; queries must use this very expression to use it.
IS_QUEUED = _status_in(QUEUED)
#: The condition of `ix_tasks_active`.
IS_ACTIVE = _status_in(*ACTIVE_STATUSES)

# Queued tasks in claim order: a claim reads the first entry of one queue.
ix_tasks_queued = sa.Index(
    "ix_tasks_queued",
    tasks.c.queue,
    tasks.c.priority.desc(),
    tasks.c.queue_seq,
    sqlite_where=IS_QUEUED,
    postgresql_where=IS_QUEUED,
)
# Tasks that workers own, by worker: heartbeats, lease sweeps and the workers list.
ix_tasks_active = sa.Index(
    "ix_tasks_active",
    tasks.c.worker,
    sqlite_where=IS_ACTIVE,
    postgresql_where=IS_ACTIVE,
)

task_tags = sa.Table(
    "task_tags",
    metadata,
    sa.Column("task_id", sa.String(64), primary_key=True),
    sa.Column("tag", sa.String(128), primary_key=True),
    sa.Index("ix_task_tags_tag", "tag"),
)

queues = sa.Table(
    "queues",
    metadata,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("created_at", sa.Float, nullable=False),
)

workers = sa.Table(
    "workers",
    metadata,
    sa.Column("id", sa.String(256), primary_key=True),
    sa.Column("hostname", sa.String(256), nullable=False, default=""),
    sa.Column("queues", sa.Text, nullable=False, default="[]"),
    sa.Column("slots", sa.Integer, nullable=False, default=1),
    sa.Column("registered_at", sa.Float, nullable=False),
    sa.Column("last_seen", sa.Float, nullable=False),
    sa.Column("resources", sa.Text, nullable=False, default="{}"),
)

log_lines = sa.Table(
    "log_lines",
    metadata,
    sa.Column("task_id", sa.String(64), primary_key=True),
    sa.Column("n", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("timestamp", sa.Float, nullable=False),
    sa.Column("stream", sa.String(16), nullable=False),
    sa.Column("line", sa.Text, nullable=False),
)

# The caller-chosen ids of the log chunks appended to a task (`append_log(batch_id=...)`):
# a chunk whose id is here was appended already. Cleared with `log_lines`.
log_batches = sa.Table(
    "log_batches",
    metadata,
    sa.Column("task_id", sa.String(64), primary_key=True),
    sa.Column("batch_id", sa.String(64), primary_key=True),
)

scalars = sa.Table(
    "scalars",
    metadata,
    sa.Column("id", _RowId, primary_key=True, autoincrement=True),
    sa.Column("task_id", sa.String(64), nullable=False),
    sa.Column("title", sa.String(256), nullable=False),
    sa.Column("series", sa.String(256), nullable=False),
    sa.Column("iteration", sa.BigInteger, nullable=False),
    sa.Column("value", sa.Float, nullable=True),  # NULL stands for NaN
    sa.Column("timestamp", sa.Float, nullable=False),
    sa.Index("ix_scalars_task", "task_id", "title", "series", "iteration"),
)


#: The columns of `tasks` a TaskRecord is made of (all but the history).
RECORD_COLUMNS = tuple(c for c in tasks.c if c.name != "history")


def history_line(status: str, reason: str, message: str, time: float) -> str:
    """The line a status change appends to `tasks.history`."""
    return dumps({"status": status, "reason": reason, "message": message, "time": time}) + "\n"


def parse_history(text: str) -> list[dict[str, object]]:
    """The status changes recorded in a `tasks.history` value, oldest first."""
    return [json.loads(line) for line in text.splitlines() if line]


# ------------------------------------------------------------------ triggers
#: dialect → DDL statements creating the triggers of `tasks`: on PostgreSQL, the NOTIFY
#: of each status change (SQLite has no cross-process notification; waiters poll).
TRIGGER_DDL: dict[str, tuple[str, ...]] = {
    "postgresql": (
        f"""CREATE OR REPLACE FUNCTION conveyor_task_status_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{NOTIFY_CHANNEL}',
        json_build_object('schema', TG_TABLE_SCHEMA, 'id', NEW.id, 'status', NEW.status,
                          'queue', NEW.queue)::text);
    RETURN NULL;
END
$$""",
        "DROP TRIGGER IF EXISTS tasks_status_changed ON tasks",
        "CREATE TRIGGER tasks_status_changed AFTER UPDATE OF status ON tasks FOR EACH ROW "
        "WHEN (NEW.status IS DISTINCT FROM OLD.status) EXECUTE FUNCTION conveyor_task_status_changed()",
    ),
}


def create_triggers(conn: sa.Connection) -> None:
    """Create (or replace) the triggers of `tasks` on this connection's database."""
    for statement in TRIGGER_DDL.get(conn.dialect.name, ()):
        conn.exec_driver_sql(statement)


@sa.event.listens_for(tasks, "after_create")
def _create_triggers_with_table(_table: sa.Table, conn: sa.Connection, **_kw: object) -> None:
    create_triggers(conn)


# ---------------------------------------------------------------- migrations
def _migrate_1_to_2(conn: sa.Connection) -> None:
    """Version 1 kept queues in a `queue_entries` table, history in `status_changes`, and
    indexed every status. Move queue membership and history onto `tasks`, swap the
    indexes, add the trigger."""
    add = "ALTER TABLE tasks ADD COLUMN"
    conn.exec_driver_sql(f"{add} queue VARCHAR(128)")
    conn.exec_driver_sql(f"{add} priority INTEGER NOT NULL DEFAULT 0")
    conn.exec_driver_sql(f"{add} queue_seq BIGINT")
    conn.exec_driver_sql(f"{add} history TEXT NOT NULL DEFAULT ''")
    histories: dict[str, list[str]] = {}
    changes = conn.exec_driver_sql(
        "SELECT task_id, status, reason, message, time FROM status_changes ORDER BY id"
    )
    for task_id, status, reason, message, at in changes:
        histories.setdefault(task_id, []).append(history_line(status, reason, message, at))
    # Every task keeps the queue and priority of its definition, and its history ...
    rows = conn.exec_driver_sql("SELECT id, body FROM tasks").all()
    for task_id, body in rows:
        execution = (json.loads(body).get("execution") or {}) if body else {}
        conn.execute(
            tasks.update()
            .where(tasks.c.id == task_id)
            .values(
                queue=execution.get("queue") or None,
                priority=int(execution.get("priority") or 0),
                history="".join(histories.get(task_id, ())),
            )
        )
    # ... and queued tasks their place in line.
    entries = conn.exec_driver_sql("SELECT task_id, queue, priority, seq FROM queue_entries").all()
    for task_id, queue, priority, seq in entries:
        conn.execute(
            tasks.update().where(tasks.c.id == task_id).values(queue=queue, priority=priority, queue_seq=seq)
        )
    conn.exec_driver_sql("DROP INDEX IF EXISTS ix_tasks_status")
    conn.exec_driver_sql("DROP TABLE queue_entries")
    conn.exec_driver_sql("DROP TABLE status_changes")
    ix_tasks_queued.create(conn)
    ix_tasks_active.create(conn)
    create_triggers(conn)


def _migrate_2_to_3(conn: sa.Connection) -> None:
    """Version 2 notified only enqueues (the queue name on `conveyor_enqueue`); version 3
    notifies every status change. Swap the trigger (PostgreSQL only)."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("DROP TRIGGER IF EXISTS tasks_enqueued ON tasks")
        conn.exec_driver_sql("DROP FUNCTION IF EXISTS conveyor_task_enqueued()")
    create_triggers(conn)


def _migrate_3_to_4(conn: sa.Connection) -> None:
    """Version 4 remembers the ids of appended log chunks: add `log_batches`."""
    log_batches.create(conn, checkfirst=True)


#: from-version → function upgrading a connection in a transaction to from-version + 1.
MIGRATIONS: dict[int, Callable[[sa.Connection], None]] = {
    1: _migrate_1_to_2, 2: _migrate_2_to_3, 3: _migrate_3_to_4,
}
