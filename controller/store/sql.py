"""SqlBackend: the Backend straight on SQLite or PostgreSQL (SQLAlchemy Core).

One code path serves both databases. A status change is one UPDATE whose WHERE clause
holds the status rule (`status IN (legal predecessors)`), so it is atomic by itself, and
that appends the change to the task's history column. The hot operations (enqueue of a created task,
claim, status reports) are therefore single statements run in autocommit on a
`DirectConnection`; when such a statement matches nothing, the general path (one
transaction that reads the row first, locked FOR UPDATE on PostgreSQL; SQLite's BEGIN
IMMEDIATE already serializes writers) either does the rarer work or raises the precise
error. A refused request raises before anything is written, so bad input never changes
the store.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import sqlalchemy as sa

from controller.backend import _UNSET, MAX_CLAIM_WAIT_S, MAX_WATCHED_TASKS, Backend
from controller.errors import (
    ConflictError,
    IllegalTransitionError,
    InvalidInputError,
    NotFoundError,
)
from controller.models import (
    EDITABLE_FIELDS,
    MAX_INT64,
    MAX_LOG_LINES_PER_CALL,
    LogLine,
    Scalar,
    StatusChange,
    StatusReason,
    TaskRecord,
    TaskSpec,
    TaskStatus,
)
from controller.store import schema
from controller.store.engine import (
    create_engines,
    init_schema,
    normalize_url,
    unavailable_as_conveyor_error,
)
from controller.store.notify import Notifier, StatusEvent, task_key
from controller.store.queueing import QueueingMixin
from controller.store.records import (
    body_of,
    dumps,
    row_to_record,
    validate,
)
from controller.store.status import guard, set_clause, status_columns, status_in
from controller.transitions import Operation, Transition, report_transition, transition

T = schema.tasks
MAX_QUERY_LIMIT = 10_000
_ACTIVE = schema.ACTIVE_STATUSES
#: `conn.info` key of the status events of a connection's uncommitted changes.
_EVENTS = "conveyor_status_events"
# Definition parts merged key by key on edit (the rest is replaced whole).
_MERGED_FIELDS = ("script", "container", "execution", "runtime", "configuration", "artifacts")


class SqlBackend(QueueingMixin, Backend):
    """The task store on a database URL (`sqlite:///file.db` or `postgresql://...`)."""

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
        """A write transaction (BEGIN IMMEDIATE on SQLite); outages raise
        BackendUnavailableError. Status changes are published once it committed."""
        with unavailable_as_conveyor_error(), self._engines.transactions.connect() as conn:
            conn.info[_EVENTS] = []
            with conn.begin():
                yield conn
            events = conn.info.pop(_EVENTS)
        self._publish(events)

    @contextlib.contextmanager
    def _direct(self) -> Iterator[sa.Connection]:
        """An autocommit connection for one-statement operations (each change is
        published: it committed with its statement)."""
        with unavailable_as_conveyor_error(), self._engines.autocommit.connect() as conn:
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

    def _publish(self, events: list[StatusEvent]) -> None:
        for event in events:
            self._notifier.publish(event)

    @contextlib.contextmanager
    def _read(self) -> Iterator[sa.Connection]:
        """A read transaction (one snapshot), ended when the block ends."""
        with unavailable_as_conveyor_error(), self._engines.reads.begin() as conn:
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

    # --------------------------------------------------------------- tasks
    def create_task(self, spec: TaskSpec | Mapping[str, Any]) -> TaskRecord:
        """Create a task in status created and return it."""
        spec = validate(TaskSpec, spec)
        task_id = uuid.uuid4().hex
        now = time.time()
        data = spec.model_dump(mode="json")
        body = body_of(data)
        body["runtime"] = {}
        with self._write() as conn:
            if spec.parent:
                self._row(conn, spec.parent)  # the parent must exist
            conn.execute(
                T.insert().values(
                    id=task_id,
                    name=spec.name,
                    project=spec.project,
                    type=spec.type.value,
                    parent=spec.parent,
                    status=TaskStatus.created.value,
                    status_reason=StatusReason.created,
                    status_message="",
                    attempt=0,
                    log_lines=0,
                    created_at=now,
                    updated_at=now,
                    queue=spec.execution.queue or None,
                    priority=spec.execution.priority,
                    body=dumps(body),
                    history=schema.history_line(TaskStatus.created.value, StatusReason.created, "", now),
                )
            )
            self._write_tags(conn, task_id, spec.tags)
            return self._fetch(conn, task_id)

    def _write_tags(self, conn: sa.Connection, task_id: str, tags: Sequence[str]) -> None:
        conn.execute(schema.task_tags.delete().where(schema.task_tags.c.task_id == task_id))
        if tags:
            conn.execute(schema.task_tags.insert(), [{"task_id": task_id, "tag": t} for t in tags])

    def get_task(self, task_id: str) -> TaskRecord:
        """Return one task with its status history; NotFoundError if there is none."""
        with self._direct() as conn:
            row = conn.execute(_SELECT_TASK_WITH_HISTORY, {"id": task_id}).first()
        if row is None:
            raise NotFoundError(f"no task with id {task_id!r}", field="task_id")
        record = row_to_record(row)
        record.status_history = [StatusChange.model_validate(h) for h in schema.parse_history(row.history)]
        return record

    def query_tasks(
        self,
        *,
        project: str | None = None,
        name: str | None = None,
        status: Sequence[TaskStatus | str] | TaskStatus | str | None = None,
        tags: Sequence[str] | None = None,
        parent: str | None = None,
        type: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[TaskRecord]:
        """Tasks matching every given filter (all `tags` present), newest first."""
        if not isinstance(limit, int) or not 0 < limit <= MAX_QUERY_LIMIT:
            raise InvalidInputError(f"limit must be 1..{MAX_QUERY_LIMIT}, got {limit!r}", field="limit")
        if not isinstance(offset, int) or not 0 <= offset <= MAX_INT64:
            raise InvalidInputError(f"offset must be an integer >= 0, got {offset!r}", field="offset")
        if isinstance(tags, str):
            tags = [tags]
        query = sa.select(*schema.RECORD_COLUMNS)
        if project is not None:
            query = query.where(T.c.project == project)
        if name is not None:
            query = query.where(T.c.name == name)
        if status:
            statuses = [status] if isinstance(status, str | TaskStatus) else list(status)
            try:
                values = [TaskStatus(s).value for s in statuses]
            except ValueError as exc:
                raise InvalidInputError(f"unknown status: {exc}", field="status") from None
            query = query.where(T.c.status.in_(values))
        for tag in tags or ():
            query = query.where(
                T.c.id.in_(sa.select(schema.task_tags.c.task_id).where(schema.task_tags.c.tag == tag))
            )
        if parent is not None:
            query = query.where(T.c.parent == parent)
        if type is not None:
            query = query.where(T.c.type == type)
        query = query.order_by(T.c.created_at.desc(), T.c.id).limit(limit).offset(offset)
        with self._read() as conn:
            return [row_to_record(row) for row in conn.execute(query)]

    def edit_task(
        self, task_id: str, changes: Mapping[str, Any], *, force: bool = False
    ) -> TaskRecord:
        """Change definition fields of a created task (any status with `force`)."""
        if not isinstance(changes, Mapping):
            raise InvalidInputError("changes must be an object of field: value", field="changes")
        unknown = sorted(set(changes) - EDITABLE_FIELDS)
        if unknown:
            raise InvalidInputError(
                f"cannot edit field(s) {', '.join(unknown)}: editable fields are "
                f"{', '.join(sorted(EDITABLE_FIELDS))}",
                field=unknown[0],
            )
        with self._write() as conn:
            row = self._row(conn, task_id, for_update=True)
            if row.status != TaskStatus.created.value and not force:
                raise ConflictError(
                    f"task {task_id} is {row.status}: only a task in status created can be "
                    "edited (reset it first)",
                    field="status",
                )
            current = row_to_record(row).model_dump(mode="json")
            merged = _merge_changes(current, changes)
            spec = validate(TaskSpec, {k: merged[k] for k in TaskSpec.model_fields})
            record = validate(TaskRecord, {**merged, **spec.model_dump(mode="json")})
            if spec.parent and spec.parent != row.parent:
                self._row(conn, spec.parent)
            data = record.model_dump(mode="json")
            conn.execute(
                T.update()
                .where(T.c.id == task_id)
                .values(
                    name=spec.name,
                    project=spec.project,
                    type=spec.type.value,
                    parent=spec.parent,
                    updated_at=time.time(),
                    body=dumps(body_of(data)),
                    # A queued task (forced edit) keeps its place; others take the new queue.
                    **(
                        {}
                        if row.status == TaskStatus.queued.value
                        else dict(queue=spec.execution.queue or None, priority=spec.execution.priority)
                    ),
                )
            )
            if "tags" in changes:
                self._write_tags(conn, task_id, spec.tags)
            return self._fetch(conn, task_id)

    def clone_task(
        self,
        task_id: str,
        *,
        name: str | None = None,
        project: str | None = None,
        parent: str | None = _UNSET,
    ) -> TaskRecord:
        """A copy of the task's definition with a new id, in status created."""
        source = self.get_task(task_id)
        data = source.model_dump(mode="json", include=set(TaskSpec.model_fields))
        if name is not None:
            data["name"] = name
        if project is not None:
            data["project"] = project
        if parent is not _UNSET:
            data["parent"] = parent
        return self.create_task(data)

    def delete_task(self, task_id: str, *, force: bool = False) -> None:
        """Delete a task with its log, scalars and queue entry."""
        with self._write() as conn:
            row = self._row(conn, task_id, for_update=True)
            if TaskStatus(row.status).is_active and not force:
                raise ConflictError(
                    f"task {task_id} is {row.status}: abort it first, or delete with force",
                    field="status",
                )
            for table in (schema.task_tags, schema.log_lines, schema.scalars):
                conn.execute(table.delete().where(table.c.task_id == task_id))
            conn.execute(T.delete().where(T.c.id == task_id))

    def set_status(
        self,
        task_id: str,
        status: TaskStatus | str,
        *,
        reason: str = "",
        message: str = "",
        worker_id: str | None = None,
    ) -> TaskRecord:
        """Move a task to `status` if the status rules allow it (`controller.transitions`).

        `queued` enqueues; `created` takes a queued task off its queue and is refused
        for a finished task (resetting one is `reset_task`, never a status report)."""
        status = check_status(status)
        if status == TaskStatus.queued:
            return self.enqueue(task_id)
        step = report_transition(status)
        assert step is not None  # every status but queued has one
        with self._direct() as conn:
            row = self._change_status(
                conn, task_id, step, reason or status.value, message, worker_id=worker_id
            )
        return row_to_record(row)

    def abort_task(self, task_id: str, *, message: str = "") -> TaskRecord:
        """Abort: created/queued → stopped; in_progress → stopping; stopping stays."""
        with self._write() as conn:
            current = TaskStatus(self._row(conn, task_id, for_update=True).status)
            if current == TaskStatus.stopping:
                return self._fetch(conn, task_id)
            if current == TaskStatus.in_progress:
                step = transition(Operation.abort, TaskStatus.stopping)
                row = self._change_status(
                    conn, task_id, step, StatusReason.abort_requested, message or "abort requested"
                )
            else:
                step = transition(Operation.abort, TaskStatus.stopped)
                row = self._change_status(conn, task_id, step, StatusReason.aborted, message or "aborted")
            return row_to_record(row)

    def reset_task(self, task_id: str) -> TaskRecord:
        """Back to created, clearing log, scalars, artifacts, output models and runtime."""
        step = transition(Operation.reset, TaskStatus.created)
        with self._write() as conn:
            row = self._row(conn, task_id, for_update=True)
            if TaskStatus(row.status) not in step.sources:
                raise IllegalTransitionError(row.status, TaskStatus.created.value, task_id)
            body = json.loads(row.body)
            body["runtime"] = {}
            body["artifacts"] = {}
            body.setdefault("models", {})["output"] = []
            for table in (schema.log_lines, schema.scalars):
                conn.execute(table.delete().where(table.c.task_id == row.id))
            row = self._change_status(conn, row.id, step, StatusReason.reset, "reset", body=body)
            return row_to_record(row)

    def wait_for_status_change(
        self, known: Mapping[str, TaskStatus | str], *, wait_s: float = 0.0
    ) -> list[TaskRecord]:
        """Tasks of `known` whose status differs from the one given; waits up to `wait_s`."""
        wanted = _check_known(known)
        if not isinstance(wait_s, int | float) or not 0 <= wait_s <= MAX_CLAIM_WAIT_S:
            raise InvalidInputError(f"wait_s must be in [0, {MAX_CLAIM_WAIT_S:.0f}], got {wait_s!r}", field="wait_s")
        deadline = time.monotonic() + wait_s
        with self._notifier.watch(task_key(task_id) for task_id in wanted) as watch:
            while True:
                changed = self._changed_statuses(wanted)
                remaining = deadline - time.monotonic()
                if changed or remaining <= 0:
                    return changed
                watch.wait(min(remaining, self._notifier.poll_interval_s))

    def _changed_statuses(self, wanted: Mapping[str, str]) -> list[TaskRecord]:
        """The tasks of `wanted` whose status differs from the one given."""
        with self._read() as conn:
            current = {r.id: r.status for r in conn.execute(
                sa.select(T.c.id, T.c.status).where(T.c.id.in_(list(wanted))))}
            missing = sorted(set(wanted) - set(current))
            if missing:
                raise NotFoundError(f"no task with id {missing[0]!r}", field="known")
            changed = [task_id for task_id, status in current.items() if status != wanted[task_id]]
            if not changed:
                return []
            query = sa.select(*schema.RECORD_COLUMNS).where(T.c.id.in_(changed))
            return [row_to_record(r) for r in conn.execute(query)]

    # ------------------------------------------------------- logs, scalars
    def append_log(self, task_id: str, lines: Sequence[LogLine | Mapping[str, Any] | str]) -> int:
        """Append lines to a task's log; returns the log's new length in lines."""
        if isinstance(lines, str | bytes) or not isinstance(lines, Sequence):
            raise InvalidInputError("lines must be a list", field="lines")
        if len(lines) > MAX_LOG_LINES_PER_CALL:
            raise InvalidInputError(
                f"at most {MAX_LOG_LINES_PER_CALL} log lines per call, got {len(lines)}",
                field="lines",
            )
        now = time.time()
        parsed = [
            validate(LogLine, {"line": item} if isinstance(item, str) else item, what=f"lines.{i}")
            for i, item in enumerate(lines)
        ]
        with self._write() as conn:
            total = conn.execute(
                T.update()
                .where(T.c.id == task_id)
                .values(log_lines=T.c.log_lines + len(parsed))
                .returning(T.c.log_lines)
            ).scalar()
            if total is None:
                raise NotFoundError(f"no task with id {task_id!r}", field="task_id")
            if parsed:
                first = total - len(parsed)
                conn.execute(
                    schema.log_lines.insert(),
                    [
                        dict(
                            task_id=task_id,
                            n=first + i,
                            timestamp=item.timestamp or now,
                            stream=item.stream[:16],
                            line=item.line,
                        )
                        for i, item in enumerate(parsed)
                    ],
                )
            return int(total)

    def get_log(
        self, task_id: str, *, offset: int = 0, limit: int | None = None, tail: int | None = None
    ) -> list[LogLine]:
        """Lines from line number `offset` on (at most `limit`), or the last `tail` lines."""
        L = schema.log_lines
        for name, value in (("offset", offset), ("limit", limit), ("tail", tail)):
            if value is not None and not (isinstance(value, int) and 0 <= value <= MAX_INT64):
                raise InvalidInputError(f"{name} must be an integer >= 0, got {value!r}", field=name)
        with self._read() as conn:
            total = conn.execute(sa.select(T.c.log_lines).where(T.c.id == task_id)).scalar()
            if total is None:
                raise NotFoundError(f"no task with id {task_id!r}", field="task_id")
            if tail is not None:
                offset = max(offset, total - tail)
            query = sa.select(L).where(L.c.task_id == task_id, L.c.n >= offset).order_by(L.c.n)
            if limit is not None:
                query = query.limit(limit)
            return [
                LogLine(line=r.line, stream=r.stream, timestamp=r.timestamp, n=r.n)
                for r in conn.execute(query)
            ]

    def report_scalars(self, task_id: str, scalars: Sequence[Scalar | Mapping[str, Any]]) -> None:
        """Record scalar values (title, series, iteration, value)."""
        if not isinstance(scalars, Sequence):
            raise InvalidInputError("scalars must be a list", field="scalars")
        now = time.time()
        parsed = [validate(Scalar, s, what=f"scalars.{i}") for i, s in enumerate(scalars)]
        with self._write() as conn:
            self._row(conn, task_id)
            if parsed:
                conn.execute(
                    schema.scalars.insert(),
                    [dict(task_id=task_id, title=s.title, series=s.series, iteration=s.iteration,
                          value=None if math.isnan(s.value) else s.value,  # SQL stores NaN as NULL
                          timestamp=s.timestamp or now) for s in parsed],
                )

    def get_scalars(
        self, task_id: str, *, title: str | None = None, series: str | None = None
    ) -> list[Scalar]:
        """Scalars of a task, ordered by title, series, iteration."""
        S = schema.scalars
        query = sa.select(S).where(S.c.task_id == task_id)
        if title is not None:
            query = query.where(S.c.title == title)
        if series is not None:
            query = query.where(S.c.series == series)
        query = query.order_by(S.c.title, S.c.series, S.c.iteration, S.c.id)
        with self._read() as conn:
            self._row(conn, task_id)
            return [
                Scalar(title=r.title, series=r.series, iteration=r.iteration,
                       value=math.nan if r.value is None else r.value, timestamp=r.timestamp)
                for r in conn.execute(query)
            ]


