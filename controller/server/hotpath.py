"""The hot agent calls of a PostgreSQL store, run on the server's event loop.

Enqueue, claim and status reports are one SQL statement each in the common case
(`SqlBackend.enqueue_statement`, `claim_statement`, `status_statement`). Over
PostgreSQL the server runs those statements on asyncio connections
(`controller.store.async_direct`) instead of handing each call to a thread: on a
2-core machine the thread hops cost more than the statement (see that module).

Everything beyond the common case (a queue not seen lately, a re-run, a refused status
change and its precise error) goes to the blocking `SqlBackend` method on a thread, so
both paths give the same answers: each method here returns `GENERAL` when the caller
must make the blocking call instead. So does an error of the statement itself (not of
the connection), which the blocking call then reports as it always would.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import psycopg

from controller.models import TaskRecord
from controller.store.async_direct import AsyncDirectConnections
from controller.store.engine import Prepared
from controller.store.queueing import check_claim
from controller.store.records import row_to_record

if TYPE_CHECKING:
    from controller.store.sql import SqlBackend

#: "Make the blocking Backend call instead" (see the module doc).
GENERAL: Any = object()


class AsyncHotCalls:
    """enqueue / claim / set_status of a PostgreSQL `SqlBackend`, on the event loop."""

    def __init__(self, backend: SqlBackend, connections: AsyncDirectConnections) -> None:
        self.backend = backend
        self.connections = connections

    async def enqueue(self, task_id: str, queue: str | None, priority: int | None) -> TaskRecord:
        """Like `backend.enqueue`; GENERAL unless it is the common case."""
        current = None
        if queue is None:  # the task's own queue (see `SqlBackend.enqueue`)
            current = await self._run(self.backend.task_queue_statement(task_id))
            if current is GENERAL:
                return GENERAL
        statement = self.backend.enqueue_statement(task_id, queue, priority, current=current)
        if statement is None:
            return GENERAL
        row = await self._run(statement)
        return GENERAL if row is None or row is GENERAL else self.backend.enqueued(row)

    async def claim(self, queues: list[str], worker_id: str, lease_s: float) -> TaskRecord | None:
        """Like `backend.claim(wait_s=0)`; GENERAL if a queue was not seen lately (the
        blocking call checks that it exists) or expired leases are due to be swept (the
        blocking call sweeps them first, about once a second)."""
        names, lease_s = check_claim(queues, worker_id, lease_s)
        if self.backend.unverified_queues(names) or self.backend.lease_sweep_due():
            return GENERAL
        for name in names:  # one statement per queue, in the given order
            row = await self._run(self.backend.claim_statement(name, worker_id, lease_s))
            if row is GENERAL:
                return GENERAL
            if row is not None:
                return row_to_record(row)
        return None

    async def set_status(
        self, task_id: str, status: str, *, reason: str, message: str, worker_id: str | None
    ) -> TaskRecord:
        """Like `backend.set_status`; GENERAL unless the common case applies."""
        statement = self.backend.status_statement(
            task_id, status, reason=reason, message=message, worker_id=worker_id
        )
        if statement is None:
            return GENERAL
        row = await self._run(statement)
        return GENERAL if row is None or row is GENERAL else row_to_record(row)

    async def _run(self, statement: tuple[Prepared, dict[str, Any]]) -> Any:
        """The statement's first row, None, or GENERAL if the statement failed (or has
        a parameter it cannot send: nothing was sent then)."""
        try:
            return await self.connections.run(*statement)
        except (psycopg.Error, TypeError):
            return GENERAL

    async def close(self) -> None:
        """Close the connections."""
        await self.connections.close()
