"""PipelineController.Node: one step of a pipeline DAG, its definition and its run state."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from controller.backend import Backend
from controller.models import TaskRecord, TaskStatus

# Node statuses (what the DAG shows). "cached" and "skipped" count as done.
PENDING = "pending"
LAUNCHING = "launching"
QUEUED = "queued"
RUNNING = "running"
COMPLETED = "completed"
FAILED = "failed"
ABORTED = "aborted"
SKIPPED = "skipped"
CACHED = "cached"
FINISHED_STATUSES = frozenset({COMPLETED, FAILED, ABORTED, SKIPPED, CACHED})
SUCCESS_STATUSES = frozenset({COMPLETED, CACHED})


def node_status_of(task: TaskRecord) -> str:
    """The node status a step task's status stands for.

    A step stopped by its time limit counts as failed (the reference: "the pipeline is
    stopped and marked failed"); other stops count as aborted.
    """
    status = task.status
    if status == TaskStatus.queued:
        return QUEUED
    if status in (TaskStatus.in_progress, TaskStatus.stopping):
        return RUNNING
    if status == TaskStatus.completed:
        return COMPLETED
    if status == TaskStatus.failed:
        return FAILED
    if status == TaskStatus.stopped:
        return FAILED if task.status_reason == "time_limit" else ABORTED
    return PENDING


@dataclass
class ContinueBehaviour:
    """What a failed or aborted step means for the pipeline and for its children.

    Without `continue_behaviour`: continue_on_fail as given (default False), no
    continue on abort, children skipped. With a dict, missing keys default to True.
    """

    continue_on_fail: bool = False
    continue_on_abort: bool = False
    skip_children_on_fail: bool = True
    skip_children_on_abort: bool = True

    @classmethod
    def from_options(cls, continue_on_fail: bool, continue_behaviour: Mapping[str, bool] | None) -> ContinueBehaviour:
        """Build from add_step's `continue_on_fail` and `continue_behaviour` arguments."""
        if continue_behaviour is None:
            return cls(continue_on_fail=bool(continue_on_fail))
        unknown = set(continue_behaviour) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown continue_behaviour key(s): {', '.join(sorted(unknown))}")
        return cls(**{k: bool(continue_behaviour.get(k, True)) for k in cls.__dataclass_fields__})


class StepJob:
    """The running task of a node (`node.job`): its id and its current record."""

    def __init__(self, backend: Backend, task_id: str) -> None:
        self._backend = backend
        self.task_id = task_id

    def task_record(self) -> TaskRecord:
        """The step task's record, read now."""
        return self._backend.get_task(self.task_id)

    @property
    def task(self) -> Any:
        """The step's Task (the SDK object when available, else its record)."""
        try:
            from controller.sdk.task import Task
        except ImportError:
            return self.task_record()
        return Task.get_task(task_id=self.task_id)

    def status(self) -> str:
        """The step task's status."""
        return self.task_record().status.value

    def __repr__(self) -> str:
        return f"StepJob(task_id={self.task_id!r})"


@dataclass(eq=False)
class Node:
    """One step of the DAG. Field names follow the reference's PipelineController.Node."""

    name: str
    base_task_id: str | None = None
    base_task_project: str | None = None
    base_task_name: str | None = None
    base_task_factory: Callable[[Node], Any] | None = None
    queue: str | None = None
    parents: list[str] = field(default_factory=list)
    timeout: float | None = None  # time_limit, seconds
    parameters: dict[str, Any] = field(default_factory=dict)
    configurations: dict[str, Any] = field(default_factory=dict)
    task_overrides: dict[str, Any] = field(default_factory=dict)
    clone_task: bool = True
    cache_executed_step: bool = False
    continue_behaviour: ContinueBehaviour = field(default_factory=ContinueBehaviour)
    retry_on_failure: int | Callable[..., bool] | None = None
    pre_execute_callback: Callable[..., Any] | None = None
    post_execute_callback: Callable[..., Any] | None = None
    status_change_callback: Callable[..., Any] | None = None
    monitor_metrics: list[Any] = field(default_factory=list)
    monitor_artifacts: list[Any] = field(default_factory=list)
    monitor_models: list[Any] = field(default_factory=list)
    recursively_parse_parameters: bool = False
    output_uri: str | bool | None = None
    tags: list[str] = field(default_factory=list)
    # function steps: the task spec is made from a function instead of a base task
    function_spec: dict[str, Any] | None = None
    return_artifacts: list[str] = field(default_factory=list)
    # run state
    status: str = PENDING
    status_message: str = ""
    executed: str | None = None
    job: StepJob | None = None
    skip_job: bool = False
    retries: int = 0
    job_started: float | None = None
    job_ended: float | None = None
    resolved_parameters: dict[str, Any] = field(default_factory=dict)
    resolved_overrides: dict[str, Any] = field(default_factory=dict)
    worker: str = ""
    task_status: str = ""  # the step task's last seen status

    @property
    def is_finished(self) -> bool:
        """The node will not change any more in this run."""
        return self.status in FINISHED_STATUSES

    @property
    def is_successful(self) -> bool:
        """The node completed (or was served from the cache)."""
        return self.status in SUCCESS_STATUSES

    @property
    def is_running(self) -> bool:
        """The node's task is queued or running (or being launched)."""
        return self.status in (LAUNCHING, QUEUED, RUNNING)

    def set_status(self, status: str, message: str = "") -> str:
        """Change the node status; returns the previous one."""
        previous = self.status
        self.status = status
        self.status_message = message
        if status == RUNNING and self.job_started is None:
            self.job_started = time.time()
        if status in FINISHED_STATUSES and self.job_ended is None:
            self.job_ended = time.time()
        return previous

    def state(self) -> dict[str, Any]:
        """What is recorded on the controller task for this node (JSON)."""
        return {
            "name": self.name,
            "status": self.status,
            "status_message": self.status_message,
            "task_id": self.executed,
            "base_task_id": self.base_task_id,
            "parents": list(self.parents),
            "queue": self.queue,
            "parameters": to_json_value(self.parameters),
            "resolved_parameters": to_json_value(self.resolved_parameters),
            "overrides": to_json_value(self.resolved_overrides),
            "retries": self.retries,
            "started": self.job_started,
            "ended": self.job_ended,
            "worker": self.worker,
            "kind": "function" if self.function_spec else "task",
            "cache": self.cache_executed_step,
        }


def to_json_value(value: Any) -> Any:
    """`value` as JSON can hold it: containers kept, other objects as their repr."""
    if isinstance(value, dict):
        return {str(k): to_json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json_value(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return repr(value)
