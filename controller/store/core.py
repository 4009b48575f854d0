"""The common ground of the store's operations: connections, the state machine's one
writer (`StoreCore._change_status`), publishing status changes to the notifier.

A status change is one UPDATE whose WHERE clause holds the status rule (`status IN (the
transition's sources)`, see `controller.transitions` and `status`), so it is atomic by
itself, and that appends the change to the task's history column. The hot operations
(enqueue of a created task, claim, status reports) are therefore single statements run
on the autocommit engine; when such a statement matches nothing, the general path (one
transaction that reads the row first, locked FOR UPDATE on PostgreSQL; SQLite's BEGIN
IMMEDIATE already serializes writers) either does the rarer work or raises the precise
error. A refused request raises before anything is written.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa

from controller.backend import Backend
from controller.errors import (
    ConflictError,
    IllegalTransitionError,
    InvalidInputError,
    NotFoundError,
)
from controller.models import (
    QUEUE_NAME_RULE,
    TaskRecord,
    TaskStatus,
    check_worker_id,
    is_queue_name,
)
from controller.store import schema
from controller.store.engine import (
    create_engines,
    database_errors_as_conveyor_errors,
    init_schema,
    normalize_url,
)
from controller.store.notify import Notifier, StatusEvent
from controller.store.records import dumps, row_to_record
from controller.store.status import guard, set_clause, status_columns, status_in
from controller.transitions import Transition

T = schema.tasks
_ACTIVE = schema.ACTIVE_STATUSES
#: `conn.info` key of the status events of a connection's uncommitted changes.
_EVENTS = "conveyor_status_events"
MAX_LEASE_S = 86_400.0


def check_queue_name(name: Any) -> str:
    """Return `name` if it is a valid queue name, else raise InvalidInputError."""
    if not is_queue_name(name):
        raise InvalidInputError(f"invalid queue name {name!r}: {QUEUE_NAME_RULE}", field="queue")
    return name


def check_lease(lease_s: Any) -> float:
    """`lease_s` as seconds if it is a usable lease length, else InvalidInputError."""
    if not isinstance(lease_s, int | float) or not 0 < lease_s <= MAX_LEASE_S:
        raise InvalidInputError(f"lease_s must be in (0, {MAX_LEASE_S:.0f}], got {lease_s!r}", field="lease_s")
    return float(lease_s)


def check_worker(worker_id: Any) -> str:
    """`worker_id` if it is a usable worker id, else InvalidInputError."""
    try:
        return check_worker_id(worker_id)
    except ValueError as exc:
        raise InvalidInputError(str(exc), field="worker_id") from None


class StoreCore(Backend):
    """Connections, the status-change writer and the notifier, shared by the store's
    operations (`tasks`, `queues`, `workers`, `logs`)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._notifier = Notifier(normalize_url(url))
        self._engines = create_engines(url, self._notifier.own_backend_pids)
        self.dialect = self._engines.transactions.dialect.name
        init_schema(self._engines.transactions)
        self._last_sweep = 0.0
        self._known_queues: dict[str, float] = {}

    # ------------------------------------------------------------ plumbing
    @contextlib.contextmanager
    def _write(self) -> Iterator[sa.Connection]:
        """A write transaction (BEGIN IMMEDIATE on SQLite); database errors raise
        Conveyor errors (outages BackendUnavailableError). Status changes are published once it committed."""
        with database_errors_as_conveyor_errors(), self._engines.transactions.connect() as conn:
            conn.info[_EVENTS] = []
            with conn.begin():
                yield conn
            events = conn.info.pop(_EVENTS)
        self._publish(events)

    @contextlib.contextmanager
    def _direct(self) -> Iterator[sa.Connection]:
        """An autocommit connection for one-statement operations (each change is
        published: it committed with its statement)."""
        with database_errors_as_conveyor_errors(), self._engines.autocommit.connect() as conn:
            conn.info[_EVENTS] = []
            try:
                yield conn
            finally:
                events = conn.info.pop(_EVENTS)
                self._publish(events)

    def _changed(self, conn: sa.Connection, row: sa.Row) -> sa.Row:
        """Note that the task of `row` changed status (published after the commit)."""
        conn.info[_EVENTS].append(StatusEvent(row.id, row.status, row.queue))
        return row

    def _deleted(self, conn: sa.Connection, task_id: str) -> None:
        """Note that a task was deleted (its waiters re-check and find it gone)."""
        conn.info[_EVENTS].append(StatusEvent(task_id, "deleted", None))

    def _publish(self, events: list[StatusEvent]) -> None:
        for event in events:
            self._notifier.publish(event)

    @contextlib.contextmanager
    def _read(self) -> Iterator[sa.Connection]:
        """A read transaction (one snapshot), ended when the block ends."""
        with database_errors_as_conveyor_errors(), self._engines.reads.begin() as conn:
            yield conn

    def _row(self, conn: sa.Connection, task_id: str, *, for_update: bool = False) -> sa.Row:
        select = _SELECT_TASK_FOR_UPDATE if for_update and self.dialect == "postgresql" else _SELECT_TASK
        row = conn.execute(select, {"id": task_id}).first()
        if row is None:
            raise NotFoundError(f"no task with id {task_id!r}", field="task_id")
        return row

    def _fetch(self, conn: sa.Connection, task_id: str) -> TaskRecord:
        return row_to_record(self._row(conn, task_id))

    def _change_status(
        self,
        conn: sa.Connection,
        task_id: str,
        step: Transition,
        reason: str,
        message: str,
        *,
        body: dict[str, Any] | None = None,
        worker_id: str | None = None,
        lease_s: float | None = None,
    ) -> sa.Row:
        """Apply one transition of the state machine (the one place that does) and
        return the task's new row.

        The status rule is checked in the UPDATE itself (`status IN (sources)`), so the
        change is atomic on both databases, in a transaction or alone; when it matches
        nothing the current row is read to raise the precise error.
        """
        update, params = _status_statement(
            task_id, step, reason, message, body=body, worker_id=worker_id, lease_s=lease_s
        )
        row = conn.execute(update, params).first()
        if row is None:
            self._explain_refusal(conn, task_id, step.target, worker_id)
        return self._changed(conn, row)

    def _explain_refusal(
        self, conn: sa.Connection, task_id: str, status: TaskStatus, worker_id: str | None
    ) -> None:
        """Raise why a status change to `status` matched no row."""
        current = conn.execute(_SELECT_STATUS, {"id": task_id}).first()
        if current is None:
            raise NotFoundError(f"no task with id {task_id!r}", field="task_id")
        if worker_id and current.status in _ACTIVE and current.worker != worker_id:
            raise ConflictError(
                f"task {task_id} is held by worker {current.worker!r}, not {worker_id!r}",
                field="worker_id",
            )
        raise IllegalTransitionError(current.status, status.value, task_id)

    def close(self) -> None:
        """Release connections and stop the LISTEN thread."""
        self._notifier.close()
        self._engines.dispose()


