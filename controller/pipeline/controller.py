"""PipelineController: a DAG of steps (cloned base tasks or functions) run by agents.

Signatures and defaults follow the reference (ClearML's PipelineController). Decisions
where the reference is vague:

- `start_locally()` runs the pipeline loop in this process and returns when it ends
  (then `wait()` returns at once); steps go to agents, or run as local subprocesses
  with `run_pipeline_steps_locally=True`.
- `start(queue)` outside an agent records the pipeline as a controller task and
  enqueues it, then ends this process (exit code 0) as documented; the agent on
  `queue` runs the same script, whose `start()` then runs the loop. Under an agent
  (`CONVEYOR_TASK_ID` set) the controller attaches to that task, so a pipeline can
  also be a step of another pipeline: the outer step ends when the inner pipeline does.
- Step time limits are in seconds (`time_limit`), the pipeline's in minutes
  (`set_pipeline_execution_time_limit`), as documented. Arguments accepted but not
  supported (`pool_frequency`: the loop wakes on status changes; `auto_version_bump`;
  `always_create_from_code=False`; a step's `draft`, `auto_connect_*`) are listed in
  docs/pipelines.md and log a warning once when given.
- The pipeline state (each node's status, task id, parents, resolved overrides,
  timings) is recorded on the controller task's `runtime.pipeline` after every
  transition, and its definition in `configuration["Pipeline"]`.

The class is put together from the package's three concepts: `definition` (add_step,
add_function_step, parameters, validation of the DAG, with `dag` and `function_step`),
`running` (start/stop/wait, the loop, launching steps with `launch` and `local_step`)
and `state` (the controller task and the run state recorded on it, the class-level API
that finds a recorded pipeline). `node` is one step: its definition and its run state.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

from controller.backend import Backend
from controller.connect import get_backend
from controller.pipeline.dag import PipelineDefinitionError
from controller.pipeline.definition import DefinitionMixin, warn_not_supported
from controller.pipeline.node import Node
from controller.pipeline.running import PipelineRunner, RunningMixin
from controller.pipeline.state import PipelineStateMixin

#: The reference's default pool_frequency (minutes); another value logs a warning.
DEFAULT_POOL_FREQUENCY = 0.2


class PipelineController(DefinitionMixin, RunningMixin, PipelineStateMixin):
    """A pipeline: a DAG of steps, each a task cloned from a base task or made from a function."""

    Node = Node

    def __init__(
        self,
        name: str = "Pipeline",
        project: str = "",
        version: str | None = None,
        pool_frequency: float = DEFAULT_POOL_FREQUENCY,
        add_pipeline_tags: bool = False,
        target_project: str | bool | None = True,
        auto_version_bump: bool | None = None,
        abort_on_failure: bool = False,
        add_run_number: bool = True,
        retry_on_failure: int | Callable[..., bool] | None = None,
        docker: str | None = None,
        docker_args: str | None = None,
        docker_bash_setup_script: str | None = None,
        packages: str | Sequence[str] | None = None,
        repo: str | None = None,
        repo_branch: str | None = None,
        repo_commit: str | None = None,
        always_create_from_code: bool = True,
        artifact_serialization_function: Callable[[Any], bytes] | None = None,
        artifact_deserialization_function: Callable[[bytes], Any] | None = None,
        output_uri: str | bool | None = None,
        skip_global_imports: bool = False,
        working_dir: str | None = None,
        default_execution_queue: str | None = None,
    ) -> None:
        if not isinstance(name, str) or not name.strip():
            raise PipelineDefinitionError("pipeline name must be a non-empty string")
        if isinstance(retry_on_failure, bool) or not (
            retry_on_failure is None or callable(retry_on_failure)
            or (isinstance(retry_on_failure, int) and retry_on_failure >= 0)
        ):
            raise PipelineDefinitionError("retry_on_failure must be a number of retries >= 0 or a callable")
        self._name = name
        self._project = project or ""
        self._version = version
        self._pool_frequency = pool_frequency
        self._add_pipeline_tags = add_pipeline_tags
        self._target_project = target_project
        self._abort_on_failure = abort_on_failure
        self._add_run_number = add_run_number
        self._retry_on_failure = retry_on_failure
        self._container = {
            "image": docker or "", "arguments": docker_args or "",
            "setup_shell_script": docker_bash_setup_script or "",
        }
        self._packages = packages
        self._repo = (repo, repo_branch, repo_commit)
        self._output_uri = output_uri
        self._skip_global_imports = skip_global_imports
        self._working_dir = working_dir
        self._artifact_serialization_function = artifact_serialization_function
        self._artifact_deserialization_function = artifact_deserialization_function
        self._default_queue = default_execution_queue
        self._nodes: dict[str, Node] = {}
        self._parameters: dict[str, Any] = {}
        self._parameter_descriptions: dict[str, str] = {}
        self._parameter_types: dict[str, str] = {}
        if pool_frequency != DEFAULT_POOL_FREQUENCY:
            warn_not_supported("pool_frequency")
        if auto_version_bump is not None:
            warn_not_supported("auto_version_bump")
        if not always_create_from_code:
            warn_not_supported("always_create_from_code=False")
        self._configurations: dict[str, Any] = {}
        self._tags: list[str] = []
        self._time_limit_s: float | None = None
        self._backend: Backend = get_backend()
        self._task_id: str | None = None
        self._stop_event = threading.Event()
        self._stop_mark_failed = False
        self._stop_mark_aborted = False
        self._done = threading.Event()
        self._started_at: float | None = None
        self._runner: PipelineRunner | None = None
        self._thread: threading.Thread | None = None
        self._run_steps_locally = False
        self._local_worker_id = f"{os.uname().nodename}:{os.getpid()}"
        self._state_lock = threading.Lock()
        self._status: str = "draft"
        self._status_message = ""
        # PipelineDecorator: steps are added while the pipeline runs, until it is closed.
        self._dynamic = False
        self._definition_open = False
        self._node_finished = threading.Condition()

    def get_pipeline_dag(self) -> dict[str, Node]:
        """The DAG: step name → Node."""
        return dict(self._nodes)

    def update_execution_plot(self) -> None:
        """Record the DAG state on the pipeline task now (the loop also records it after changes)."""
        self._record_state()

    @property
    def id(self) -> str | None:
        """The pipeline (controller) task id, once started."""
        return self._task_id


__all__ = ["PipelineController", "PipelineDefinitionError"]
