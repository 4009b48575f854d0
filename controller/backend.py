"""The Backend interface every client uses.

Two implementations: `controller.store.SqlBackend` (straight to SQLite/PostgreSQL) and
`controller.client.HttpBackend` (to a `controller serve` process). Both pass the same
contract tests: same results, same errors. This module imports neither;
`controller.connect` picks one from a URL (`CONVEYOR_API`).
"""

from __future__ import annotations

import abc
import re
from collections.abc import Mapping, Sequence
from typing import Any

from controller.models import (
    DEFAULT_LEASE_S,
    HeartbeatReply,
    LogLine,
    QueueInfo,
    Scalar,
    TaskRecord,
    TaskSpec,
    TaskStatus,
    WorkerInfo,
)

#: Longest a single claim call may wait for work, in seconds.
MAX_CLAIM_WAIT_S = 60.0
#: Most tasks one `wait_for_status_change` call may follow.
MAX_WATCHED_TASKS = 2000
#: Longest caller-chosen id of a log chunk (`append_log(..., batch_id=...)`).
MAX_LOG_BATCH_ID_CHARS = 64
_LOG_BATCH_ID_RE = re.compile(rf"[A-Za-z0-9_.:-]{{1,{MAX_LOG_BATCH_ID_CHARS}}}")


def check_log_batch_id(batch_id: str) -> str:
    """Return `batch_id` if it is a usable log batch id, else raise ValueError."""
    if not isinstance(batch_id, str) or not _LOG_BATCH_ID_RE.fullmatch(batch_id):
        raise ValueError(
            f"invalid log batch id {batch_id!r}: 1-{MAX_LOG_BATCH_ID_CHARS} characters "
            "from A-Z a-z 0-9 _ . : -"
        )
    return batch_id


_UNSET: Any = object()


