"""Task operations of the store: create, read, query, edit, clone, delete, status
reports, final reports (log, runtime and status at once), abort, reset and waiting for
status changes."""

from __future__ import annotations

import functools
import json
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa

from controller.backend import _UNSET, MAX_CLAIM_WAIT_S, MAX_WATCHED_TASKS
from controller.errors import (
    ConflictError,
    IllegalTransitionError,
    InvalidInputError,
    NotFoundError,
)
from controller.models import (
    EDITABLE_FIELDS,
    MAX_INT64,
    LogLine,
    StatusChange,
    StatusReason,
    TaskRecord,
    TaskSpec,
    TaskStatus,
    merge_task_changes,
)
from controller.store import schema
from controller.store.core import StoreCore, check_status, check_worker
from controller.store.logs import parse_log_lines, write_log_lines
from controller.store.notify import task_key
from controller.store.records import body_of, corrupt_record_error, dumps, row_to_record, validate
from controller.transitions import Operation, finish_transition, report_transition, transition

T = schema.tasks
MAX_QUERY_LIMIT = 10_000
#: Reads an edit makes before giving up when the task keeps changing meanwhile.
EDIT_ATTEMPTS = 20


class TaskOperations(StoreCore):
    """Tasks and their status changes."""

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
            row = conn.execute(_INSERT_TASK, {
                "id": task_id,
                "name": spec.name,
                "project": spec.project,
                "type": spec.type.value,
                "parent": spec.parent,
                "status": TaskStatus.created.value,
                "status_reason": StatusReason.created,
                "status_message": "",
                "attempt": 0,
                "log_lines": 0,
                "created_at": now,
                "updated_at": now,
                "queue": spec.execution.queue or None,
                "priority": spec.execution.priority,
                "body": dumps(body),
                "history": schema.history_line(TaskStatus.created.value, StatusReason.created, "", now),
            }).one()
            self._write_tags(conn, task_id, spec.tags)
            return row_to_record(row)

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
        try:
            record.status_history = [StatusChange.model_validate(h) for h in schema.parse_history(row.history)]
        except ValueError as exc:  # a damaged history column (ValidationError is a ValueError)
            raise corrupt_record_error(f"task {task_id} (status history)", exc) from exc
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
        # Optimistic: read, merge and validate outside any transaction, then one UPDATE
        # that applies only if the task's status and body are still those read (else
        # read again). No write lock is held while Python validates (on SQLite the
        # lock is the whole database's: other processes' writes would wait for it).
        for _attempt in range(EDIT_ATTEMPTS):
            with self._direct() as conn:
                row = self._row(conn, task_id)
            if row.status != TaskStatus.created.value and not force:
                raise ConflictError(
                    f"task {task_id} is {row.status}: only a task in status created can be "
                    "edited (reset it first)",
                    field="status",
                )
            spec, data = _edited(row, changes)
            # A queued task (forced edit) keeps its place; others take the new queue.
            keeps_place = row.status == TaskStatus.queued.value
            params = {
                "_id": task_id, "_status": row.status, "_body": row.body,
                "v_name": spec.name, "v_project": spec.project, "v_type": spec.type.value,
                "v_parent": spec.parent, "v_updated_at": time.time(), "v_body": dumps(body_of(data)),
            }
            if not keeps_place:
                params.update(v_queue=spec.execution.queue or None, v_priority=spec.execution.priority)
            new_parent = bool(spec.parent) and spec.parent != row.parent
            # one statement, unless the tags table or the new parent is involved too
            with (self._write() if new_parent or "tags" in changes else self._direct()) as conn:
                if new_parent:
                    self._row(conn, spec.parent)  # the parent must exist
                updated = conn.execute(_edit_update(keeps_place), params).first()
                if updated is not None:
                    if "tags" in changes:
                        self._write_tags(conn, task_id, spec.tags)
                    return row_to_record(updated)
        raise ConflictError(f"task {task_id} kept changing while it was edited: try again", field="task_id")

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

    def delete_task(self, task_id: str, *, force: bool = False) -> list[TaskRecord]:
        """Delete a task with its log, scalars and queue entry; a pipeline with its steps.

        One transaction: the task and every task whose parent it is go together, or none
        does (an active one among them without `force`). Returns the records deleted, the
        steps first and the task last."""
        with self._write() as conn:
            row = self._row(conn, task_id, for_update=True)
            steps_of = sa.select(*schema.RECORD_COLUMNS).where(T.c.parent == task_id)
            if self.dialect == "postgresql":
                steps_of = steps_of.with_for_update()
            steps = conn.execute(steps_of.order_by(T.c.created_at, T.c.id)).all()
            rows = [*steps, row]
            if not force:
                for each in rows:
                    if TaskStatus(each.status).is_active:
                        what = "task" if each.id == task_id else f"step {each.id} of task {task_id}"
                        raise ConflictError(
                            f"{what} is {each.status}: abort it first, or delete with force",
                            field="status",
                        )
            ids = [each.id for each in rows]
            for table in (schema.task_tags, schema.log_lines, schema.log_batches, schema.scalars):
                conn.execute(table.delete().where(table.c.task_id.in_(ids)))
            conn.execute(T.delete().where(T.c.id.in_(ids)))
            for each in ids:
                self._deleted(conn, each)
        return [row_to_record(each) for each in rows]

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

    def finish_task(
        self,
        task_id: str,
        status: TaskStatus | str,
        *,
        reason: str = "",
        message: str = "",
        worker_id: str | None = None,
        runtime: Mapping[str, Any] | None = None,
        log_lines: Sequence[LogLine | Mapping[str, Any] | str] = (),
        log_batch_id: str | None = None,
    ) -> TaskRecord:
        """A run's final report: log lines, runtime and finished status in one
        transaction, all or nothing (see `Backend.finish_task`).

        The lines go through the log's own writer (`write_log_lines`: batch ids), the
        runtime through the edit's merge and validation (`_edited`), the status through
        the state machine's one writer (`_change_status`, the transition `set_status`
        makes), which also writes the merged body. Input is checked, and the runtime
        merged and validated, before the transaction starts; the transaction then
        applies it only if the task's body is still the one merged into (else it is
        read and merged again), so no write lock is held while Python validates.
        """
        status = check_status(status)
        step = finish_transition(status)
        if step is None:
            raise InvalidInputError(
                f"a final report ends a task: status must be completed, failed or stopped, "
                f"not {status.value!r}",
                field="status",
            )
        if worker_id is not None:
            check_worker(worker_id)
        if runtime is not None and not isinstance(runtime, Mapping):
            raise InvalidInputError("runtime must be an object of name: value", field="runtime")
        parsed = parse_log_lines(log_lines, log_batch_id, lines_field="log_lines", batch_field="log_batch_id")
        reason = reason or status.value
        for _attempt in range(EDIT_ATTEMPTS):
            merged_into, body = None, None
            if runtime:
                with self._direct() as conn:
                    row = self._row(conn, task_id)
                merged_into = row.body
                body = body_of(_edited(row, {"runtime": runtime})[1])
            with self._write() as conn:
                current = self._row(conn, task_id, for_update=True)
                if merged_into is not None and current.body != merged_into:
                    continue  # changed since it was read: merge into the new body
                logged = write_log_lines(conn, task_id, parsed, log_batch_id)
                if not logged.appended and _reported_already(current, status, reason, message, worker_id):
                    return row_to_record(current)  # a retry of a report that was applied
                row = self._change_status(conn, task_id, step, reason, message, body=body, worker_id=worker_id)
                return row_to_record(row)
        raise ConflictError(f"task {task_id} kept changing while it was reported: try again", field="task_id")

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
            for table in (schema.log_lines, schema.log_batches, schema.scalars):
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
        """The tasks of `wanted` whose status differs from the one given: one small
        SELECT of (id, status) when nothing changed (the common case of a re-check),
        the changed tasks' records read only when there are some."""
        with self._direct() as conn:
            current = {r.id: r.status for r in conn.execute(_SELECT_STATUSES, {"ids": list(wanted)})}
            missing = sorted(set(wanted) - set(current))
            if missing:
                raise NotFoundError(f"no task with id {missing[0]!r}", field="known")
            changed = [task_id for task_id, status in current.items() if status != wanted[task_id]]
            if not changed:
                return []
            return [row_to_record(r) for r in conn.execute(_SELECT_RECORDS, {"ids": changed})]


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


