"""The task state machine: which status changes are legal and what each one does.

Every change of a task's status is one `Transition`: an operation (enqueue, claim,
report, abort, reset, ...) that moves a task from one of its `sources` to its `target`
and has `Effects` on the task (worker, lease, timestamps, attempt counter, queue
membership, outputs). Every change also appends one line to the task's history.

This module is pure Python. The SQL store renders each transition into ONE guarded
UPDATE (`controller/store/status.py`): the guard is `status IN (sources)`, so the table
below is the one check of the status rules, applied atomically by the database.

Reset is an explicit operation (`Backend.reset_task`): `set_status(created)` only takes
a queued task off its queue and is refused (IllegalTransitionError) for a finished task,
so a status report never deletes a task's log or scalars.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from controller.models import TaskStatus

_S = TaskStatus
_TERMINAL = frozenset({_S.completed, _S.failed, _S.stopped})
_ACTIVE = frozenset({_S.in_progress, _S.stopping})


class Stamp(enum.Enum):
    """What a transition does to a timestamp (or the worker, or the lease)."""

    keep = "keep"
    set = "set"  # now (the worker: the one named in the call; the lease: now + lease_s)
    clear = "clear"


class Count(enum.Enum):
    """What a transition does to the attempt counter."""

    keep = "keep"
    increment = "increment"
    zero = "zero"


@dataclass(frozen=True)
class Effects:
    """What entering a status does to a task besides its status and history."""

    queued_at: Stamp = Stamp.keep
    started_at: Stamp = Stamp.keep
    finished_at: Stamp = Stamp.keep
    worker: Stamp = Stamp.keep
    lease: Stamp = Stamp.keep
    attempt: Count = Count.keep
    #: The task joins the end of its queue's line (it stays in the queue while queued).
    joins_queue: bool = False
    #: The previous run's exit code is dropped (a re-run).
    clears_exit_code: bool = False
    #: Log, scalars, artifacts, output models and runtime are deleted (a reset).
    clears_outputs: bool = False


class Operation(str, enum.Enum):
    """The operations that change a task's status (each a method of the Backend)."""

    enqueue = "enqueue"  # created → queued
    rerun = "rerun"  # finished → queued (enqueue of a finished task)
    dequeue = "dequeue"  # queued → created (also set_status(created), delete_queue)
    claim = "claim"  # queued → in_progress, held by a worker under a lease
    report = "report"  # set_status: a task's own report of where it is
    abort = "abort"  # abort_task
    expire = "expire"  # expire_leases: the worker was lost
    reconcile = "reconcile"  # heartbeat / register_worker: the worker no longer runs it
    reset = "reset"  # reset_task: back to created, outputs cleared


@dataclass(frozen=True)
class Transition:
    """One legal move: `operation` takes a task from any of `sources` to `target`."""

    operation: Operation
    sources: frozenset[TaskStatus]
    target: TaskStatus
    effects: Effects


_QUEUED = Effects(
    queued_at=Stamp.set, started_at=Stamp.clear, finished_at=Stamp.clear, worker=Stamp.clear,
    lease=Stamp.clear, joins_queue=True,
)
_STARTED = Effects(started_at=Stamp.set, finished_at=Stamp.clear, worker=Stamp.set, lease=Stamp.set,
                   attempt=Count.increment)
_FINISHED = Effects(finished_at=Stamp.set, lease=Stamp.clear)
_BACK_TO_CREATED = Effects(lease=Stamp.clear)
_RESET = Effects(
    queued_at=Stamp.clear, started_at=Stamp.clear, finished_at=Stamp.clear, worker=Stamp.clear,
    lease=Stamp.clear, attempt=Count.zero, clears_outputs=True,
)


def _t(operation: Operation, sources: Iterable[TaskStatus], target: TaskStatus, effects: Effects) -> Transition:
    return Transition(operation, frozenset(sources), target, effects)


#: Every legal status change, by operation and target status.
TRANSITIONS: tuple[Transition, ...] = (
    _t(Operation.enqueue, [_S.created], _S.queued, _QUEUED),
    _t(Operation.rerun, _TERMINAL, _S.queued, Effects(**{**_QUEUED.__dict__, "clears_exit_code": True})),
    _t(Operation.dequeue, [_S.queued], _S.created, _BACK_TO_CREATED),
    _t(Operation.claim, [_S.queued], _S.in_progress, _STARTED),
    # created → in_progress: a task started by a local script (Task.init) runs at once.
    _t(Operation.report, [_S.created, _S.queued], _S.in_progress, _STARTED),
    _t(Operation.report, [_S.in_progress], _S.stopping, Effects()),
    # A step may finish on its own while its abort is on the way.
    _t(Operation.report, _ACTIVE, _S.completed, _FINISHED),
    _t(Operation.report, [_S.created, _S.queued, *_ACTIVE], _S.failed, _FINISHED),
    _t(Operation.report, [_S.created, _S.queued, *_ACTIVE], _S.stopped, _FINISHED),
    _t(Operation.abort, [_S.created, _S.queued], _S.stopped, _FINISHED),
    _t(Operation.abort, [_S.in_progress], _S.stopping, Effects()),
    _t(Operation.expire, [_S.in_progress], _S.failed, _FINISHED),
    _t(Operation.expire, [_S.stopping], _S.stopped, _FINISHED),
    _t(Operation.reconcile, [_S.in_progress], _S.failed, _FINISHED),
    _t(Operation.reconcile, [_S.stopping], _S.stopped, _FINISHED),
    _t(Operation.reset, _TERMINAL, _S.created, _RESET),
)

_BY_KEY: dict[tuple[Operation, TaskStatus], Transition] = {(t.operation, t.target): t for t in TRANSITIONS}


def transition(operation: Operation, target: TaskStatus) -> Transition:
    """The transition `operation` makes to `target`; KeyError if there is none."""
    return _BY_KEY[(operation, TaskStatus(target))]


def report_transition(target: TaskStatus) -> Transition | None:
    """What `set_status(target)` does: a report, or for `created` a dequeue (for
    `queued`: an enqueue or a re-run, chosen by the current status; None here)."""
    if target == _S.created:
        return _BY_KEY[(Operation.dequeue, _S.created)]
    return _BY_KEY.get((Operation.report, target))


def finish_transition(target: TaskStatus) -> Transition | None:
    """What a final report (`finish_task(target)`) does: the same report transition as
    `set_status(target)`, for a finished status only (None for any other)."""
    if target not in _TERMINAL:
        return None
    return _BY_KEY[(Operation.report, target)]


#: status → the statuses it may change to, by any operation (for clients and docs).
LEGAL_TRANSITIONS: dict[TaskStatus, frozenset[TaskStatus]] = {
    status: frozenset(t.target for t in TRANSITIONS if status in t.sources) for status in TaskStatus
}
