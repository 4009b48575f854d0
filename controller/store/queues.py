"""Queues and claims.

A task is in a queue exactly while it is `queued` (see `schema`). A claim is one UPDATE
that picks the head of a queue in a subquery (highest priority, then lowest `queue_seq`)
and turns it in_progress. On PostgreSQL the head is selected `FOR UPDATE SKIP LOCKED`, so
concurrent claimers each take a different task without waiting for each other; on SQLite
writers take turns. A repeated claim (a poll) first checks, without any lock, whether the
queues hold anything, so idle claimers polling an empty queue never take the write lock.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa

from controller.backend import MAX_CLAIM_WAIT_S
from controller.errors import (
    ConflictError,
    IllegalTransitionError,
    InvalidInputError,
    NotFoundError,
)
from controller.models import (
    DEFAULT_LEASE_S,
    QueueInfo,
    StatusReason,
    TaskRecord,
    TaskStatus,
)
from controller.store import schema
from controller.store.core import StoreCore, check_lease, check_queue_name, check_worker
from controller.store.notify import queue_key
from controller.store.records import dumps, row_to_record
from controller.store.status import guard, set_clause, status_columns
from controller.transitions import Operation, transition

T = schema.tasks
#: How long a client trusts that a queue it saw still exists (claims skip the look-up).
KNOWN_QUEUE_TTL_S = 5.0
#: The queue of a task enqueued without one that has none of its own.
DEFAULT_QUEUE = "default"
#: Expired leases are swept at most this often by one client (before claims).
LEASE_SWEEP_INTERVAL_S = 1.0



class QueueOperations(StoreCore):
    """Queues, enqueue/dequeue and the atomic claim."""

    def create_queue(self, name: str) -> QueueInfo:
        """Create a queue (ConflictError if it exists)."""
        check_queue_name(name)
        with self._write() as conn:
            if conn.execute(sa.select(schema.queues.c.name).where(schema.queues.c.name == name)).first():
                raise ConflictError(f"queue {name!r} already exists", field="name")
            conn.execute(schema.queues.insert().values(name=name, created_at=time.time()))
        return self.get_queue(name)

    def _queue_infos(self, conn: sa.Connection, name: str | None = None) -> list[QueueInfo]:
        Q = schema.queues
        waiting = sa.and_(schema.IS_QUEUED, T.c.queue == Q.c.name)
        query = (
            sa.select(Q.c.name, Q.c.created_at, sa.func.count(T.c.id), sa.func.min(T.c.queued_at))
            .select_from(Q.outerjoin(T, waiting))
            .group_by(Q.c.name, Q.c.created_at)
            .order_by(Q.c.name)
        )
        if name is not None:
            query = query.where(Q.c.name == name)
        return [
            QueueInfo(name=r[0], created_at=r[1], length=r[2], oldest_queued_at=r[3])
            for r in conn.execute(query)
        ]

    def list_queues(self) -> list[QueueInfo]:
        """Every queue with its length, by name."""
        with self._read() as conn:
            return self._queue_infos(conn)

    def get_queue(self, name: str) -> QueueInfo:
        """One queue; NotFoundError if unknown."""
        with self._read() as conn:
            infos = self._queue_infos(conn, name)
        if not infos:
            raise NotFoundError(f"no queue named {name!r}", field="queue")
        return infos[0]

    def _require_queue(self, conn: sa.Connection, name: str) -> None:
        """NotFoundError unless the queue exists."""
        check_queue_name(name)
        if conn.execute(_SELECT_QUEUE, {"name": name}).first() is None:
            raise NotFoundError(f"no queue named {name!r}", field="queue")
        self._known_queues[name] = time.monotonic()

    def _require_queues(self, names: Sequence[str]) -> None:
        """NotFoundError unless every queue exists; trusts a recent positive answer."""
        unsure = self._unverified_queues(names)
        if unsure:
            with self._direct() as conn:
                for name in unsure:
                    self._require_queue(conn, name)

    def _unverified_queues(self, names: Sequence[str]) -> list[str]:
        """The queues of `names` not seen to exist in the last `KNOWN_QUEUE_TTL_S` seconds
        (claims check those with the database)."""
        now = time.monotonic()
        return [n for n in names if now - self._known_queues.get(n, -1e9) >= KNOWN_QUEUE_TTL_S]

    def delete_queue(self, name: str, *, force: bool = False) -> None:
        """Delete a queue; a non-empty queue needs `force` (its tasks go back to created)."""
        with self._write() as conn:
            self._require_queue(conn, name)
            waiting = [r.id for r in conn.execute(sa.select(T.c.id).where(schema.IS_QUEUED, T.c.queue == name))]
            if waiting and not force:
                raise ConflictError(
                    f"queue {name!r} holds {len(waiting)} task(s): dequeue them or delete with force",
                    field="name",
                )
            for task_id in waiting:
                self._change_status(conn, task_id, _DEQUEUE, StatusReason.dequeued, f"queue {name} was deleted")
            conn.execute(schema.queues.delete().where(schema.queues.c.name == name))
        self._known_queues.pop(name, None)

    def enqueue(
        self, task_id: str, queue: str | None = None, *, priority: int | None = None
    ) -> TaskRecord:
        """Put a created (or finished: a re-run) task on a queue (its own by default)."""
        current = row = None
        with self._direct() as conn:  # one connection for the look-up and the update
            if queue is None:  # which is its own queue, and is the task still created?
                lookup, params = self._task_queue_statement(task_id)
                current = conn.execute(lookup, params).first()
            fast = self._enqueue_statement(task_id, queue, priority, current=current)
            if fast is not None:
                row = conn.execute(fast[0], fast[1]).first()
                if row is not None:
                    self._changed(conn, row)
        if row is None:
            row = self._enqueue_in_transaction(task_id, queue, priority)
        return row_to_record(row)

    def _enqueue_statement(
        self, task_id: str, queue: str | None, priority: int | None, *, current: Any = None
    ) -> tuple[sa.Executable, dict[str, Any]] | None:
        """The one statement that enqueues in the common case (a created task onto an
        existing queue) and its parameters, or None when the common case cannot apply.

        With no `queue` named, the task goes on its own queue: `current` is then the
        task's status and queue as `_task_queue_statement` read them (None: no such task),
        and the statement also checks that the task's queue is still that one.

        The statement returns the task's new row, or nothing when the common case does
        not apply: then `enqueue` does it in general (or says why it cannot). Bad
        arguments raise InvalidInputError."""
        if priority is not None and (not isinstance(priority, int) or abs(priority) > 1_000_000):
            raise InvalidInputError(f"priority must be an integer within ±1000000, got {priority!r}", field="priority")
        own = queue is None
        if own:
            if current is None or current.status != TaskStatus.created.value:
                return None  # a re-run, or an error to explain: the general path
            queue = current.queue or DEFAULT_QUEUE
        check_queue_name(queue)
        values = status_columns(_ENQUEUE, StatusReason.enqueued, f"enqueued on {queue}")
        return _enqueue_update(rerun=False, own=own), _enqueue_params(task_id, queue, priority, values)

    def _task_queue_statement(self, task_id: str) -> tuple[sa.Executable, dict[str, Any]]:
        """The statement reading a task's status and queue (for `_enqueue_statement`)."""
        return _SELECT_STATUS_AND_QUEUE, {"id": task_id}

    def _enqueue_in_transaction(
        self, task_id: str, queue: str | None, priority: int | None
    ) -> sa.Row:
        """Enqueue in general: the task's own queue, a re-run, or the precise refusal."""
        with self._write() as conn:
            row = self._row(conn, task_id, for_update=True)
            queue_name = queue or row.queue or DEFAULT_QUEUE
            self._require_queue(conn, queue_name)
            current = TaskStatus(row.status)
            step = _RERUN if current in _RERUN.sources else _ENQUEUE
            if current not in step.sources:
                raise IllegalTransitionError(current.value, TaskStatus.queued.value, task_id)
            values = status_columns(step, StatusReason.enqueued, f"enqueued on {queue_name}")
            rerun = step is _RERUN
            if step.effects.clears_exit_code:  # a re-run starts without the previous run's exit code
                body = json.loads(row.body)
                body.setdefault("runtime", {}).pop("exit_code", None)
                values["body"] = dumps(body)
            params = _enqueue_params(task_id, queue_name, priority, values)
            row = conn.execute(_enqueue_update(rerun=rerun), params).first()
            if row is None:  # cannot happen while we hold the row; say so if it does
                raise ConflictError(f"task {task_id} changed while being enqueued; try again")
            return self._changed(conn, row)

    def dequeue(self, task_id: str) -> TaskRecord:
        """Take a queued task off its queue, back to created."""
        with self._write() as conn:
            row = self._row(conn, task_id, for_update=True)
            if row.status != TaskStatus.queued.value:
                raise ConflictError(f"task {task_id} is {row.status}, not queued", field="status")
            row = self._change_status(conn, task_id, _DEQUEUE, StatusReason.dequeued, "dequeued")
            return row_to_record(row)

    def queue_tasks(self, name: str) -> list[TaskRecord]:
        """The tasks waiting in a queue, in the order they will be claimed."""
        with self._read() as conn:
            self._require_queue(conn, name)
            query = (
                sa.select(*schema.RECORD_COLUMNS)
                .where(schema.IS_QUEUED, T.c.queue == name)
                .order_by(T.c.priority.desc(), T.c.queue_seq)
            )
            return [row_to_record(r) for r in conn.execute(query)]

    # ----------------------------------------------------------------- claim
    def claim(
        self,
        queues: Sequence[str],
        worker_id: str,
        *,
        wait_s: float = 0.0,
        lease_s: float = DEFAULT_LEASE_S,
    ) -> TaskRecord | None:
        """Atomically take the next task and mark it in_progress, owned by `worker_id`."""
        queues, lease_s = check_claim(queues, worker_id, lease_s)
        if not isinstance(wait_s, int | float) or not 0 <= wait_s <= MAX_CLAIM_WAIT_S:
            raise InvalidInputError(f"wait_s must be in [0, {MAX_CLAIM_WAIT_S:.0f}], got {wait_s!r}", field="wait_s")
        self._require_queues(queues)
        deadline = time.monotonic() + wait_s
        if wait_s <= 0:
            self.sweep_expired_leases_if_due()
            return self._try_claim(queues, worker_id, lease_s, look_first=False)
        with self._notifier.watch(queue_key(q) for q in queues) as watch:
            polling = False
            while True:
                self.sweep_expired_leases_if_due()
                record = self._try_claim(queues, worker_id, lease_s, look_first=polling)
                polling = True
                remaining = deadline - time.monotonic()
                if record is not None or remaining <= 0:
                    return record
                watch.wait(min(remaining, self._notifier.poll_interval_s))

    def sweep_expired_leases_if_due(self) -> None:
        """Run `expire_leases` if it has not run in this client for a while."""
        if not self._lease_sweep_due():
            return
        self._last_sweep = time.monotonic()
        self.expire_leases()

    def _lease_sweep_due(self) -> bool:
        """True if `claim` would sweep expired leases first (see LEASE_SWEEP_INTERVAL_S)."""
        return time.monotonic() - self._last_sweep >= LEASE_SWEEP_INTERVAL_S

    def add_enqueue_listener(self, callback: Callable[[str], None]) -> None:
        """Call `callback(queue_name)` after each enqueue (other processes too on PostgreSQL)."""
        self._notifier.add_enqueue_listener(callback)

    def remove_enqueue_listener(self, callback: Callable[[str], None]) -> None:
        """Stop calling a callback given to `add_enqueue_listener`."""
        self._notifier.remove_enqueue_listener(callback)

    def _try_claim(
        self, queues: list[str], worker_id: str, lease_s: float, *, look_first: bool
    ) -> TaskRecord | None:
        """One claim attempt. `look_first`: check without locks that there is anything to
        take before writing (for repeated polls of likely-empty queues)."""
        with self._direct() as conn:
            if look_first:
                params = {f"q{i}": q for i, q in enumerate(queues)}
                if conn.execute(_any_queued(len(queues)), params).first() is None:
                    return None
            for queue in queues:  # one statement per queue, in the given order
                claim_head, params = self._claim_statement(queue, worker_id, lease_s)
                row = conn.execute(claim_head, params).first()
                if row is not None:
                    return row_to_record(self._changed(conn, row))
        return None

    def _claim_statement(
        self, queue: str, worker_id: str, lease_s: float
    ) -> tuple[sa.Executable, dict[str, Any]]:
        """The one statement that claims the head of `queue` for `worker_id` and its
        parameters (arguments checked by `check_claim`). It returns the claimed task's
        row, or nothing when the queue is empty."""
        values = status_columns(
            _CLAIM, StatusReason.claimed,
            f"claimed by worker {worker_id} from queue {queue}",
            worker_id=worker_id, lease_s=lease_s,
        )
        params = {f"v_{k}": v for k, v in values.items()}
        params["queue_name"] = queue
        return _claim_head(self.dialect == "postgresql"), params


