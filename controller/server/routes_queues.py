"""Queue, claim, worker, lease and health endpoints."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

import controller
from controller.backend import Backend
from controller.models import HeartbeatReply, QueueInfo, TaskRecord, WorkerInfo
from controller.server import encode
from controller.server.routes_tasks import NO_CONTENT
from controller.server.schemas import (
    ClaimRequest,
    Health,
    HeartbeatRequest,
    QueueCreateRequest,
    WorkerRegisterRequest,
)
from controller.server.waker import ClaimWaker, long_poll_claim

HEALTH_JSON = Health(version=controller.__version__).model_dump_json().encode()


def add_worker_routes(r: APIRouter, prefix: str, backend: Backend, waker: ClaimWaker) -> None:
    """Add the routes of {prefix}/claim, /workers and /leases to `r`.

    Starlette tries routes in the order they were added: `create_app` adds these (the
    calls every agent makes all the time: claim, heartbeat) before the others.
    """
    P = prefix

    # ----------------------------------------------------------------- claim
    @r.post(
        P + "/claim",
        response_model=TaskRecord | None,
        tags=["queues"],
        summary="Claim the next task (long-poll up to wait_s; null if nothing came)",
    )
    async def claim(body: ClaimRequest, request: Request) -> Response:
        rec = await long_poll_claim(
            backend,
            waker,
            body.queues,
            body.worker_id,
            wait_s=body.wait_s,
            lease_s=body.lease_s,
            is_disconnected=request.is_disconnected,
        )
        return encode.record(rec)

    @r.post(
        P + "/workers/{worker_id}/heartbeat",
        response_model=HeartbeatReply,
        tags=["workers"],
        summary="Mark a worker alive, extend its leases, get tasks to abort",
    )
    def heartbeat(worker_id: str, body: HeartbeatRequest) -> Response:
        reply = backend.heartbeat(
            worker_id,
            resources=body.resources,
            current_tasks=body.current_tasks,
            lease_s=body.lease_s,
        )
        return encode.record(reply)

    # --------------------------------------------------------------- workers
    @r.post(
        P + "/workers", response_model=WorkerInfo, tags=["workers"], summary="Register a worker"
    )
    def register_worker(body: WorkerRegisterRequest) -> Response:
        info = backend.register_worker(
            body.worker_id, hostname=body.hostname, queues=body.queues, slots=body.slots
        )
        return encode.record(info)

    @r.delete(
        P + "/workers/{worker_id}",
        status_code=204,
        responses=NO_CONTENT,
        tags=["workers"],
        summary="Unregister a worker",
    )
    def unregister_worker(worker_id: str) -> Response:
        backend.unregister_worker(worker_id)
        return encode.no_content()

    @r.get(
        P + "/workers", response_model=list[WorkerInfo], tags=["workers"], summary="List workers"
    )
    def list_workers() -> Response:
        return encode.records(backend.list_workers(), WorkerInfo)

    # ---------------------------------------------------------------- leases
    @r.post(
        P + "/leases/expire",
        response_model=list[str],
        tags=["workers"],
        summary="Fail active tasks whose lease expired; returns their ids",
    )
    def expire_leases() -> Response:
        return encode.records(backend.expire_leases(), str)


def add_queue_routes(r: APIRouter, prefix: str, backend: Backend) -> None:
    """Add the routes of {prefix}/queues and /health to `r`."""
    P = prefix

    # ---------------------------------------------------------------- queues
    @r.post(
        P + "/queues",
        response_model=QueueInfo,
        status_code=201,
        tags=["queues"],
        summary="Create a queue",
    )
    def create_queue(body: QueueCreateRequest) -> Response:
        return encode.record(backend.create_queue(body.name), 201)

    @r.get(P + "/queues", response_model=list[QueueInfo], tags=["queues"], summary="List queues")
    def list_queues() -> Response:
        return encode.records(backend.list_queues(), QueueInfo)

    @r.get(P + "/queues/{name}", response_model=QueueInfo, tags=["queues"], summary="Get a queue")
    def get_queue(name: str) -> Response:
        return encode.record(backend.get_queue(name))

    @r.delete(
        P + "/queues/{name}",
        status_code=204,
        responses=NO_CONTENT,
        tags=["queues"],
        summary="Delete a queue",
    )
    def delete_queue(name: str, force: bool = False) -> Response:
        backend.delete_queue(name, force=force)
        return encode.no_content()

    @r.get(
        P + "/queues/{name}/tasks",
        response_model=list[TaskRecord],
        tags=["queues"],
        summary="Tasks waiting in a queue, in claim order",
    )
    def queue_tasks(name: str) -> Response:
        return encode.records(backend.queue_tasks(name), TaskRecord)

    # ---------------------------------------------------------------- health
    @r.get(P + "/health", response_model=Health, tags=["health"], summary="Liveness and version")
    async def health() -> Response:
        return Response(content=HEALTH_JSON, media_type=encode.JSON)
