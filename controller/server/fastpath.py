"""A fast path for the hot endpoints, in front of the FastAPI routes.

Agents call claim, enqueue, status, heartbeat, log and scalars many times a second.
FastAPI's routing and dependency machinery costs more per request than the work itself,
so this pure-ASGI layer serves the *happy path* of those endpoints directly: it parses
the body with the very same request models (`controller.server.schemas`), calls the
Backend with the app's runner (inline on SQLite, else on a few threads: see
`create_app`) and sends the pre-serialized record. Over PostgreSQL, enqueue, claim and
status reports first try their one statement on the event loop (`hot`, see
`controller.server.hotpath`).

Anything else, and anything unusual (another content type, a body that does not
validate, an unknown path), is replayed to the full FastAPI application, which produces
the canonical answer (422 with the field at fault, 404, ...). The two paths therefore
answer identically; `create_app(fast_path=False)` turns this layer off.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pydantic
import pydantic_core
from anyio import CancelScope
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from controller.backend import Backend
from controller.errors import ConveyorError
from controller.models import TaskRecord
from controller.server import encode
from controller.server.error_bodies import conveyor_error_body, value_error_body
from controller.server.hotpath import GENERAL, AsyncHotCalls
from controller.server.schemas import (
    ClaimRequest,
    EnqueueRequest,
    HeartbeatRequest,
    LogAppendReply,
    LogAppendRequest,
    ScalarsRequest,
    StatusRequest,
)
from controller.server.waker import ClaimWaker, Runner, long_poll_claim, run_inline

_JSON_HEADERS = [(b"content-type", b"application/json")]
_FALL_THROUGH = object()
#: Larger requests (big log batches) run in the threadpool even on SQLite.
INLINE_MAX_BODY_BYTES = 256 * 1024
M = TypeVar("M", bound=pydantic.BaseModel)


class _Unparsed(Exception):
    """The body does not validate: FastAPI will say why."""


def _parse(model: type[M], body: bytes) -> M:
    try:
        return model.model_validate_json(body)
    except pydantic.ValidationError:
        raise _Unparsed() from None


class FastPath:
    """Serve claim/enqueue/status/heartbeat/log/scalars/get-task/health without FastAPI."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        backend: Backend,
        waker: ClaimWaker,
        prefix: str,
        notify_enqueues: bool,
        health: bytes,
        run: Runner = run_in_threadpool,
        hot: AsyncHotCalls | None = None,
    ) -> None:
        self.app = app
        self.hot = hot
        self.backend = backend
        self.waker = waker
        self.prefix = prefix
        self.notify_enqueues = notify_enqueues
        self.health = health
        self._run = run
        self._inline = run is run_inline
        self._task_posts: dict[str, Callable[..., Awaitable[Any]]] = {
            "enqueue": self._enqueue,
            "status": self._status,
            "log": self._log,
            "scalars": self._scalars,
        }

    # ------------------------------------------------------------- dispatch
    def _route(self, method: str, path: str) -> tuple[Callable[..., Awaitable[Any]], str] | None:
        """The handler for (method, path) and its path parameter, or None."""
        if not path.startswith(self.prefix):
            return None
        parts = path[len(self.prefix) :].split("/")
        n = len(parts)
        if n < 2 or parts[0] != "":
            return None
        head = parts[1]
        if method == "POST":
            if n == 2 and head == "claim":
                return self._claim, ""
            if n == 4 and head == "tasks" and parts[2]:
                handler = self._task_posts.get(parts[3])
                return (handler, parts[2]) if handler else None
            if n == 4 and head == "workers" and parts[2] and parts[3] == "heartbeat":
                return self._heartbeat, parts[2]
        elif method == "GET":
            if n == 2 and head == "health":
                return self._health, ""
            if n == 3 and head == "tasks" and parts[2]:
                return self._get_task, parts[2]
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = self._route(scope["method"], scope["path"])
        if route is None:
            await self.app(scope, receive, send)
            return
        handler, param = route
        body = b""
        if scope["method"] == "POST":
            chunks: list[bytes] = []
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client went away
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    break
            body = b"".join(chunks)
            if body and not _is_json(scope):
                await self._replay(scope, receive, send, body)
                return
        run = self._run
        if self._inline and len(body) > INLINE_MAX_BODY_BYTES:
            run = run_in_threadpool
        try:
            result = await handler(param, body, receive, run)
        except _Unparsed:
            await self._replay(scope, receive, send, body)  # FastAPI names the field
            return
        except ConveyorError as exc:
            await _send(send, exc.http_status, pydantic_core.to_json(conveyor_error_body(exc)))
            return
        except (ValueError, OverflowError) as exc:
            await _send(send, 422, pydantic_core.to_json(value_error_body(exc)))
            return
        if result is _FALL_THROUGH:
            await self._replay(scope, receive, send, body)
            return
        status, content = result
        await _send(send, status, content)

    async def _replay(self, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        """Hand the request, body included, to the FastAPI application."""
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    # ------------------------------------------------------------- handlers
    async def _health(
        self, _: str, body: bytes, receive: Receive, run: Runner
    ) -> tuple[int, bytes]:
        return 200, self.health

    async def _get_task(
        self, task_id: str, body: bytes, receive: Receive, run: Runner
    ) -> tuple[int, bytes]:
        rec = await run(self.backend.get_task, task_id)
        return 200, rec.model_dump_json().encode()

    async def _claim(self, _: str, body: bytes, receive: Receive, run: Runner) -> Any:
        if not body:
            return _FALL_THROUGH
        req = _parse(ClaimRequest, body)

        async def is_disconnected() -> bool:
            return await _client_gone(receive)

        hot = self.hot
        attempt = None
        if hot is not None:

            async def attempt() -> TaskRecord | None:
                rec = await hot.claim(req.queues, req.worker_id, req.lease_s)
                if rec is GENERAL:
                    rec = await run(self.backend.claim, req.queues, req.worker_id, wait_s=0, lease_s=req.lease_s)
                return rec

        rec = await long_poll_claim(
            self.backend,
            self.waker,
            req.queues,
            req.worker_id,
            wait_s=req.wait_s,
            lease_s=req.lease_s,
            is_disconnected=is_disconnected,
            run=run,
            attempt=attempt,
        )
        return 200, (encode.NULL if rec is None else rec.model_dump_json().encode())

    async def _enqueue(self, task_id: str, body: bytes, receive: Receive, run: Runner) -> Any:
        req = _parse(EnqueueRequest, body) if body else EnqueueRequest()
        rec = GENERAL if self.hot is None else await self.hot.enqueue(task_id, req.queue, req.priority)
        if rec is GENERAL:
            rec = await run(self.backend.enqueue, task_id, req.queue, priority=req.priority)
        if self.notify_enqueues:
            self.waker.notify_threadsafe(None)
        return 200, rec.model_dump_json().encode()

    async def _status(self, task_id: str, body: bytes, receive: Receive, run: Runner) -> Any:
        if not body:
            return _FALL_THROUGH
        req = _parse(StatusRequest, body)
        rec = GENERAL
        if self.hot is not None:
            rec = await self.hot.set_status(
                task_id, req.status, reason=req.reason, message=req.message, worker_id=req.worker_id
            )
        if rec is GENERAL:
            rec = await run(
                lambda: self.backend.set_status(
                    task_id, req.status, reason=req.reason, message=req.message, worker_id=req.worker_id
                )
            )
        return 200, rec.model_dump_json().encode()

    async def _log(self, task_id: str, body: bytes, receive: Receive, run: Runner) -> Any:
        if not body:
            return _FALL_THROUGH
        req = _parse(LogAppendRequest, body)
        length = await run(self.backend.append_log, task_id, req.lines)
        return 200, LogAppendReply(length=length).model_dump_json().encode()

    async def _scalars(self, task_id: str, body: bytes, receive: Receive, run: Runner) -> Any:
        if not body:
            return _FALL_THROUGH
        req = _parse(ScalarsRequest, body)
        await run(self.backend.report_scalars, task_id, req.scalars)
        return 204, b""

    async def _heartbeat(self, worker_id: str, body: bytes, receive: Receive, run: Runner) -> Any:
        if not body:
            return _FALL_THROUGH
        req = _parse(HeartbeatRequest, body)
        reply = await run(
            lambda: self.backend.heartbeat(
                worker_id,
                resources=req.resources,
                current_tasks=req.current_tasks,
                lease_s=req.lease_s,
            )
        )
        return 200, reply.model_dump_json().encode()


def _is_json(scope: Scope) -> bool:
    """True if the request says its body is JSON (as FastAPI decides it)."""
    for key, value in scope.get("headers", ()):
        if key == b"content-type":
            kind = value.split(b";", 1)[0].strip().lower()
            return kind == b"application/json" or (
                kind.startswith(b"application/") and kind.endswith(b"+json")
            )
    return False


async def _client_gone(receive: Receive) -> bool:
    """True if the client closed the connection (a non-blocking look at `receive`)."""
    message: Message = {}
    with CancelScope() as scope:
        scope.cancel()
        message = await receive()
    return message.get("type") == "http.disconnect"


async def _send(send: Send, status: int, content: bytes) -> None:
    if status == 204:
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return
    headers = [*_JSON_HEADERS, (b"content-length", str(len(content)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": content})
