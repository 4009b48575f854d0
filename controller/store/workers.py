"""Workers, heartbeats and leases.

A claim gives the claiming worker a lease on the task; heartbeats extend it; a task
whose lease ran out is failed (`expire_leases`), so a lost worker never holds a task
forever.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa

from controller.errors import (
    InvalidInputError,
    NotFoundError,
)
from controller.models import (
    DEFAULT_LEASE_S,
    HeartbeatReply,
    StatusReason,
    TaskStatus,
    WorkerInfo,
)
from controller.store import schema
from controller.store.core import StoreCore, check_lease, check_queue_name, check_worker
from controller.store.queues import _SELECT_QUEUE, _enqueue_params, _enqueue_update
from controller.store.records import corrupt_record_error, dumps
from controller.store.status import status_columns
from controller.transitions import Operation, transition

T = schema.tasks
W = schema.workers


class WorkerOperations(StoreCore):
    """Workers, heartbeats and lease expiry."""

    def expire_leases(self) -> list[str]:
        """Fail every active task whose lease expired; returns their ids.

        The message says how long the worker has been silent (since its last heartbeat,
        or since it claimed the task if it never sent one)."""
        now = time.time()
        expired = sa.and_(schema.IS_ACTIVE, T.c.lease_expires_at < now)
        with self._read() as conn:
            if conn.execute(sa.select(T.c.id).where(expired).limit(1)).first() is None:
                return []
        done: list[str] = []
        with self._write() as conn:
            query = (
                sa.select(T.c.id, T.c.status, T.c.worker, T.c.started_at, W.c.last_seen)
                .select_from(T.outerjoin(W, W.c.id == T.c.worker))
                .where(expired)
            )
            if self.dialect == "postgresql":
                query = query.with_for_update(of=T, skip_locked=True)
            for row in conn.execute(query).all():
                heard_at = max(t for t in (row.last_seen, row.started_at, 0.0) if t is not None)
                self._end_for_worker(
                    conn, row, Operation.expire, StatusReason.lease_expired,
                    f"worker {row.worker} was lost: not heard from for {now - heard_at:.1f} s "
                    "(since its last heartbeat or its claim), longer than its lease",
                )
                done.append(row.id)
        return done

    def _end_for_worker(self, conn: sa.Connection, row: Any, operation: Operation, reason: str, message: str) -> None:
        """End an active task its worker no longer runs: in_progress → failed,
        stopping → stopped (by `operation`: expire or reconcile).

        A failed task whose `runtime.resume` budget is not used up (a pipeline started
        on a queue: `auto_count` < `auto_max`) is then put back on its queue to resume
        (reason "resume", `pending` "auto"); the history keeps both changes."""
        target = TaskStatus.failed if row.status == TaskStatus.in_progress.value else TaskStatus.stopped
        self._change_status(conn, row.id, transition(operation, target), reason, message)
        if target == TaskStatus.failed:
            self._resume_lost_controller(conn, row.id, message)

    def _resume_lost_controller(self, conn: sa.Connection, task_id: str, lost: str) -> None:
        """Re-enqueue a failed pipeline controller task while its resume budget lasts."""
        task = conn.execute(sa.select(T.c.body, T.c.queue).where(T.c.id == task_id)).first()
        body = json.loads(task.body)
        budget = (body.get("runtime") or {}).get("resume")
        if not isinstance(budget, dict):
            return
        count, limit = int(budget.get("auto_count") or 0), int(budget.get("auto_max") or 0)
        queue = task.queue or "default"
        if count >= limit or conn.execute(_SELECT_QUEUE, {"name": queue}).first() is None:
            return
        body["runtime"]["resume"] = {**budget, "auto_count": count + 1, "pending": "auto"}
        values = status_columns(
            transition(Operation.rerun, TaskStatus.queued), "resume",
            f"its controller was lost ({lost}); put back on queue {queue} to resume "
            f"(automatic resume {count + 1} of {limit})")
        values["body"] = dumps(body)
        row = conn.execute(_enqueue_update(rerun=True), _enqueue_params(task_id, queue, None, values)).first()
        if row is not None:
            self._changed(conn, row)

    # ---------------------------------------------------------------- workers
    def register_worker(
        self, worker_id: str, *, hostname: str = "", queues: Sequence[str] = (), slots: int = 1
    ) -> WorkerInfo:
        """Register (or re-register) a worker.

        A worker registers when it starts, so tasks still held under its id belong to a
        previous run that is gone (a restart with the same id): they end at once, failed
        (stopped if an abort was on the way) with reason `worker_restarted`."""
        check_worker(worker_id)
        if isinstance(queues, str):
            raise InvalidInputError("queues must be a list of queue names", field="queues")
        queue_names = [check_queue_name(q) for q in queues]
        if not isinstance(slots, int) or not 1 <= slots <= 10_000:
            raise InvalidInputError(f"slots must be an integer in 1..10000, got {slots!r}", field="slots")
        if not isinstance(hostname, str) or len(hostname) > 256:
            raise InvalidInputError("hostname must be a string of at most 256 characters", field="hostname")
        now = time.time()
        values = dict(hostname=hostname, queues=dumps(queue_names), slots=slots, last_seen=now)
        with self._write() as conn:
            held = sa.select(T.c.id, T.c.status).where(T.c.worker == worker_id, schema.IS_ACTIVE)
            for row in conn.execute(held).all():
                self._end_for_worker(
                    conn, row, Operation.reconcile, StatusReason.worker_restarted,
                    f"worker {worker_id} registered again (a new run of it started), so the "
                    "run that held this task is gone",
                )
            if conn.execute(sa.select(W.c.id).where(W.c.id == worker_id)).first():
                conn.execute(W.update().where(W.c.id == worker_id).values(registered_at=now, **values))
            else:
                conn.execute(W.insert().values(id=worker_id, registered_at=now, resources="{}", **values))
        return self._worker_info(worker_id)

    def heartbeat(
        self,
        worker_id: str,
        *,
        resources: Mapping[str, Any] | None = None,
        current_tasks: Sequence[str] | None = None,
        lease_s: float = DEFAULT_LEASE_S,
    ) -> HeartbeatReply:
        """Mark a worker alive, extend the leases of its tasks, return tasks to abort.

        With `current_tasks` (the tasks the worker runs), only those leases are
        extended; a task the store holds for the worker that it does not list ends at
        once, failed with reason `worker_restarted` -- unless it was claimed after the
        worker's previous heartbeat arrived: this heartbeat's list may have been taken
        before the claim returned. Without `current_tasks`, every lease of the worker is
        extended.

        Tasks to abort: those of this worker in status stopping, and any task the worker
        says it runs that it no longer holds (lease expired, reset, deleted).
        """
        check_worker(worker_id)
        lease_s = check_lease(lease_s)
        if resources is not None and not isinstance(resources, Mapping):
            raise InvalidInputError("resources must be an object", field="resources")
        if current_tasks is not None and (isinstance(current_tasks, str) or not isinstance(current_tasks, Sequence)):
            raise InvalidInputError("current_tasks must be a list of task ids", field="current_tasks")
        listed = None if current_tasks is None else [str(t) for t in current_tasks]
        now = time.time()
        with self._write() as conn:
            previous = conn.execute(sa.select(W.c.last_seen).where(W.c.id == worker_id)).first()
            if previous is None:
                raise NotFoundError(f"no worker {worker_id!r} is registered", field="worker_id")
            values: dict[str, Any] = {"last_seen": now}
            if resources is not None:
                values["resources"] = dumps(dict(resources))
            conn.execute(W.update().where(W.c.id == worker_id).values(**values))
            mine = sa.and_(T.c.worker == worker_id, schema.IS_ACTIVE)
            if listed is not None:
                unlisted = sa.and_(mine, T.c.id.notin_(listed), T.c.started_at < previous.last_seen)
                for row in conn.execute(sa.select(T.c.id, T.c.status).where(unlisted)).all():
                    self._end_for_worker(
                        conn, row, Operation.reconcile, StatusReason.worker_restarted,
                        f"worker {worker_id} no longer runs this task (its heartbeat does not "
                        "list it: the worker restarted or lost it)",
                    )
            conn.execute(T.update().where(mine).values(lease_expires_at=now + lease_s))
            abort = {r.id for r in conn.execute(sa.select(T.c.id).where(mine, T.c.status == TaskStatus.stopping.value))}
            if listed:
                held = {r.id for r in conn.execute(sa.select(T.c.id).where(mine, T.c.id.in_(listed)))}
                abort |= set(listed) - held
        return HeartbeatReply(abort=sorted(abort), lease_s=lease_s)

    def unregister_worker(self, worker_id: str) -> None:
        """Forget a worker (its tasks keep their leases until they expire)."""
        with self._write() as conn:
            if conn.execute(W.delete().where(W.c.id == worker_id)).rowcount == 0:
                raise NotFoundError(f"no worker {worker_id!r} is registered", field="worker_id")

    def _worker_info(self, worker_id: str) -> WorkerInfo:
        infos = self._worker_infos(worker_id)
        if not infos:
            raise NotFoundError(f"no worker {worker_id!r} is registered", field="worker_id")
        return infos[0]

    def _worker_infos(self, worker_id: str | None = None) -> list[WorkerInfo]:
        with self._read() as conn:
            query = sa.select(W).order_by(W.c.id)
            if worker_id is not None:
                query = query.where(W.c.id == worker_id)
            rows = conn.execute(query).all()
            running: dict[str, list[str]] = {}
            active = sa.select(T.c.worker, T.c.id).where(schema.IS_ACTIVE, T.c.worker.isnot(None))
            for r in conn.execute(active.order_by(T.c.started_at)):
                running.setdefault(r.worker, []).append(r.id)
        return [self._worker_info_of(r, running.get(r.id, [])) for r in rows]

    @staticmethod
    def _worker_info_of(row: Any, current_tasks: list[str]) -> WorkerInfo:
        try:
            return WorkerInfo(
                id=row.id, hostname=row.hostname, queues=json.loads(row.queues), slots=row.slots,
                registered_at=row.registered_at, last_seen=row.last_seen,
                resources=json.loads(row.resources), current_tasks=current_tasks,
            )
        except ValueError as exc:  # damaged JSON columns (ValidationError is a ValueError)
            raise corrupt_record_error(f"worker {row.id}", exc) from exc

    def list_workers(self) -> list[WorkerInfo]:
        """Registered workers with last-seen time and current tasks."""
        return self._worker_infos()