def _reported_already(
    row: sa.Row, status: TaskStatus, reason: str, message: str, worker_id: str | None
) -> bool:
    """True if the task of `row` holds the outcome of this report already: its status,
    reason and message (and the reporting worker, if named). With its log batch id
    already stored, that report was applied before (an answer lost, a retry)."""
    return (
        row.status == status.value
        and row.status_reason == reason
        and row.status_message == message
        and (worker_id is None or row.worker == worker_id)
    )


def _edited(row: sa.Row, changes: Mapping[str, Any]) -> tuple[TaskSpec, dict[str, Any]]:
    """The task of `row` with `changes` merged in (`merge_task_changes`) and validated:
    its definition and its whole record as json-mode data (`body_of` gives its body).
    What an edit writes, and what a final report merges its runtime with."""
    current = row_to_record(row).model_dump(mode="json")
    merged = merge_task_changes(current, changes)
    spec = validate(TaskSpec, {k: merged[k] for k in TaskSpec.model_fields})
    record = validate(TaskRecord, {**merged, **spec.model_dump(mode="json")})
    return spec, record.model_dump(mode="json")


_SELECT_TASK_WITH_HISTORY = sa.select(T).where(T.c.id == sa.bindparam("id"))
#: A new task (parameters named as the columns), returning its row.
_INSERT_TASK = T.insert().returning(*schema.RECORD_COLUMNS)


@functools.cache
def _edit_update(keeps_place: bool) -> sa.Executable:
    """The UPDATE of an edit, applied only if the task's status and body are still
    those the edit read (`_status`, `_body`), returning the task's new row
    (`keeps_place`: a queued task's queue and priority stay as they are)."""
    columns = ["name", "project", "type", "parent", "updated_at", "body"]
    if not keeps_place:
        columns += ["queue", "priority"]
    return (
        T.update()
        .where(T.c.id == sa.bindparam("_id"), T.c.status == sa.bindparam("_status"),
               T.c.body == sa.bindparam("_body"))
        .values({c: sa.bindparam(f"v_{c}") for c in columns})
        .returning(*schema.RECORD_COLUMNS)
    )


_SELECT_STATUSES = sa.select(T.c.id, T.c.status).where(T.c.id.in_(sa.bindparam("ids", expanding=True)))
_SELECT_RECORDS = sa.select(*schema.RECORD_COLUMNS).where(T.c.id.in_(sa.bindparam("ids", expanding=True)))
