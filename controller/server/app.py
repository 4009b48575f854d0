"""The Conveyor HTTP API: every Backend operation under /api/v1, served by uvicorn,
and the web dashboard at `/` (`controller.server.dashboard`).

`create_app(backend, token)` builds the FastAPI application around any Backend;
`serve(host, port, db_url, token)` opens a SqlBackend and runs it (one process).

Errors keep the Backend's meaning: a ConveyorError is answered with its own HTTP status
and `to_json()` body, so `HttpBackend` raises the very same exception class. Input that
fails validation is answered with 422 `invalid_input` naming the field at fault, and
nothing is changed; so is text the databases cannot store (NUL characters, lone
surrogates) anywhere in a path, query or JSON body (`controller.server.input_checks`), on
SQLite and PostgreSQL alike. A 5xx (a bug, or the store unavailable) carries a generic
message and an error id that the server logs with the details and the traceback; never
exception text or server paths. Long-polling claims wait on wake-ups fired by the
Backend's enqueue listener (see `controller.server.waker`); a background task sweeps
expired leases, the first time one default lease after start.

One path per operation: every request goes through its FastAPI route (`routes_*.py`),
whose request body is a pydantic model of `controller.server.schemas`; the route calls
the Backend in FastAPI's threadpool (plain `def` routes) and answers with the record
serialized by pydantic (`controller.server.encode`).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import ipaddress
import logging
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

import controller
from controller.backend import Backend
from controller.connect import conveyor_home
from controller.errors import ConveyorError
from controller.models import DEFAULT_LEASE_S
from controller.server.dashboard import (
    add_dashboard_routes,
    is_dashboard_path,
    unauthorized_page,
)
from controller.server.error_bodies import (
    conveyor_error_body,
    one_line,
    server_error_body,
    validation_body,
    value_error_body,
)
from controller.server.files import MAX_FILE_BYTES, add_file_routes, remove_task_files
from controller.server.input_checks import refuse_unstorable_text
from controller.server.middleware import (
    MAX_BODY_BYTES,
    BodyLimitMiddleware,
    InternalErrorMiddleware,
    TokenAuthMiddleware,
)
from controller.server.routes_pipelines import add_pipeline_routes
from controller.server.routes_queues import add_queue_routes, add_worker_routes
from controller.server.routes_tasks import add_task_routes
from controller.server.waker import ClaimWaker

log = logging.getLogger("conveyor.server")

API_PREFIX = "/api/v1"
#: Seconds between two sweeps of expired leases.
LEASE_SWEEP_S = 2.0
#: Seconds from the server's start to its first lease sweep: one default lease, so that
#: agents that ran tasks while the server was down (their leases lapsed meanwhile) can
#: reconnect and renew them with a heartbeat before anything is failed as lost.
FIRST_LEASE_SWEEP_AFTER_S = DEFAULT_LEASE_S
#: Seconds between two polls for work enqueued by other processes (see waker.py).
CLAIM_POLL_S = 0.1


# ------------------------------------------------------------ error handlers
def _conveyor_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ConveyorError)
    if exc.http_status >= 500:
        body = server_error_body(request.method, request.url.path, exc)
    else:
        body = conveyor_error_body(exc)
    return JSONResponse(status_code=exc.http_status, content=body)


def _request_validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return JSONResponse(status_code=422, content=validation_body(exc.errors()))


def _value_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, (ValueError, OverflowError))
    return JSONResponse(status_code=422, content=value_error_body(exc))


def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    where = f"{request.method} {request.url.path}"
    if exc.status_code == 404:
        body = {"error": "not_found", "message": f"no such endpoint: {where}"}
    elif exc.status_code == 405:
        body = {"error": "method_not_allowed", "message": f"method not allowed: {where}"}
    else:
        body = {"error": "http_error", "message": one_line(str(exc.detail))}
    return JSONResponse(status_code=exc.status_code, content=body, headers=exc.headers)


# ------------------------------------------------------------------- lifespan
async def _sweep_leases(backend: Backend, every_s: float, first_after_s: float) -> None:
    """Fail tasks whose lease expired: first `first_after_s` after start, then every
    `every_s`; an error is logged once per outage and the sweeping goes on."""
    failures = 0
    wait_s = first_after_s
    while True:
        await asyncio.sleep(wait_s)
        wait_s = every_s
        try:
            expired = await run_in_threadpool(backend.expire_leases)
            if expired:
                log.info("lease sweep failed %d task(s): %s", len(expired), ", ".join(expired))
            failures = 0
        except Exception as exc:  # keep sweeping; say it once per outage
            failures += 1
            if failures == 1:
                log.warning("lease sweep failed: %s", exc)


def create_app(
    backend: Backend,
    token: str | None = None,
    *,
    lease_sweep_s: float = LEASE_SWEEP_S,
    first_lease_sweep_after_s: float = FIRST_LEASE_SWEEP_AFTER_S,
    claim_poll_s: float = CLAIM_POLL_S,
    max_body_bytes: int = MAX_BODY_BYTES,
    files_dir: Path | str | None = None,
    max_file_bytes: int = MAX_FILE_BYTES,
    dashboard: bool = True,
    public_url: str | None = None,
) -> FastAPI:
    """The FastAPI application exposing `backend` under /api/v1.

    With `token`, every request (the OpenAPI schema and /docs included) must present it
    as `Authorization: Bearer <token>` or the cookie `conveyor_token`; `?token=` only on
    the dashboard's entry page `/`, which trades it for the cookie (see
    `controller.server.middleware.TokenAuthMiddleware`).
    Expired leases are swept every `lease_sweep_s` seconds, the first time
    `first_lease_sweep_after_s` after start (one default lease: a restarted server
    gives agents that kept running meanwhile time to heartbeat before their tasks
    count as lost); `lease_sweep_s <= 0` disables the background lease sweep.

    The files endpoint (`controller.server.files`) stores files under `files_dir`
    (default `$CONVEYOR_HOME/files` of the server process), up to `max_file_bytes` each;
    its uploads are streamed, so `max_body_bytes` does not apply to them. Deleting a
    task removes its folder there.

    `public_url` is the address people and code outside Conveyor reach the server by
    (`controller serve --public-url`); `/info` tells it to the dashboard and the SDK.

    `dashboard` serves the web dashboard at `/` (see `controller.server.dashboard`);
    its extra JSON endpoints (`/pipelines`, `/info`, `/statuses`) are always there.

    Long-polling claims are woken through the Backend's enqueue listener
    (`add_enqueue_listener(callback)`, which a SqlBackend has: it hears other processes'
    enqueues too on PostgreSQL); for a Backend without one, the enqueue route wakes them.
    """
    waker = ClaimWaker()
    add_listener = getattr(backend, "add_enqueue_listener", None)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        waker.attach(asyncio.get_running_loop())
        registered = False
        if callable(add_listener):
            add_listener(waker.notify_threadsafe)
            registered = True
        tasks = [asyncio.create_task(waker.run_ticker(claim_poll_s))]
        if lease_sweep_s > 0:
            sweep = _sweep_leases(backend, lease_sweep_s, first_lease_sweep_after_s)
            tasks.append(asyncio.create_task(sweep))
        try:
            yield
        finally:
            waker.close()
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            remove = getattr(backend, "remove_enqueue_listener", None)
            if registered and callable(remove):
                remove(waker.notify_threadsafe)

    options: dict[str, Any] = {}
    if "telemetry" in inspect.signature(FastAPI).parameters:
        # Built-in OpenTelemetry hooks (FastAPI >= 0.16x) cost ~30 µs a request even
        # when no exporter is configured.
        options["telemetry"] = {"tracing": False, "metrics": False, "logs": False}
    app = FastAPI(
        title="Conveyor API",
        version=controller.__version__,
        description="Task store, queues and workers of Conveyor.",
        lifespan=lifespan,
        # Text no database can store (NUL, lone surrogates) is 422 on every route, once.
        dependencies=[Depends(refuse_unstorable_text)],
        **options,
    )
    app.state.backend = backend
    app.state.waker = waker
    notify_enqueues = not callable(add_listener)
    # Starlette tries routes in this order: the agents' frequent calls first.
    add_worker_routes(app.router, API_PREFIX, backend, waker)
    files_root = Path(files_dir) if files_dir is not None else conveyor_home() / "files"
    add_task_routes(
        app.router, API_PREFIX, backend, waker, notify_enqueues, closing=lambda: waker.closed,
        on_deleted=lambda record: remove_task_files(files_root, record),
    )
    add_queue_routes(app.router, API_PREFIX, backend)
    app.state.files_dir = files_root
    add_file_routes(app.router, API_PREFIX, files_root, max_file_bytes)
    add_pipeline_routes(
        app.router, API_PREFIX, backend, files_root.resolve().as_uri(), public_url or ""
    )
    if dashboard:
        add_dashboard_routes(app.router)

    app.add_exception_handler(ConveyorError, _conveyor_error)
    app.add_exception_handler(RequestValidationError, _request_validation_error)
    app.add_exception_handler(ValueError, _value_error)
    app.add_exception_handler(OverflowError, _value_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)

    # Middlewares: the last added runs first (bugs → auth → body limit → FastAPI).
    app.add_middleware(
        BodyLimitMiddleware, limit=max_body_bytes, exempt_prefixes=(API_PREFIX + "/files/",)
    )
    if token:
        app.add_middleware(
            TokenAuthMiddleware,
            token=token,
            is_page=is_dashboard_path if dashboard else None,
            unauthorized_page=unauthorized_page,
        )
    app.add_middleware(InternalErrorMiddleware)
    return app


# ---------------------------------------------------------------------- serve
def is_loopback_host(host: str) -> bool:
    """True if `host` (an address or name to listen on) is reachable only from this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name (or "" / "0.0.0.0"-like wildcard): assume it is reachable