def check_status(status: TaskStatus | str) -> TaskStatus:
    """`status` as a TaskStatus; InvalidInputError naming the known ones if it is not one."""
    try:
        return TaskStatus(status)
    except ValueError:
        raise InvalidInputError(
            f"unknown status {status!r}: one of {', '.join(s.value for s in TaskStatus)}",
            field="status",
        ) from None


def _status_statement(
    task_id: str,
    step: Transition,
    reason: str,
    message: str,
    *,
    body: dict[str, Any] | None = None,
    worker_id: str | None = None,
    lease_s: float | None = None,
) -> tuple[sa.Executable, dict[str, Any]]:
    """The UPDATE of one transition (see `SqlBackend._change_status`) and its parameters."""
    values = status_columns(step, reason, message, worker_id=worker_id, lease_s=lease_s)
    if body is not None:
        values["body"] = dumps(body)
    params = {f"v_{k}": v for k, v in values.items()}
    params.update(_id=task_id, _worker=worker_id)
    return _status_update(step, tuple(values), bool(worker_id)), params


@functools.cache
def _status_update(step: Transition, keys: tuple[str, ...], check_worker: bool) -> sa.Executable:
    """UPDATE tasks SET <keys> WHERE id = :_id AND status IN (the step's sources)."""
    condition = sa.and_(T.c.id == sa.bindparam("_id"), guard(step))
    if check_worker:  # a worker may only change a task it holds (or a task nobody holds)
        condition = sa.and_(
            condition, sa.or_(T.c.worker == sa.bindparam("_worker"), sa.not_(status_in(_ACTIVE)))
        )
    return T.update().where(condition).values(set_clause(step, keys)).returning(*schema.RECORD_COLUMNS)


_SELECT_TASK = sa.select(*schema.RECORD_COLUMNS).where(T.c.id == sa.bindparam("id"))
_SELECT_TASK_FOR_UPDATE = _SELECT_TASK.with_for_update()
_SELECT_STATUS = sa.select(T.c.status, T.c.worker).where(T.c.id == sa.bindparam("id"))
