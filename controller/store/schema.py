"""Tables of the task store (SQLAlchemy Core), one definition for SQLite and PostgreSQL.

Columns that are filtered, ordered or changed by the hot paths (status, queue entries,
leases, log line counter) are real columns; the rest of the task record (script,
packages, container, hyperparams, configuration, execution, runtime, artifacts, models)
is one JSON document in `tasks.body`, read and written whole. Status changes are
appended to `status_changes`, so a status change never rewrites the body.

The schema version is recorded in `meta`; `SCHEMA_VERSION` and `MIGRATIONS` let a later
version upgrade an older database in place.
"""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa

#: Version of the schema this code writes. Bump it and add a migration on change.
SCHEMA_VERSION = 1

#: from-version → function upgrading a connection in a transaction to from-version + 1.
MIGRATIONS: dict[int, Callable[[sa.Connection], None]] = {}

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
    sa.Column("body", sa.Text, nullable=False),
    sa.Index("ix_tasks_project_name", "project", "name"),
    sa.Index("ix_tasks_status", "status"),
    sa.Index("ix_tasks_parent", "parent"),
    sa.Index("ix_tasks_created_at", "created_at"),
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

queue_entries = sa.Table(
    "queue_entries",
    metadata,
    sa.Column("seq", _RowId, primary_key=True, autoincrement=True),
    sa.Column("task_id", sa.String(64), nullable=False, unique=True),
    sa.Column("queue", sa.String(128), nullable=False),
    sa.Column("priority", sa.Integer, nullable=False, default=0),
    sa.Column("enqueued_at", sa.Float, nullable=False),
)
# Matches the claim order exactly (queue, highest priority, oldest): a claim reads one entry.
sa.Index("ix_queue_entries_order", queue_entries.c.queue, queue_entries.c.priority.desc(), queue_entries.c.seq)

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

status_changes = sa.Table(
    "status_changes",
    metadata,
    sa.Column("id", _RowId, primary_key=True, autoincrement=True),
    sa.Column("task_id", sa.String(64), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("reason", sa.String(64), nullable=False),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("time", sa.Float, nullable=False),
    sa.Index("ix_status_changes_task", "task_id", "id"),
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
