"""Records of the control plane (the status rules are in `controller.transitions`).

The task record follows DESIGN.md: identity, project, type, tags, parent, status with a
machine-readable reason and a human-readable message, script, packages, container,
hyperparams by section, configuration objects, execution, runtime, artifacts, models
and timestamps (seconds since the epoch, UTC).

These pydantic models are the API contract: the SQL store validates its input with
them and the HTTP server uses them as request and response bodies, so both transports
accept and refuse exactly the same input.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

# Limits on free-form fields. Oversized input is refused, never truncated.
MAX_NAME_CHARS = 256
MAX_TAGS = 64
MAX_TAG_CHARS = 128
MAX_TEXT_CHARS = 16 * 1024 * 1024  # code, diff, setup scripts
MAX_LOG_LINE_CHARS = 1024 * 1024
MAX_LOG_LINES_PER_CALL = 10_000

QUEUE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,127}$"
DEFAULT_QUEUES = ("default", "services")
#: QUEUE_NAME_PATTERN in words, for messages.
QUEUE_NAME_RULE = "1-128 letters, digits, '_', '.', ':' or '-', starting with a letter or digit"
_QUEUE_NAME_RE = re.compile(QUEUE_NAME_PATTERN)


def is_queue_name(name: object) -> bool:
    """Whether `name` is a valid queue name: the one rule (QUEUE_NAME_PATTERN) for the store,
    the API models and the command lines."""
    return isinstance(name, str) and _QUEUE_NAME_RE.fullmatch(name) is not None

#: Seconds a claim stays valid without a heartbeat from its worker.
DEFAULT_LEASE_S = 10.0

Name = Annotated[str, StringConstraints(max_length=MAX_NAME_CHARS)]
Tag = Annotated[str, StringConstraints(min_length=1, max_length=MAX_TAG_CHARS)]
Text = Annotated[str, StringConstraints(max_length=MAX_TEXT_CHARS)]
QueueName = Annotated[str, StringConstraints(pattern=QUEUE_NAME_PATTERN)]
TaskId = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class TaskStatus(str, enum.Enum):
    """Where a task is in its life.

    created → queued → in_progress → completed | failed | stopped; an abort of an
    in_progress task goes through stopping; a finished task may be queued again (re-run)
    or reset. The legal changes and what each does: `controller.transitions`.
    """

    created = "created"
    queued = "queued"
    in_progress = "in_progress"
    stopping = "stopping"
    completed = "completed"
    failed = "failed"
    stopped = "stopped"

    @property
    def is_terminal(self) -> bool:
        """True for statuses a task only leaves by being re-run or reset."""
        return self in TERMINAL_STATUSES

    @property
    def is_active(self) -> bool:
        """True while a worker owns the task (it holds a lease)."""
        return self in (TaskStatus.in_progress, TaskStatus.stopping)


TERMINAL_STATUSES = frozenset({TaskStatus.completed, TaskStatus.failed, TaskStatus.stopped})


#: Each status's display group: the colour the dashboard gives it (`GET /statuses`). The
#: group names are those of pipeline steps (a step's task shows the colour of its step).
STATUS_GROUPS: dict[TaskStatus, str] = {
    TaskStatus.created: "pending",
    TaskStatus.queued: "queued",
    TaskStatus.in_progress: "running",
    TaskStatus.stopping: "aborted",
    TaskStatus.completed: "completed",
    TaskStatus.failed: "failed",
    TaskStatus.stopped: "aborted",
}


class StatusReason:
    """Machine-readable values of `status_reason` (the message says it in words)."""

    created = "created"
    edited = "edited"
    enqueued = "enqueued"
    dequeued = "dequeued"
    claimed = "claimed"
    started = "started"
    completed = "completed"
    exit_code = "exit_code"
    signal = "signal"
    time_limit = "time_limit"
    aborted = "aborted"
    abort_requested = "abort_requested"
    agent_shutdown = "agent_shutdown"
    lease_expired = "lease_expired"
    worker_restarted = "worker_restarted"
    reset = "reset"
    setup_failed = "setup_failed"
    exception = "exception"
    execute_remotely = "execute_remotely"


class TaskType(str, enum.Enum):
    """Task types (the reference's TaskTypes)."""

    training = "training"
    testing = "testing"
    inference = "inference"
    data_processing = "data_processing"
    application = "application"
    monitor = "monitor"
    controller = "controller"
    optimizer = "optimizer"
    service = "service"
    qc = "qc"
    custom = "custom"


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=False)