def open_access_warning(host: str, token: str | None) -> str | None:
    """The warning `serve` prints when it listens on a non-loopback address without a
    token (anyone who reaches the port may run code on the agents), else None."""
    if token or is_loopback_host(host):
        return None
    return (
        f"WARNING: serving on {host or '*'} (not a loopback address) without an API token: "
        "anyone who can reach this port can read and change every task and run code on "
        "the agents. Set --token or $CONVEYOR_API_TOKEN, or listen on 127.0.0.1."
    )


def redact_url(url: str) -> str:
    """`url` with any password replaced by ***."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def serve(
    host: str,
    port: int,
    db_url: str,
    token: str | None,
    log_level: str = "warning",
    *,
    files_dir: Path | str | None = None,
    public_url: str | None = None,
) -> None:
    """Run the API server on host:port over the store at `db_url` until SIGINT/SIGTERM.

    One process; uvloop and httptools are used when installed (uvicorn's choice). Several
    processes may serve the same PostgreSQL store (behind a load balancer, or agents
    split between them): a claim waiting on one is woken by an enqueue on another. On
    shutdown, waiting claims answer null and status waits their empty list at once
    instead of holding the exit for up to a minute.
    """
    import uvicorn

    from controller.store import SqlBackend

    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.WARNING))
    backend = SqlBackend(db_url)
    app = create_app(backend, token, files_dir=files_dir, public_url=public_url)
    waker: ClaimWaker = app.state.waker

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            waker.close_threadsafe()

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        loop="auto",
        http="auto",
        lifespan="on",
        access_log=log_level in ("debug", "trace", "info"),
        timeout_keep_alive=65,
        timeout_graceful_shutdown=10,
        server_header=False,
    )
    warning = open_access_warning(host, token)
    if warning:  # printed like the lines below, whatever the log level
        print(warning, file=sys.stderr, flush=True)
    auth = "token required" if token else "no token"
    print(
        f"Conveyor API on http://{host}:{port} ({auth}; store {redact_url(db_url)}; "
        f"files in {app.state.files_dir})",
        file=sys.stderr,
        flush=True,
    )
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    shown = public_url.rstrip("/") if public_url else f"http://{shown_host}:{port}"
    print(
        f"Dashboard on {shown}/" + ("?token=<token>" if token else ""),
        file=sys.stderr,
        flush=True,
    )
    try:
        _Server(config).run()
    finally:
        backend.close()
