"""Queues, the atomic claim, workers, heartbeats and lease expiry for SqlBackend.

A claim reads the next queue entry and turns its task in_progress in one transaction.
On PostgreSQL the entry is selected `FOR UPDATE SKIP LOCKED`, so concurrent claimers
each take a different task without waiting for each other; on SQLite `BEGIN IMMEDIATE`
makes claims take turns. A claim first checks, without any lock, whether the queues hold
anything, so idle claimers polling an empty queue never take the write lock.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from controller.backend import MAX_CLAIM_WAIT_S
from controller.errors import ConflictError, InvalidInputError, NotFoundError
from controller.models import (
    DEFAULT_LEASE_S,
    QUEUE_NAME_PATTERN,
    HeartbeatReply,
    QueueInfo,
    StatusReason,
    TaskRecord,
    TaskStatus,
    WorkerInfo,
    check_worker_id,
)
from controller.store import schema
from controller.store.engine import NOTIFY_CHANNEL, Prepared, prepared
from controller.store.records import dumps, row_to_record

if TYPE_CHECKING:  # pragma: no cover
    from controller.store.sql import SqlBackend

T = schema.tasks
QE = schema.queue_entries
W = schema.workers

#: How often a waiting claimer re-checks the queues (covers enqueues by other processes).
CLAIM_POLL_INTERVAL_S = 0.01
#: Expired leases are swept at most this often by one client.
LEASE_SWEEP_INTERVAL_S = 1.0
MAX_LEASE_S = 86_400.0
#: How long a client trusts that a queue it saw still exists (claims skip the look-up).
KNOWN_QUEUE_TTL_S = 5.0
_ACTIVE = (TaskStatus.in_progress.value, TaskStatus.stopping.value)

_queue_name_re = re.compile(QUEUE_NAME_PATTERN)


def check_queue_name(name: Any) -> str:
    """Return `name` if it is a valid queue name, else raise InvalidInputError."""
    if not isinstance(name, str) or not _queue_name_re.match(name):
        raise InvalidInputError(
            f"invalid queue name {name!r}: 1-128 letters, digits, '_', '.', ':' or '-'",
            field="queue",
        )
    return name


def _check_lease(lease_s: Any) -> float:
    if not isinstance(lease_s, int | float) or not 0 < lease_s <= MAX_LEASE_S:
        raise InvalidInputError(f"lease_s must be in (0, {MAX_LEASE_S:.0f}], got {lease_s!r}", field="lease_s")
    return float(lease_s)


def _check_worker(worker_id: Any) -> str:
    try:
        return check_worker_id(worker_id)
    except ValueError as exc:
        raise InvalidInputError(str(exc), field="worker_id") from None


class QueueingMixin:
    """Queue, claim and worker operations of SqlBackend."""

    # ---------------------------------------------------------------- queues
    def create_queue(self: SqlBackend, name: str) -> QueueInfo:
        """Create a queue (ConflictError if it exists)."""
        check_queue_name(name)
        with self._write() as conn:
            if conn.execute(sa.select(schema.queues.c.name).where(schema.queues.c.name == name)).first():
                raise ConflictError(f"queue {name!r} already exists", field="name")
            conn.execute(schema.queues.insert().values(name=name, created_at=time.time()))
        return self.get_queue(name)

    def _queue_infos(self: SqlBackend, conn: sa.Connection, name: str | None = None) -> list[QueueInfo]:
        Q = schema.queues
        query = (
            sa.select(Q.c.name, Q.c.created_at, sa.func.count(QE.c.seq), sa.func.min(QE.c.enqueued_at))
            .select_from(Q.outerjoin(QE, QE.c.queue == Q.c.name))
            .group_by(Q.c.name, Q.c.created_at)
            .order_by(Q.c.name)
        )
        if name is not None:
            query = query.where(Q.c.name == name)
        return [
            QueueInfo(name=r[0], created_at=r[1], length=r[2], oldest_queued_at=r[3])
            for r in conn.execute(query)
        ]

    def list_queues(self: SqlBackend) -> list[QueueInfo]:
        """Every queue with its length, by name."""
        with self._read() as conn:
            return self._queue_infos(conn)

    def get_queue(self: SqlBackend, name: str) -> QueueInfo:
        """One queue; NotFoundError if unknown."""
        with self._read() as conn:
            infos = self._queue_infos(conn, name)
        if not infos:
            raise NotFoundError(f"no queue named {name!r}", field="queue")
        return infos[0]

    def _require_queue(self: SqlBackend, conn: sa.Connection, name: str, *, cached: bool = False) -> None:
        """NotFoundError unless the queue exists. `cached`: trust a recent positive answer."""
        check_queue_name(name)
        if cached and time.monotonic() - self._known_queues.get(name, -1e9) < KNOWN_QUEUE_TTL_S:
            return
        Q = schema.queues
        if conn.execute(sa.select(Q.c.name).where(Q.c.name == name)).first() is None:
            raise NotFoundError(f"no queue named {name!r}", field="queue")
        self._known_queues[name] = time.monotonic()

    def delete_queue(self: SqlBackend, name: str, *, force: bool = False) -> None:
        """Delete a queue; a non-empty queue needs `force` (its tasks go back to created)."""
        with self._write() as conn:
            self._require_queue(conn, name)
            waiting = [r.task_id for r in conn.execute(sa.select(QE.c.task_id).where(QE.c.queue == name))]
            if waiting and not force:
                raise ConflictError(
                    f"queue {name!r} holds {len(waiting)} task(s): dequeue them or delete with force",
                    field="name",
                )
            for task_id in waiting:
                self._change_status(
                    conn, task_id, TaskStatus.created, StatusReason.dequeued, f"queue {name} was deleted"
                )
            conn.execute(schema.queues.delete().where(schema.queues.c.name == name))
        self._known_queues.pop(name, None)

    def enqueue(
        self: SqlBackend, task_id: str, queue: str | None = None, *, priority: int | None = None
    ) -> TaskRecord:
        """Put a created (or finished: a re-run) task on a queue."""
        if priority is not None and (not isinstance(priority, int) or abs(priority) > 1_000_000):
            raise InvalidInputError(f"priority must be an integer within ±1000000, got {priority!r}", field="priority")
        with self._write() as conn:
            row = self._row(conn, task_id, for_update=True)
            body = json.loads(row.body)
            execution = body.setdefault("execution", {})
            queue_name = queue or execution.get("queue") or "default"
            self._require_queue(conn, queue_name, cached=True)
            prio = priority if priority is not None else int(execution.get("priority") or 0)
            execution.update(queue=queue_name, priority=prio)
            body.setdefault("runtime", {}).pop("exit_code", None)
            row = self._change_status(
                conn, task_id, TaskStatus.queued, StatusReason.enqueued, f"enqueued on {queue_name}",
                body=body,
            )
            _INSERT_ENTRY.run(
                conn, dict(task_id=task_id, queue=queue_name, priority=prio, enqueued_at=time.time())
            )
            if self.dialect == "postgresql":
                _NOTIFY.run(conn, {"queue": queue_name})
        record = row_to_record(row)
        self._listener.fire(queue_name)
        return record

    def dequeue(self: SqlBackend, task_id: str) -> TaskRecord:
        """Take a queued task off its queue, back to created."""
        with self._write() as conn:
            row = self._row(conn, task_id, for_update=True)
            if row.status != TaskStatus.queued.value:
                raise ConflictError(f"task {task_id} is {row.status}, not queued", field="status")
            row = self._change_status(conn, task_id, TaskStatus.created, StatusReason.dequeued, "dequeued")
            return row_to_record(row)

    def queue_tasks(self: SqlBackend, name: str) -> list[TaskRecord]:
        """The tasks waiting in a queue, in the order they will be claimed."""
        with self._read() as conn:
            self._require_queue(conn, name)
            query = (
                sa.select(T)
                .join(QE, QE.c.task_id == T.c.id)
                .where(QE.c.queue == name)
                .order_by(QE.c.priority.desc(), QE.c.seq)
            )
            return [row_to_record(r) for r in conn.execute(query)]

    # ----------------------------------------------------------------- claim
    def claim(
        self: SqlBackend,
        queues: Sequence[str],
        worker_id: str,
        *,
        wait_s: float = 0.0,
        lease_s: float = DEFAULT_LEASE_S,
    ) -> TaskRecord | None:
        """Atomically take the next task and mark it in_progress, owned by `worker_id`."""
        if isinstance(queues, str) or not isinstance(queues, Sequence) or not queues:
            raise InvalidInputError("queues must be a non-empty list of queue names", field="queues")
        queues = list(dict.fromkeys(check_queue_name(q) for q in queues))
        _check_worker(worker_id)
        lease_s = _check_lease(lease_s)
        if not isinstance(wait_s, int | float) or not 0 <= wait_s <= MAX_CLAIM_WAIT_S:
            raise InvalidInputError(f"wait_s must be in [0, {MAX_CLAIM_WAIT_S:.0f}], got {wait_s!r}", field="wait_s")
        with self._read() as conn:
            for name in queues:
                self._require_queue(conn, name, cached=True)
        deadline = time.monotonic() + wait_s
        polling = False
        while True:
            generation = self._work_generation
            self.sweep_expired_leases_if_due()
            record = self._try_claim(queues, worker_id, lease_s, look_first=polling)
            polling = True
            remaining = deadline - time.monotonic()
            if record is not None or remaining <= 0:
                return record
            with self._work_arrived:
                if self._work_generation == generation:
                    self._work_arrived.wait(min(remaining, CLAIM_POLL_INTERVAL_S))

    _work_generation = 0

    def _wake_waiters(self: SqlBackend, _queue: str) -> None:
        with self._work_arrived:
            self._work_generation += 1
            self._work_arrived.notify_all()

    def add_enqueue_listener(self: SqlBackend, callback: Any) -> None:
        """Call `callback(queue_name)` after each enqueue (other processes too on PostgreSQL)."""
        self._listener.add(callback)

    def _try_claim(
        self: SqlBackend, queues: list[str], worker_id: str, lease_s: float, *, look_first: bool
    ) -> TaskRecord | None:
        """One claim attempt. `look_first`: check without locks that there is anything to
        take before taking the write lock (for repeated polls of likely-empty queues)."""
        params = {f"q{i}": q for i, q in enumerate(queues)}
        if look_first:
            with self._read() as conn:
                if _any_queued(len(queues)).run(conn, params).first() is None:
                    return None
        take_next = _take_next(self.dialect == "postgresql")
        with self._write() as conn:
            for queue in queues:  # one indexed look-up per queue, in the given order
                entry = take_next.run(conn, {"queue": queue}).first()
                if entry is not None:
                    break
            else:
                return None
            row = self._change_status(
                conn, entry.task_id, TaskStatus.in_progress, StatusReason.claimed,
                f"claimed by worker {worker_id} from queue {entry.queue}",
                worker_id=worker_id, lease_s=lease_s, drop_queue_entry=False,
            )
            return row_to_record(row)

    # ----------------------------------------------------------------- leases
    def sweep_expired_leases_if_due(self: SqlBackend) -> None:
        """Run `expire_leases` if it has not run in this client for a while."""
        now = time.monotonic()
        if now - self._last_sweep < LEASE_SWEEP_INTERVAL_S:
            return
        self._last_sweep = now
        self.expire_leases()

    def expire_leases(self: SqlBackend) -> list[str]:
        """Fail every active task whose lease expired; returns their ids."""
        now = time.time()
        expired = sa.and_(T.c.status.in_(_ACTIVE), T.c.lease_expires_at < now)
        with self._read() as conn:
            if conn.execute(sa.select(T.c.id).where(expired).limit(1)).first() is None:
                return []
        done: list[str] = []
        with self._write() as conn:
            query = sa.select(T).where(expired)
            if self.dialect == "postgresql":
                query = query.with_for_update(skip_locked=True)
            for row in conn.execute(query).all():
                target = TaskStatus.failed if row.status == TaskStatus.in_progress.value else TaskStatus.stopped
                self._change_status(
                    conn, row.id, target, StatusReason.lease_expired,
                    f"worker {row.worker} was lost: no heartbeat for "
                    f"{now - row.lease_expires_at:.1f} s after its lease expired",
                )
                done.append(row.id)
        return done

    # ---------------------------------------------------------------- workers
    def register_worker(
        self: SqlBackend, worker_id: str, *, hostname: str = "", queues: Sequence[str] = (), slots: int = 1
    ) -> WorkerInfo:
        """Register (or re-register) a worker."""
        _check_worker(worker_id)
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
            if conn.execute(sa.select(W.c.id).where(W.c.id == worker_id)).first():
                conn.execute(W.update().where(W.c.id == worker_id).values(registered_at=now, **values))
            else:
                conn.execute(W.insert().values(id=worker_id, registered_at=now, resources="{}", **values))
        return self._worker_info(worker_id)

    def heartbeat(
        self: SqlBackend,
        worker_id: str,
        *,
        resources: Mapping[str, Any] | None = None,
        current_tasks: Sequence[str] | None = None,
        lease_s: float = DEFAULT_LEASE_S,
    ) -> HeartbeatReply:
        """Mark a worker alive, extend the leases of its tasks, return tasks to abort.

        Tasks to abort: those of this worker in status stopping, and any task the worker
        says it runs that it no longer holds (lease expired, reset, deleted).
        """
        _check_worker(worker_id)
        lease_s = _check_lease(lease_s)
        if resources is not None and not isinstance(resources, Mapping):
            raise InvalidInputError("resources must be an object", field="resources")
        if current_tasks is not None and (isinstance(current_tasks, str) or not isinstance(current_tasks, Sequence)):
            raise InvalidInputError("current_tasks must be a list of task ids", field="current_tasks")
        now = time.time()
        with self._write() as conn:
            if conn.execute(sa.select(W.c.id).where(W.c.id == worker_id)).first() is None:
                raise NotFoundError(f"no worker {worker_id!r} is registered", field="worker_id")
            values: dict[str, Any] = {"last_seen": now}
            if resources is not None:
                values["resources"] = dumps(dict(resources))
            conn.execute(W.update().where(W.c.id == worker_id).values(**values))
            mine = sa.and_(T.c.worker == worker_id, T.c.status.in_(_ACTIVE))
            conn.execute(T.update().where(mine).values(lease_expires_at=now + lease_s))
            abort = {r.id for r in conn.execute(sa.select(T.c.id).where(mine, T.c.status == TaskStatus.stopping.value))}
            if current_tasks:
                held = {r.id for r in conn.execute(sa.select(T.c.id).where(mine, T.c.id.in_(list(current_tasks))))}
                abort |= set(current_tasks) - held
        return HeartbeatReply(abort=sorted(abort), lease_s=lease_s)

    def unregister_worker(self: SqlBackend, worker_id: str) -> None:
        """Forget a worker (its tasks keep their leases until they expire)."""
        with self._write() as conn:
            if conn.execute(W.delete().where(W.c.id == worker_id)).rowcount == 0:
                raise NotFoundError(f"no worker {worker_id!r} is registered", field="worker_id")

    def _worker_info(self: SqlBackend, worker_id: str) -> WorkerInfo:
        infos = self._worker_infos(worker_id)
        if not infos:
            raise NotFoundError(f"no worker {worker_id!r} is registered", field="worker_id")
        return infos[0]

    def _worker_infos(self: SqlBackend, worker_id: str | None = None) -> list[WorkerInfo]:
        with self._read() as conn:
            query = sa.select(W).order_by(W.c.id)
            if worker_id is not None:
                query = query.where(W.c.id == worker_id)
            rows = conn.execute(query).all()
            running: dict[str, list[str]] = {}
            active = sa.select(T.c.worker, T.c.id).where(T.c.status.in_(_ACTIVE), T.c.worker.isnot(None))
            for r in conn.execute(active.order_by(T.c.started_at)):
                running.setdefault(r.worker, []).append(r.id)
        return [
            WorkerInfo(
                id=r.id, hostname=r.hostname, queues=json.loads(r.queues), slots=r.slots,
                registered_at=r.registered_at, last_seen=r.last_seen,
                resources=json.loads(r.resources), current_tasks=running.get(r.id, []),
            )
            for r in rows
        ]

    def list_workers(self: SqlBackend) -> list[WorkerInfo]:
        """Registered workers with last-seen time and current tasks."""
        return self._worker_infos()


def _queue_params(count: int) -> list[sa.BindParameter]:
    return [sa.bindparam(f"q{i}") for i in range(count)]


def _any_queued(count: int) -> Prepared:
    """SELECT one entry of the queues :q0..:qN (no lock): is there anything to claim?"""
    return prepared(
        ("any_queued", count),
        lambda: sa.select(QE.c.seq).where(QE.c.queue.in_(_queue_params(count))).limit(1),
    )


def _take_next(skip_locked: bool) -> Prepared:
    """DELETE the next entry of queue :queue (highest priority, then oldest); return its task."""

    def build() -> sa.Executable:
        query = (
            sa.select(QE.c.seq)
            .where(QE.c.queue == sa.bindparam("queue"))
            .order_by(QE.c.priority.desc(), QE.c.seq)
            .limit(1)
        )
        if skip_locked:
            query = query.with_for_update(skip_locked=True)
        return QE.delete().where(QE.c.seq == query.scalar_subquery()).returning(QE.c.task_id, QE.c.queue)

    return prepared(("take_next", skip_locked), build)


_INSERT_ENTRY = Prepared(
    QE.insert().values({c: sa.bindparam(c) for c in ("task_id", "queue", "priority", "enqueued_at")})
)
_NOTIFY = Prepared(sa.select(sa.func.pg_notify(NOTIFY_CHANNEL, sa.bindparam("queue"))))