class Backend(abc.ABC):
    """Everything a client can ask of the control plane."""

    url: str = ""

    # ----------------------------------------------------------------- tasks
    @abc.abstractmethod
    def create_task(self, spec: TaskSpec | Mapping[str, Any]) -> TaskRecord:
        """Create a task in status created and return it."""

    @abc.abstractmethod
    def get_task(self, task_id: str) -> TaskRecord:
        """Return one task; NotFoundError if there is none with that id."""

    @abc.abstractmethod
    def query_tasks(
        self,
        *,
        project: str | None = None,
        name: str | None = None,
        status: Sequence[TaskStatus | str] | TaskStatus | str | None = None,
        tags: Sequence[str] | None = None,
        parent: str | None = None,
        type: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[TaskRecord]:
        """Tasks matching every given filter (all `tags` present), newest first."""

    @abc.abstractmethod
    def edit_task(
        self, task_id: str, changes: Mapping[str, Any], *, force: bool = False
    ) -> TaskRecord:
        """Change definition fields of a task in status created.

        Nested records (script, container, execution, runtime) are merged key by key;
        hyperparams are merged by section; other fields are replaced. `force=True`
        allows the edit in any status: the running task itself uses it to record its
        script, parameters and outputs. ConflictError otherwise.
        """

    @abc.abstractmethod
    def clone_task(
        self,
        task_id: str,
        *,
        name: str | None = None,
        project: str | None = None,
        parent: str | None = _UNSET,
    ) -> TaskRecord:
        """A copy of the task's definition with a new id, in status created.

        The parent is kept unless given (None clears it). Outputs, logs and runtime are
        not copied.
        """

    @abc.abstractmethod
    def delete_task(self, task_id: str, *, force: bool = False) -> list[TaskRecord]:
        """Delete a task with its log and scalars; a pipeline with its steps (the tasks
        whose parent it is), all or none. An active task or step needs `force`.

        Returns the records deleted: the steps first, the task last."""

    @abc.abstractmethod
    def set_status(
        self,
        task_id: str,
        status: TaskStatus | str,
        *,
        reason: str = "",
        message: str = "",
        worker_id: str | None = None,
    ) -> TaskRecord:
        """Move a task to `status` if the status rules (`controller.transitions`) allow it.

        `queued` enqueues the task; `created` only takes a queued task off its queue and
        is refused for a finished task (that is `reset_task`, which deletes outputs: a
        status report never does). IllegalTransitionError (HTTP 409) names the current
        and requested status. With
        `worker_id`, the change is refused unless that worker holds the task, so a worker
        whose lease expired cannot overwrite what happened since.
        """

    @abc.abstractmethod
    def finish_task(
        self,
        task_id: str,
        status: TaskStatus | str,
        *,
        reason: str = "",
        message: str = "",
        worker_id: str | None = None,
        runtime: Mapping[str, Any] | None = None,
        log_lines: Sequence[LogLine | Mapping[str, Any] | str] = (),
        log_batch_id: str | None = None,
    ) -> TaskRecord:
        """A run's final report in one store operation: append `log_lines`, merge
        `runtime` into the task's runtime and move it to the finished `status`
        (completed, failed or stopped); returns the task as it is then.

        Each part is what its own call would do, in one transaction: the lines as
        `append_log(task_id, log_lines, batch_id=log_batch_id)` (a batch id already
        stored appends nothing), the runtime as
        `edit_task(task_id, {"runtime": runtime}, force=True)` (merged key by key), the
        status as `set_status(task_id, status, reason=..., message=..., worker_id=...)`.
        All or nothing: a refused status change (IllegalTransitionError, ConflictError
        for another worker, NotFoundError) or invalid input (InvalidInputError naming
        `log_lines`, `log_batch_id`, `runtime` or `status`) writes nothing.

        A retry is safe: a report whose `log_batch_id` is stored and whose status,
        reason, message (and worker) the task already has was applied, by an attempt
        whose answer was lost; it is answered with the task as it is, writing nothing.
        Without a batch id a second report of a finished status is refused
        (IllegalTransitionError), as a second `set_status` is.
        """

    @abc.abstractmethod
    def wait_for_status_change(
        self, known: Mapping[str, TaskStatus | str], *, wait_s: float = 0.0
    ) -> list[TaskRecord]:
        """The tasks of `known` (task id → the status the caller last saw) whose status is
        now different, waiting up to `wait_s` seconds for at least one to change.

        This is how a pipeline controller follows its steps without a polling tick: the
        call returns as soon as a step moves. NotFoundError if a task no longer exists.
        """

    # ----------------------------------------------------------- logs/metrics
    @abc.abstractmethod
    def append_log(
        self,
        task_id: str,
        lines: Sequence[LogLine | Mapping[str, Any] | str],
        *,
        batch_id: str | None = None,
    ) -> int:
        """Append lines to a task's log; returns the log's new length in lines.

        `batch_id` is a caller-chosen id of this chunk (1-64 characters from
        A-Z a-z 0-9 _ . : -, `check_log_batch_id`): a second call with the same task and
        batch id appends nothing and returns the log's current length, so a caller that
        did not get the answer can send the chunk again without doubling it. Without a
        batch id every call appends. Batch ids are forgotten with the log (reset, delete).
        """

    @abc.abstractmethod
    def get_log(
        self, task_id: str, *, offset: int = 0, limit: int | None = None, tail: int | None = None
    ) -> list[LogLine]:
        """Lines from line number `offset` on (at most `limit`), or the last `tail` lines."""

    @abc.abstractmethod
    def report_scalars(self, task_id: str, scalars: Sequence[Scalar | Mapping[str, Any]]) -> None:
        """Record scalar values (title, series, iteration, value)."""

    @abc.abstractmethod
    def get_scalars(
        self, task_id: str, *, title: str | None = None, series: str | None = None
    ) -> list[Scalar]:
        """Scalars of a task, ordered by title, series, iteration."""

    # ---------------------------------------------------------------- queues
    @abc.abstractmethod
    def create_queue(self, name: str) -> QueueInfo:
        """Create a queue (ConflictError if it exists)."""

    @abc.abstractmethod
    def list_queues(self) -> list[QueueInfo]:
        """Every queue with its length, by name."""

    @abc.abstractmethod
    def get_queue(self, name: str) -> QueueInfo:
        """One queue; NotFoundError if unknown."""

    @abc.abstractmethod
    def delete_queue(self, name: str, *, force: bool = False) -> None:
        """Delete a queue; a non-empty queue needs `force` (its tasks go back to created)."""

    @abc.abstractmethod
    def enqueue(
        self, task_id: str, queue: str | None = None, *, priority: int | None = None
    ) -> TaskRecord:
        """Put a created (or finished: a re-run) task on a queue.

        The queue defaults to the task's `execution.queue`, else "default"; a higher
        priority is served first, equal priorities first come first served.
        """

    @abc.abstractmethod
    def dequeue(self, task_id: str) -> TaskRecord:
        """Take a queued task off its queue, back to created."""

    @abc.abstractmethod
    def queue_tasks(self, name: str) -> list[TaskRecord]:
        """The tasks waiting in a queue, in the order they will be claimed."""

    def queue_length(self, name: str) -> int:
        """How many tasks wait in a queue."""
        return self.get_queue(name).length

    @abc.abstractmethod
    def claim(
        self,
        queues: Sequence[str],
        worker_id: str,
        *,
        wait_s: float = 0.0,
        lease_s: float = DEFAULT_LEASE_S,
    ) -> TaskRecord | None:
        """Atomically take the next task and mark it in_progress, owned by `worker_id`.

        Queues are tried in the given order; within a queue, highest priority first,
        then oldest. Waits up to `wait_s` seconds for work and returns as soon as a task
        is enqueued on one of the queues; None if nothing came. Expired leases are swept
        first. The claim holds a lease of `lease_s` seconds that heartbeats extend.
        """

    # --------------------------------------------------------------- workers
    @abc.abstractmethod
    def register_worker(
        self, worker_id: str, *, hostname: str = "", queues: Sequence[str] = (), slots: int = 1
    ) -> WorkerInfo:
        """Register (or re-register) a worker."""

    @abc.abstractmethod
    def heartbeat(
        self,
        worker_id: str,
        *,
        resources: Mapping[str, Any] | None = None,
        current_tasks: Sequence[str] | None = None,
        lease_s: float = DEFAULT_LEASE_S,
    ) -> HeartbeatReply:
        """Mark a worker alive, extend the leases of its tasks, return tasks to abort."""

    @abc.abstractmethod
    def unregister_worker(self, worker_id: str) -> None:
        """Forget a worker (its tasks keep their leases until they expire)."""

    @abc.abstractmethod
    def list_workers(self) -> list[WorkerInfo]:
        """Registered workers with last-seen time and current tasks."""

    # ------------------------------------------------------------- lifecycle
    @abc.abstractmethod
    def abort_task(self, task_id: str, *, message: str = "") -> TaskRecord:
        """Abort a task.

        queued/created → stopped at once; in_progress → stopping (the worker sees it in its
        next heartbeat answer and reports stopped once the process is gone).
        """

    @abc.abstractmethod
    def reset_task(self, task_id: str) -> TaskRecord:
        """Bring a task that is not active back to created, clearing its log, scalars,
        artifacts and runtime (for a fresh re-run)."""

    @abc.abstractmethod
    def expire_leases(self) -> list[str]:
        """Fail every active task whose lease expired; returns their ids."""

    def close(self) -> None:  # noqa: B027 - optional for implementations
        """Release connections."""

