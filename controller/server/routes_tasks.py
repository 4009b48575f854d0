"""Task endpoints: create, read, query, edit, clone, delete, status, final report, logs,
scalars, enqueue."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from enum import Enum
from typing import Annotated

import anyio
from fastapi import APIRouter, Body, Query, Request
from starlette.responses import Response

from controller.backend import _UNSET, Backend
from controller.models import (
    STATUS_GROUPS,
    LogLine,
    Scalar,
    TaskRecord,
    TaskSpec,
    TaskStatus,
)
from controller.server import encode
from controller.server.schemas import (
    AbortRequest,
    CloneRequest,
    EditRequest,
    EnqueueRequest,
    FinishRequest,
    LogAppendReply,
    LogAppendRequest,
    ScalarsRequest,
    Statuses,
    StatusInfo,
    StatusRequest,
    WaitRequest,
)
from controller.server.waker import ClaimWaker
from controller.transitions import LEGAL_TRANSITIONS

#: Longest one `wait_for_status_change` call of a /tasks/wait request blocks its thread:
#: between calls the request notices a client that went away and a server shutdown.
STATUS_WAIT_SLICE_S = 1.0
#: Most /tasks/wait requests waiting in threads at once (their own threads: waiting
#: controllers never take the threadpool's threads from the other routes).
MAX_STATUS_WAITERS = 100
NO_CONTENT = {204: {"description": "Done (no body)"}}
TAGS: list[str | Enum] = ["tasks"]


def status_table() -> Statuses:
    """Every task status with its display group, flags and legal next statuses."""
    return Statuses(
        statuses=[
            StatusInfo(
                name=status,
                group=STATUS_GROUPS[status],
                terminal=status.is_terminal,
                active=status.is_active,
                transitions=[s for s in TaskStatus if s in LEGAL_TRANSITIONS[status]],
            )
            for status in TaskStatus
        ]
    )


def add_task_routes(
    r: APIRouter,
    prefix: str,
    backend: Backend,
    waker: ClaimWaker,
    notify_enqueues: bool,
    closing: Callable[[], bool] = lambda: False,
    on_deleted: Callable[[TaskRecord], None] = lambda record: None,
) -> None:
    """Add the routes of {prefix}/tasks to `r`. With `notify_enqueues`, the enqueue route
    itself wakes claimers (for backends without an enqueue listener). `closing()` is true
    once the server shuts down: waiting /tasks/wait requests then answer at once.
    `on_deleted(record)` runs after a task is deleted (the app removes its files).

    Routes are added straight to the app's router (no `include_router`): FastAPI matches
    routes one by one, and nested routers make every request pay for that twice. For the
    same reason the calls agents make all the time (status, final report, enqueue, log,
    scalars, get) come first.
    """
    P = prefix
    statuses_json = status_table().model_dump_json().encode()
    status_waiters: dict[str, anyio.CapacityLimiter] = {}  # made on the event loop

    @r.post(
        P + "/tasks/{task_id}/status",
        tags=TAGS,
        response_model=TaskRecord,
        summary="Change a task's status",
    )
    def set_status(task_id: str, body: StatusRequest) -> Response:
        rec = backend.set_status(
            task_id,
            body.status,
            reason=body.reason,
            message=body.message,
            worker_id=body.worker_id,
        )
        return encode.record(rec)

    @r.post(
        P + "/tasks/{task_id}/finish",
        tags=TAGS,
        response_model=TaskRecord,
        summary="Report a run's end: log lines, runtime and finished status at once",
    )
    def finish_task(task_id: str, body: FinishRequest) -> Response:
        rec = backend.finish_task(
            task_id,
            body.status,
            reason=body.reason,
            message=body.message,
            worker_id=body.worker_id,
            runtime=body.runtime,
            log_lines=body.log_lines,
            log_batch_id=body.log_batch_id,
        )
        return encode.record(rec)

    @r.post(
        P + "/tasks/{task_id}/enqueue",
        tags=TAGS,
        response_model=TaskRecord,
        summary="Put a task on a queue",
    )
    def enqueue(task_id: str, body: Annotated[EnqueueRequest | None, Body()] = None) -> Response:
        body = body or EnqueueRequest()
        rec = backend.enqueue(task_id, body.queue, priority=body.priority)
        if notify_enqueues:
            waker.notify_threadsafe(None)
        return encode.record(rec)

    @r.post(
        P + "/tasks/{task_id}/log",
        tags=TAGS,
        response_model=LogAppendReply,
        summary="Append log lines",
    )
    def append_log(task_id: str, body: LogAppendRequest) -> Response:
        length = backend.append_log(task_id, body.lines, batch_id=body.batch_id)
        return encode.record(LogAppendReply(length=length))

    @r.post(
        P + "/tasks/{task_id}/scalars",
        tags=TAGS,
        status_code=204,
        responses=NO_CONTENT,
        summary="Report scalars",
    )
    def report_scalars(task_id: str, body: ScalarsRequest) -> Response:
        backend.report_scalars(task_id, body.scalars)
        return encode.no_content()

    @r.get(P + "/tasks/{task_id}", tags=TAGS, response_model=TaskRecord, summary="Get a task")
    def get_task(task_id: str) -> Response:
        return encode.record(backend.get_task(task_id))

    @r.post(
        P + "/tasks/wait",
        tags=TAGS,
        response_model=list[TaskRecord],
        summary="Wait until a task's status differs from the one given (long poll)",
    )
    async def wait_for_status_change(body: WaitRequest, request: Request) -> Response:
        # The Backend waits (woken by its status-change notifier), in a thread of the
        # waits' own limiter, in slices of at most STATUS_WAIT_SLICE_S.
        deadline = time.monotonic() + body.wait_s
        limiter = status_waiters.get("limiter")
        if limiter is None:
            limiter = status_waiters["limiter"] = anyio.CapacityLimiter(MAX_STATUS_WAITERS)
        while True:
            remaining = max(0.0, deadline - time.monotonic())
            wait = functools.partial(
                backend.wait_for_status_change,
                body.known,
                wait_s=min(remaining, STATUS_WAIT_SLICE_S),
            )
            changed = await anyio.to_thread.run_sync(wait, limiter=limiter)
            if changed or remaining <= STATUS_WAIT_SLICE_S or closing():
                return encode.records(changed, TaskRecord)
            if await request.is_disconnected():
                return encode.records([], TaskRecord)

    @r.get(
        P + "/statuses",
        tags=TAGS,
        response_model=Statuses,
        summary="Task statuses: display groups, terminal/active flags, legal transitions",
    )
    async def statuses() -> Response:
        return Response(content=statuses_json, media_type=encode.JSON)

    @r.post(
        P + "/tasks", tags=TAGS, response_model=TaskRecord, status_code=201, summary="Create a task"
    )
    def create_task(spec: TaskSpec) -> Response:
        return encode.record(backend.create_task(spec), 201)

    @r.get(
        P + "/tasks",
        tags=TAGS,
        response_model=list[TaskRecord],
        summary="Query tasks (newest first)",
    )
    def query_tasks(
        project: str | None = None,
        name: str | None = None,
        status: Annotated[list[str] | None, Query(description="repeat for several")] = None,
        tags: Annotated[list[str] | None, Query(description="all must be present")] = None,
        parent: str | None = None,
        type: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> Response:
        found = backend.query_tasks(
            project=project,
            name=name,
            status=status,
            tags=tags,
            parent=parent,
            type=type,
            limit=limit,
            offset=offset,
        )
        return encode.records(found, TaskRecord)

    @r.patch(
        P + "/tasks/{task_id}",
        tags=TAGS,
        response_model=TaskRecord,
        summary="Edit a task's definition",
    )
    def edit_task(task_id: str, body: EditRequest) -> Response:
        return encode.record(backend.edit_task(task_id, body.changes, force=body.force))

    @r.post(
        P + "/tasks/{task_id}/clone",
        tags=TAGS,
        response_model=TaskRecord,
        status_code=201,
        summary="Copy a task's definition into a new task",
    )
    def clone_task(task_id: str, body: Annotated[CloneRequest | None, Body()] = None) -> Response:
        body = body or CloneRequest()
        parent = body.parent if "parent" in body.model_fields_set else _UNSET
        rec = backend.clone_task(task_id, name=body.name, project=body.project, parent=parent)
        return encode.record(rec, 201)

    @r.delete(
        P + "/tasks/{task_id}",
        tags=TAGS,
        response_model=list[TaskRecord],
        summary="Delete a task (a pipeline with its steps)",
    )
    def delete_task(task_id: str, force: bool = False) -> Response:
        deleted = backend.delete_task(task_id, force=force)
        for record in deleted:
            on_deleted(record)
        return encode.records(deleted, TaskRecord)

    @r.get(
        P + "/tasks/{task_id}/log",
        tags=TAGS,
        response_model=list[LogLine],
        summary="Read log lines",
    )
    def get_log(
        task_id: str, offset: int = 0, limit: int | None = None, tail: int | None = None
    ) -> Response:
        lines = backend.get_log(task_id, offset=offset, limit=limit, tail=tail)
        return encode.records(lines, LogLine)

    @r.get(
        P + "/tasks/{task_id}/scalars",
        tags=TAGS,
        response_model=list[Scalar],
        summary="Read scalars",
    )
    def get_scalars(task_id: str, title: str | None = None, series: str | None = None) -> Response:
        return encode.records(backend.get_scalars(task_id, title=title, series=series), Scalar)

    @r.post(
        P + "/tasks/{task_id}/dequeue",
        tags=TAGS,
        response_model=TaskRecord,
        summary="Take a task off its queue",
    )
    def dequeue(task_id: str) -> Response:
        return encode.record(backend.dequeue(task_id))

    @r.post(
        P + "/tasks/{task_id}/abort", tags=TAGS, response_model=TaskRecord, summary="Abort a task"
    )
    def abort_task(task_id: str, body: Annotated[AbortRequest | None, Body()] = None) -> Response:
        body = body or AbortRequest()
        return encode.record(backend.abort_task(task_id, message=body.message))

    @r.post(
        P + "/tasks/{task_id}/reset",
        tags=TAGS,
        response_model=TaskRecord,
        summary="Reset a task to created",
    )
    def reset_task(task_id: str) -> Response:
        return encode.record(backend.reset_task(task_id))
