"""Wake-ups of long-polling claimers: one claim attempt per piece of possible work.

A claimer that found nothing waits on a future registered for each of its queues. Three
things resolve such futures, each waking ONE waiter of a queue (the longest waiting), so
a hundred idle agents do not all hit the store for every task:

- an enqueue: the Backend's enqueue listener calls `notify_threadsafe(queue)` from
  whatever thread committed it (a threadpool worker of this server, or the LISTEN thread
  that hears about enqueues by other processes on PostgreSQL, other `controller serve`
  processes included); the call hops onto the event loop with
  `loop.call_soon_threadsafe`. One enqueue is one task, so one waiter is enough;
- a poll tick every `poll_s` (enqueues by other processes that SQLite cannot announce):
  one waiter per queue that has waiters tries, whatever the number of waiters;
- a baton: a claimer that was woken by a tick (an unknown amount of work) or that got a
  wake-up while its own attempt succeeded passes the wake-up on to the next waiter, so a
  burst of tasks is drained at once instead of one per tick.

A claimer registers its future *before* it tries to claim, so an enqueue that commits
during the attempt is not missed: the next wait returns at once. This is the server's
one waiting mechanism for claims: the attempts are `backend.claim(wait_s=0)` calls in
FastAPI's threadpool, and a waiting claimer holds no thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager

from starlette.concurrency import run_in_threadpool

from controller.backend import Backend
from controller.models import TaskRecord

#: Why a waiter was woken: one enqueued task, or possibly several (tick, baton).
ENQUEUED = "enqueued"
MAYBE_MORE = "maybe_more"
CLOSED = "closed"
_FINAL = "final"


class ClaimWaker:
    """Per-queue FIFO sets of waiter futures; each wake-up resolves one of them."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        # queue name → waiters in arrival order (a dict used as an ordered set)
        self._waiters: dict[str, dict[asyncio.Future[str], None]] = {}
        self.closed = False

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Bind to the running event loop (called from the app's lifespan)."""
        self._loop = loop
        self.closed = False

    def notify_threadsafe(self, queue: str | None = None) -> None:
        """A task was enqueued on `queue` (None: somewhere). Safe from any thread."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        # Nobody waits on that queue: nothing to wake, so no hop onto the loop (most
        # enqueues, and every NOTIFY the LISTEN thread hears). Not racy: the enqueue is
        # committed before this call, and a claimer registers before it tries to claim,
        # so one that registers after this check finds the task by itself.
        waiters = self._waiters
        if not (waiters if queue is None else waiters.get(queue)):
            return
        try:
            if queue is None:
                loop.call_soon_threadsafe(self._wake_all, MAYBE_MORE)
            else:
                loop.call_soon_threadsafe(self.wake_one, queue, ENQUEUED)
        except RuntimeError:  # the loop closed between the check and the call
            pass

    def close(self) -> None:
        """Wake every claimer for good (server shutdown). Call on the loop's thread."""
        self.closed = True
        self._wake_all(CLOSED)

    def close_threadsafe(self) -> None:
        """`close()` from any thread or a signal handler."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self.close)
        except RuntimeError:
            pass

    def wake_one(self, queue: str, reason: str) -> bool:
        """Resolve the longest-waiting future on `queue`; False if none was waiting."""
        for fut in self._waiters.get(queue, ()):
            if not fut.done():
                fut.set_result(reason)
                return True
        return False

    def _wake_all(self, reason: str) -> None:
        for group in list(self._waiters.values()):
            for fut in group:
                if not fut.done():
                    fut.set_result(reason)

    def tick(self) -> None:
        """One poll: let one waiter of every queue try (work from other processes)."""
        for queue in list(self._waiters):
            self.wake_one(queue, MAYBE_MORE)

    async def run_ticker(self, poll_s: float) -> None:
        """Call `tick()` every `poll_s` seconds while there are waiters (until cancelled)."""
        while True:
            await asyncio.sleep(poll_s)
            if self._waiters:
                self.tick()

    @contextmanager
    def watch(self, queues: Sequence[str]) -> Iterator[asyncio.Future[str]]:
        """A future resolved (with a reason) by the next wake-up on one of `queues`."""
        loop = self._loop or asyncio.get_running_loop()
        fut: asyncio.Future[str] = loop.create_future()
        if self.closed:
            fut.set_result(CLOSED)
        for name in queues:
            self._waiters.setdefault(name, {})[fut] = None
        try:
            yield fut
        finally:
            for name in queues:
                group = self._waiters.get(name)
                if group is not None:
                    group.pop(fut, None)
                    if not group:
                        del self._waiters[name]
            if not fut.done():
                fut.cancel()

    def waiting(self) -> int:
        """How many claimers wait right now (for tests and diagnostics)."""
        return len({id(f) for group in self._waiters.values() for f in group})


async def long_poll_claim(
    backend: Backend,
    waker: ClaimWaker,
    queues: list[str],
    worker_id: str,
    *,
    wait_s: float,
    lease_s: float,
    is_disconnected: Callable[[], Awaitable[bool]],
) -> TaskRecord | None:
    """Claim the next task of `queues`, waiting up to `wait_s` seconds for one.

    Each attempt is a cheap non-blocking `backend.claim(wait_s=0)` in the threadpool;
    between attempts the claimer waits on the event loop for a wake-up (see the module
    doc), holding no thread. A client that went away gets no task: the claim would be
    lost until its lease expired.
    """

    async def attempt() -> TaskRecord | None:
        return await run_in_threadpool(
            backend.claim, queues, worker_id, wait_s=0, lease_s=lease_s
        )

    if wait_s <= 0:
        return await attempt()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    reason = ""  # why the previous wait ended ("" before the first attempt)
    while True:
        finished, result, pass_on = False, None, ""
        # Watch before trying, so that an enqueue during the attempt is not missed.
        with waker.watch(queues) as woken:
            if reason and await is_disconnected():
                finished, pass_on = True, reason  # hand our wake-up to someone else
            else:
                result = await attempt()
                if result is not None:
                    finished = True
                    if reason == MAYBE_MORE:
                        pass_on = MAYBE_MORE  # a burst may be waiting
                    elif woken.done():
                        pass_on = woken.result()  # a wake-up this attempt did not use
                elif reason == _FINAL or waker.closed or loop.time() >= deadline:
                    finished = True
                else:
                    done, _ = await asyncio.wait((woken,), timeout=deadline - loop.time())
                    reason = woken.result() if done else _FINAL  # one last try at the end
                    finished = reason == CLOSED
        if pass_on in (ENQUEUED, MAYBE_MORE):
            for name in queues:
                waker.wake_one(name, pass_on)
        if finished:
            return result
