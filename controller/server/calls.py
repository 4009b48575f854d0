"""How the API's hot routes call the Backend: on the event loop when its calls are
quick, otherwise in FastAPI's threadpool.

A thread hop (hand the call to a worker thread, wake it, wake the event loop with the
result) costs the server about 0.5 ms of CPU per request on a slow machine: more than
the one SQLite statement behind a status report, enqueue, claim attempt or task read
(0.1-0.5 ms, a local file and no network). A Backend says whether its calls are that
quick with `quick_calls` (`SqlBackend` on SQLite: yes; on PostgreSQL, where each
state change waits for a network round trip and the WAL flush, no). The routes that
call it this way are the one-statement operations agents make all the time; everything
else (multi-statement transactions, queries, log appends of any size) stays a plain
`def` route in the threadpool.

The trade-off on SQLite: while such a statement waits for the database's write lock
(another process in a write transaction, up to the store's busy timeout), the server's
event loop waits with it. SQLite writers take turns anyway, so only requests that do
not write (reads, idle long polls) are held up meanwhile.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from starlette.concurrency import run_in_threadpool

from controller.backend import Backend

R = TypeVar("R")


class StoreCall(Protocol):
    """`await call(fn, *args, **kwargs)`: run one Backend method, return its result."""

    def __call__(self, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> Awaitable[R]:
        """Run `fn(*args, **kwargs)` and return its result (or raise its exception)."""
        ...


async def _inline(fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> R:
    return fn(*args, **kwargs)


async def _in_thread(fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> R:
    return await run_in_threadpool(fn, *args, **kwargs)


def store_call(backend: Backend) -> StoreCall:
    """How to call `backend`'s quick one-statement operations from an async route: on
    the event loop if `backend.quick_calls`, else in the threadpool."""
    return _inline if backend.quick_calls else _in_thread