def check_claim(queues: Any, worker_id: Any, lease_s: Any) -> tuple[list[str], float]:
    """The claim's queue names (without repeats, in order) and lease, checked.
    InvalidInputError names the argument at fault."""
    if isinstance(queues, str) or not isinstance(queues, Sequence) or not queues:
        raise InvalidInputError("queues must be a non-empty list of queue names", field="queues")
    names = list(dict.fromkeys(check_queue_name(q) for q in queues))
    check_worker(worker_id)
    return names, check_lease(lease_s)


def _queue_params(count: int) -> list[sa.BindParameter]:
    return [sa.bindparam(f"q{i}") for i in range(count)]


@functools.cache
def _any_queued(count: int) -> sa.Executable:
    """SELECT one queued task of the queues :q0..:qN (no lock): is there anything to claim?"""
    return sa.select(T.c.id).where(schema.IS_QUEUED, T.c.queue.in_(_queue_params(count))).limit(1)


@functools.cache
def _claim_head(skip_locked: bool) -> sa.Executable:
    """UPDATE the head of queue :queue (highest priority, then oldest) to in_progress."""
    head = T.alias("head")
    query = (
        sa.select(head.c.id)
        .where(head.c.status == sa.literal_column("'queued'"), head.c.queue == sa.bindparam("queue_name"))
        .order_by(head.c.priority.desc(), head.c.queue_seq)
        .limit(1)
    )
    if skip_locked:
        query = query.with_for_update(skip_locked=True)
    values = set_clause(_CLAIM, status_columns(_CLAIM, "", "", worker_id="w"))
    return (
        T.update()
        .where(T.c.id == query.scalar_subquery(), guard(_CLAIM))
        .values(values)
        .returning(*schema.RECORD_COLUMNS)
    )