class Script(_Record):
    """What code a task runs and where it comes from."""

    repository: Text = ""
    branch: Name = ""
    commit: Name = ""
    tag: Name = ""
    entry_point: Text = ""
    working_dir: Text = "."
    diff: Text = ""
    code: Text = ""
    binary: Name = "python"
    requirements_file: Text = ""


class Container(_Record):
    """Docker image, docker_args string and setup shell script of a task."""

    image: Text = ""
    arguments: Text = ""
    setup_shell_script: Text = ""


class Execution(_Record):
    """Where and how long a task runs: queue, priority (higher first), time limit."""

    queue: str = ""
    priority: int = Field(default=0, ge=-1_000_000, le=1_000_000)
    time_limit_s: float | None = Field(default=None, gt=0)


class Runtime(BaseModel):
    """What happened when the task ran. Agents may record further keys."""

    model_config = ConfigDict(extra="allow")

    worker: str = ""
    attempt: int = 0
    exit_code: int | None = None
    commit_used: str = ""
    cache_hash: str = ""
    resources: dict[str, Any] = Field(default_factory=dict)


class Artifact(BaseModel):
    """An output file or object stored at `uri`."""

    model_config = ConfigDict(extra="allow")

    uri: Text
    type: Name = ""
    size: int | None = None
    sha256: str = ""
    metadata: dict[str, Any] = Field(default_factory=dict)
    preview: Text = ""
    timestamp: float | None = None


class Model(BaseModel):
    """A model file attached to a task as input or output."""

    model_config = ConfigDict(extra="allow")

    name: Name = ""
    url: Text = ""
    framework: Name = ""


def _check_tags(tags: list[str]) -> list[str]:
    if len(tags) > MAX_TAGS:
        raise ValueError(f"at most {MAX_TAGS} tags allowed, got {len(tags)}")
    return list(dict.fromkeys(tags))  # keep order, drop repeats


class TaskSpec(_Record):
    """The definition of a task: what a user gives to create (or edit) one."""

    name: Name = Field(min_length=1)
    project: Name = ""
    type: TaskType = TaskType.custom
    tags: list[Tag] = Field(default_factory=list)
    comment: Text = ""
    parent: TaskId | None = None
    script: Script = Field(default_factory=Script)
    packages: list[Annotated[str, StringConstraints(max_length=4096)]] = Field(
        default_factory=list, max_length=10_000
    )
    container: Container = Field(default_factory=Container)
    hyperparams: dict[Name, dict[Name, Any]] = Field(default_factory=dict)
    configuration: dict[Name, Any] = Field(default_factory=dict)
    execution: Execution = Field(default_factory=Execution)

    _tags = field_validator("tags")(_check_tags)


#: Fields `edit_task` may change (the definition; never status or identity).
EDITABLE_FIELDS = frozenset(TaskSpec.model_fields) | {"runtime", "artifacts", "models"}
#: Parts of a task merged key by key by an edit (the other fields are replaced whole).
MERGED_FIELDS = ("script", "container", "execution", "runtime", "configuration", "artifacts")


