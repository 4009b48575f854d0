"""Request bodies of the HTTP API (the response bodies are the records of `controller.models`).

The server validates every body with these models before it calls the Backend, so bad
input is answered with 422 and changes nothing. Semantic checks (does the task exist, is
the transition legal, is the field editable) stay with the Backend, so the SQL and the
HTTP transports refuse the same input with the same errors.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from controller.backend import MAX_CLAIM_WAIT_S, MAX_WATCHED_TASKS, check_log_batch_id
from controller.models import (
    DEFAULT_LEASE_S,
    LogLine,
    Name,
    Scalar,
    TaskId,
    TaskStatus,
    check_worker_id,
)

WorkerId = Annotated[str, AfterValidator(check_worker_id)]
LogBatchId = Annotated[str, AfterValidator(check_log_batch_id)]
#: Longest lease a claim or heartbeat may ask for (a day).
MAX_LEASE_S = 86_400.0
LeaseSeconds = Annotated[float, Field(gt=0, le=MAX_LEASE_S)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EditRequest(_Body):
    """PATCH /tasks/{id}: definition fields to change; `force` edits in any status."""

    changes: dict[str, Any]
    force: bool = False


class CloneRequest(_Body):
    """POST /tasks/{id}/clone: new name/project; `parent` given (even null) replaces it."""

    name: Name | None = None
    project: Name | None = None
    parent: TaskId | None = None


class StatusRequest(_Body):
    """POST /tasks/{id}/status: the requested status, why, and (for agents) who asks."""

    status: TaskStatus
    reason: str = ""
    message: str = ""
    worker_id: WorkerId | None = None


def _line_record(item: Any) -> Any:
    return {"line": item} if isinstance(item, str) else item


#: A log line given as a record or as a plain string (errors name `lines.<i>.line`).
LogLineInput = Annotated[
    LogLine, BeforeValidator(_line_record, json_schema_input_type=LogLine | str)
]


class LogAppendRequest(_Body):
    """POST /tasks/{id}/log: lines to append (records or plain strings); a `batch_id`
    already appended to this task appends nothing (a resent chunk)."""

    lines: list[LogLineInput]
    batch_id: LogBatchId | None = None


class FinishRequest(_Body):
    """POST /tasks/{id}/finish: a run's final report, written at once or not at all: the
    finished status (completed, failed or stopped) with its reason and message, as the
    worker that holds the task; runtime figures merged into the task's runtime; the last
    log lines (records or plain strings) with their chunk's batch id (a batch id already
    appended to this task appends nothing: a resent report)."""

    status: TaskStatus
    reason: str = ""
    message: str = ""
    worker_id: WorkerId | None = None
    runtime: dict[str, Any] | None = None
    log_lines: list[LogLineInput] = Field(default_factory=list)
    log_batch_id: LogBatchId | None = None


class LogAppendReply(BaseModel):
    """The log's new length in lines."""

    length: int


class ScalarsRequest(_Body):
    """POST /tasks/{id}/scalars: values to record."""

    scalars: list[Scalar]


class EnqueueRequest(_Body):
    """POST /tasks/{id}/enqueue: the queue (default: the task's own) and a priority."""

    queue: str | None = None
    priority: int | None = None


class AbortRequest(_Body):
    """POST /tasks/{id}/abort: an optional message kept in the status history."""

    message: str = ""


class QueueCreateRequest(_Body):
    """POST /queues: the name of the new queue (the Backend checks the name rules)."""

    name: str = Field(max_length=1024)


class ClaimRequest(_Body):
    """POST /claim: take the next task of `queues` (in order), waiting up to `wait_s`."""

    queues: list[str] = Field(min_length=1, max_length=256)
    worker_id: WorkerId
    wait_s: float = Field(default=0.0, ge=0, le=MAX_CLAIM_WAIT_S)
    lease_s: LeaseSeconds = DEFAULT_LEASE_S


class WaitRequest(_Body):
    """POST /tasks/wait: answer once a task of `known` has a status other than the one given."""

    known: dict[str, str] = Field(min_length=1, max_length=MAX_WATCHED_TASKS)
    wait_s: float = Field(default=0.0, ge=0, le=MAX_CLAIM_WAIT_S)


class WorkerRegisterRequest(_Body):
    """POST /workers: register (or re-register) a worker."""

    worker_id: WorkerId
    hostname: Name = ""
    queues: list[str] = Field(default_factory=list, max_length=256)
    slots: int = Field(default=1, ge=1, le=10_000)


class HeartbeatRequest(_Body):
    """POST /workers/{id}/heartbeat: resources, current tasks and the lease to extend."""

    resources: dict[str, Any] | None = None
    current_tasks: list[TaskId] | None = None
    lease_s: LeaseSeconds = DEFAULT_LEASE_S


class StatusInfo(BaseModel):
    """One task status: its display group, its flags, the statuses it may change to."""

    name: TaskStatus
    group: str = Field(description="display group (the dashboard's colour), e.g. running")
    terminal: bool = Field(description="finished: left only by a re-run or a reset")
    active: bool = Field(description="a worker owns the task (it holds a lease)")
    transitions: list[TaskStatus] = Field(description="the legal next statuses")


class Statuses(BaseModel):
    """GET /statuses: every task status, in life order."""

    statuses: list[StatusInfo]


class Health(BaseModel):
    """GET /health: the server answers, with its version."""

    status: str = "ok"
    version: str