def _check_known(known: Any) -> dict[str, str]:
    """Validate the `known` argument of wait_for_status_change: {task id: status}."""
    if not isinstance(known, Mapping) or not known:
        raise InvalidInputError("known must be a non-empty object of task id: status", field="known")
    if len(known) > MAX_WATCHED_TASKS:
        raise InvalidInputError(f"at most {MAX_WATCHED_TASKS} tasks can be followed at once", field="known")
    try:
        return {str(task_id): TaskStatus(status).value for task_id, status in known.items()}
    except ValueError as exc:
        raise InvalidInputError(f"known: {exc}", field="known") from None


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
_SELECT_TASK_WITH_HISTORY = sa.select(T).where(T.c.id == sa.bindparam("id"))
_SELECT_STATUS = sa.select(T.c.status, T.c.worker).where(T.c.id == sa.bindparam("id"))


def _merge_changes(current: dict[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """Apply edit changes to a json-mode record: nested parts merged, others replaced.

    A key set to None inside a merged part (e.g. an artifact) removes it.
    """
    merged = dict(current)
    for key, value in changes.items():
        if key in _MERGED_FIELDS and isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            part = dict(merged[key])
            for k, v in value.items():
                if v is None and key in ("artifacts", "configuration"):
                    part.pop(k, None)
                else:
                    part[k] = v
            merged[key] = part
        elif key == "hyperparams" and isinstance(value, Mapping):
            sections = {s: dict(p) for s, p in merged.get("hyperparams", {}).items()}
            for section, params in value.items():
                if params is None:
                    sections.pop(section, None)
                elif isinstance(params, Mapping):
                    sections.setdefault(section, {}).update(params)
                else:
                    sections[section] = params  # let validation name the bad section
            merged["hyperparams"] = sections
        else:
            merged[key] = value
    return merged