def merge_task_changes(current: dict[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """Apply edit changes to a json-mode task (a record or a spec), as `edit_task` does:
    the parts of MERGED_FIELDS are merged key by key, hyperparams section by section,
    the other fields replaced. A key set to None inside a merged part (an artifact, a
    configuration entry) or a hyperparams section set to None removes it."""
    merged = dict(current)
    for key, value in changes.items():
        if key in MERGED_FIELDS and isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            part = dict(merged[key])
            for k, v in value.items():
                if v is None and key in ("artifacts", "configuration"):
                    part.pop(k, None)
                else:
                    part[k] = v
            merged[key] = part
        elif key == "hyperparams" and isinstance(value, Mapping):
            sections = {s: dict(p) for s, p in merged.get("hyperparams", {}).items()}
            for section, params in value.items():
                if params is None:
                    sections.pop(section, None)
                elif isinstance(params, Mapping):
                    sections.setdefault(section, {}).update(params)
                else:
                    sections[section] = params  # let validation name the bad section
            merged["hyperparams"] = sections
        else:
            merged[key] = value
    return merged


class StatusChange(_Record):
    """One entry of a task's status history."""

    status: TaskStatus
    reason: str = ""
    message: str = ""
    time: float


class TaskRecord(BaseModel):
    """A task as stored: its definition plus status, runtime, outputs and times."""

    model_config = ConfigDict(extra="forbid")

    id: str
    name: str
    project: str = ""
    type: TaskType = TaskType.custom
    tags: list[str] = Field(default_factory=list)
    comment: str = ""
    parent: str | None = None
    status: TaskStatus = TaskStatus.created
    status_reason: str = ""
    status_message: str = ""
    script: Script = Field(default_factory=Script)
    packages: list[str] = Field(default_factory=list)
    container: Container = Field(default_factory=Container)
    hyperparams: dict[str, dict[str, Any]] = Field(default_factory=dict)
    configuration: dict[str, Any] = Field(default_factory=dict)
    execution: Execution = Field(default_factory=Execution)
    runtime: Runtime = Field(default_factory=Runtime)
    artifacts: dict[str, Artifact] = Field(default_factory=dict)
    models: dict[str, list[Model]] = Field(default_factory=lambda: {"input": [], "output": []})
    status_history: list[StatusChange] = Field(default_factory=list)
    created_at: float
    updated_at: float
    queued_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    lease_expires_at: float | None = None


class LogLine(_Record):
    """One line of a task's output. `n` (0-based line number) is set by the store."""

    line: Annotated[str, StringConstraints(max_length=MAX_LOG_LINE_CHARS)]
    stream: str = "stdout"
    timestamp: float | None = None
    n: int | None = None


#: Largest integer a field may hold (both databases store 64-bit integers).
MAX_INT64 = 2**63 - 1


class Scalar(_Record):
    """One reported value of a metric series. NaN and ±inf are kept (a diverging loss)."""

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")

    title: Name = Field(min_length=1)
    series: Name = Field(min_length=1)
    iteration: int = Field(default=0, ge=-MAX_INT64, le=MAX_INT64)
    value: float
    timestamp: float | None = None


class QueueInfo(BaseModel):
    """A named queue and what waits in it."""

    name: str
    length: int = 0
    created_at: float
    oldest_queued_at: float | None = None


class WorkerInfo(BaseModel):
    """An agent that registered, with its last heartbeat."""

    id: str
    hostname: str = ""
    queues: list[str] = Field(default_factory=list)
    slots: int = 1
    registered_at: float
    last_seen: float
    resources: dict[str, Any] = Field(default_factory=dict)
    current_tasks: list[str] = Field(default_factory=list)


class HeartbeatReply(BaseModel):
    """What a heartbeat tells a worker: tasks it must abort, and its lease length."""

    abort: list[str] = Field(default_factory=list)
    lease_s: float = DEFAULT_LEASE_S


_WORKER_ID_RE = re.compile(r"^[^\s/]{1,256}$")


def check_worker_id(worker_id: str) -> str:
    """Return `worker_id` if it is a usable worker id, else raise ValueError."""
    if not isinstance(worker_id, str) or not _WORKER_ID_RE.match(worker_id):
        raise ValueError(
            f"invalid worker id {worker_id!r}: 1-256 characters, no spaces or slashes"
        )
    return worker_id