def _enqueue_params(
    task_id: str, queue: str, priority: int | None, values: Mapping[str, Any]
) -> dict[str, Any]:
    params = {f"v_{k}": v for k, v in values.items()}
    params.update(_id=task_id, queue_name=queue, queue_priority=priority)
    return params


@functools.cache
def _enqueue_update(*, rerun: bool, own: bool = False) -> sa.Executable:
    """UPDATE a task to queued on :queue, at the end of its priority's line.

    `rerun=False`: only from created (and :queue must exist), the hot path; with `own`,
    only if :queue is (still) the task's own queue. `rerun=True`: from a finished
    status, with a new body. :priority NULL keeps the task's priority.
    """

    priority = sa.func.coalesce(sa.bindparam("queue_priority", type_=sa.Integer), T.c.priority)
    line = T.alias("line")
    next_seq = (
        sa.select(sa.func.coalesce(sa.func.max(line.c.queue_seq), 0) + 1)
        .where(
            line.c.status == sa.literal_column("'queued'"),
            line.c.queue == sa.bindparam("queue_name"),
            line.c.priority == priority,
        )
        .scalar_subquery()
    )
    step = _RERUN if rerun else _ENQUEUE
    keys = list(status_columns(step, "", "").keys())
    if rerun:
        keys.append("body")
    values = set_clause(step, keys)
    # The effect `joins_queue`: the end of the line of its queue and priority.
    values.update(queue=sa.bindparam("queue_name"), priority=priority, queue_seq=next_seq)
    if rerun:
        condition = guard(step)
    else:
        queue_exists = sa.exists().where(schema.queues.c.name == sa.bindparam("queue_name"))
        condition = sa.and_(guard(step), queue_exists)
        if own:
            own_queue = sa.func.coalesce(T.c.queue, sa.literal_column(f"'{DEFAULT_QUEUE}'"))
            condition = sa.and_(condition, own_queue == sa.bindparam("queue_name"))
    return (
        T.update()
        .where(T.c.id == sa.bindparam("_id"), condition)
        .values(values)
        .returning(*schema.RECORD_COLUMNS)
    )



_ENQUEUE = transition(Operation.enqueue, TaskStatus.queued)
_RERUN = transition(Operation.rerun, TaskStatus.queued)
_DEQUEUE = transition(Operation.dequeue, TaskStatus.created)
_CLAIM = transition(Operation.claim, TaskStatus.in_progress)

_SELECT_STATUS_AND_QUEUE = sa.select(T.c.status, T.c.queue).where(T.c.id == sa.bindparam("id"))


_SELECT_QUEUE = sa.select(schema.queues.c.name).where(schema.queues.c.name == sa.bindparam("name"))
