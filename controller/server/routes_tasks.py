"""Task endpoints: create, read, query, edit, clone, delete, status, logs, scalars, enqueue."""

from __future__ import annotations

import asyncio
import time
from enum import Enum
from typing import Annotated

from fastapi import APIRouter, Body, Query
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from controller.backend import _UNSET, Backend
from controller.models import LogLine, Scalar, TaskRecord, TaskSpec
from controller.server import encode
from controller.server.schemas import (
    AbortRequest,
    CloneRequest,
    EditRequest,
    EnqueueRequest,
    LogAppendReply,
    LogAppendRequest,
    ScalarsRequest,
    StatusRequest,
    WaitRequest,
)
from controller.server.waker import ClaimWaker

#: How often a waiting /tasks/wait request looks at the statuses again.
STATUS_POLL_INTERVAL_S = 0.01
NO_CONTENT = {204: {"description": "Done (no body)"}}
TAGS: list[str | Enum] = ["tasks"]


def add_task_routes(
    r: APIRouter, prefix: str, backend: Backend, waker: ClaimWaker, notify_enqueues: bool
) -> None:
    """Add the routes of {prefix}/tasks to `r`. With `notify_enqueues`, the enqueue route
    itself wakes claimers (for backends without an enqueue listener).

    Routes are added straight to the app's router (no `include_router`): FastAPI matches
    routes one by one, and nested routers make every request pay for that twice.
    """
    P = prefix

    @r.post(
        P + "/tasks", tags=TAGS, response_model=TaskRecord, status_code=201, summary="Create a task"
    )
    def create_task(spec: TaskSpec) -> Response:
        return encode.record(backend.create_task(spec), 201)

    @r.post(
        P + "/tasks/wait",
        tags=TAGS,
        response_model=list[TaskRecord],
        summary="Wait until a task's status differs from the one given (long poll)",
    )
    async def wait_for_status_change(body: WaitRequest) -> Response:
        # Each look is one indexed read in the threadpool; between looks the request
        # only sleeps on the event loop, so many waiting controllers hold no threads.
        deadline = time.monotonic() + body.wait_s
        while True:
            changed = await run_in_threadpool(backend.wait_for_status_change, body.known, wait_s=0)
            remaining = deadline - time.monotonic()
            if changed or remaining <= 0:
                return encode.records(changed, TaskRecord)
            await asyncio.sleep(min(remaining, STATUS_POLL_INTERVAL_S))

    @r.get(P + "/tasks/{task_id}", tags=TAGS, response_model=TaskRecord, summary="Get a task")
    def get_task(task_id: str) -> Response:
        return encode.record(backend.get_task(task_id))

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
        status_code=204,
        responses=NO_CONTENT,
        summary="Delete a task",
    )
    def delete_task(task_id: str, force: bool = False) -> Response:
        backend.delete_task(task_id, force=force)
        return encode.no_content()

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
        P + "/tasks/{task_id}/log",
        tags=TAGS,
        response_model=LogAppendReply,
        summary="Append log lines",
    )
    def append_log(task_id: str, body: LogAppendRequest) -> Response:
        length = backend.append_log(task_id, body.lines)
        return encode.record(LogAppendReply(length=length))

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

    @r.get(
        P + "/tasks/{task_id}/scalars",
        tags=TAGS,
        response_model=list[Scalar],
        summary="Read scalars",
    )
    def get_scalars(task_id: str, title: str | None = None, series: str | None = None) -> Response:
        return encode.records(backend.get_scalars(task_id, title=title, series=series), Scalar)

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
