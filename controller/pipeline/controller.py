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
  (`set_pipeline_execution_time_limit`), as documented; `pool_frequency` is accepted but
  not needed (the loop wakes on status changes).
- The pipeline state (each node's status, task id, parents, resolved overrides,
  timings) is recorded on the controller task's `runtime.pipeline` after every
  transition, and its definition in `configuration["Pipeline"]`.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from controller.backend import Backend, conveyor_home, get_backend
from controller.errors import ConveyorError, NotFoundError
from controller.models import TaskRecord, TaskStatus, TaskType
from controller.pipeline import dag
from controller.pipeline.dag import PipelineDefinitionError, step_error
from controller.pipeline.function_step import build_function_spec, repository_fields
from controller.pipeline.launch import ResolvedStep
from controller.pipeline.node import CACHED, COMPLETED, ContinueBehaviour, Node, to_json_value
from controller.pipeline.runner import PipelineRunner

log = logging.getLogger("conveyor.pipeline")

PIPELINE_SECTION = "Pipeline"
STEP_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_\-]{0,127}$")


class PipelineController:
    """A pipeline: a DAG of steps, each a task cloned from a base task or made from a function."""

    Node = Node

    def __init__(
        self,
        name: str = "Pipeline",
        project: str = "",
        version: str | None = None,
        pool_frequency: float = 0.2,
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
        # PipelineDecorator: steps are added while the pipeline runs, until it is closed.
        self._dynamic = False
        self._definition_open = False
        self._node_finished = threading.Condition()

    # ------------------------------------------------------------ definition
    def add_parameter(
        self, name: str, default: Any = None, description: str | None = None, param_type: str | None = None
    ) -> None:
        """Add a pipeline parameter (section "Pipeline"), referenced as `${pipeline.<name>}`."""
        if not isinstance(name, str) or not name or "/" in name:
            raise PipelineDefinitionError(f"pipeline parameter name {name!r}: a non-empty name without '/'")
        self._parameters[name] = default
        if description:
            self._parameter_descriptions[name] = description

    def get_parameters(self) -> dict[str, Any]:
        """The pipeline parameters (name → value)."""
        return dict(self._parameters)

    def set_default_execution_queue(self, default_execution_queue: str | None) -> None:
        """The queue of steps that name none."""
        self._default_queue = default_execution_queue

    def set_pipeline_execution_time_limit(self, max_execution_minutes: float | None) -> None:
        """Limit the whole pipeline's run time (minutes); None or 0 disables it."""
        if max_execution_minutes is not None and (
            not isinstance(max_execution_minutes, int | float) or max_execution_minutes < 0
        ):
            raise PipelineDefinitionError("max_execution_minutes must be a number of minutes >= 0")
        self._time_limit_s = max_execution_minutes * 60 if max_execution_minutes else None

    def add_tags(self, tags: str | Sequence[str]) -> None:
        """Add tags to the pipeline task."""
        self._tags.extend([tags] if isinstance(tags, str) else list(tags))
        if self._task_id:
            self._edit_own_task({"tags": list(dict.fromkeys(self._task_record().tags + self._tags))})

    def connect_configuration(
        self, configuration: Mapping[str, Any] | list | str | Path, name: str | None = None,
        description: str | None = None,
    ) -> Any:
        """Store a configuration (dict, list or file) on the pipeline task; returns it.

        Under an agent, the stored configuration wins (it may have been edited).
        """
        key = name or "General"
        if isinstance(configuration, str | Path):
            path = Path(configuration)
            self._configurations[key] = path.read_text() if path.is_file() else ""
            return configuration
        self._configurations[key] = configuration
        return configuration

    def add_step(
        self,
        name: str,
        base_task_id: str | None = None,
        parents: Sequence[str] | None = None,
        parameter_override: Mapping[str, Any] | None = None,
        configuration_overrides: Mapping[str, Any] | None = None,
        task_overrides: Mapping[str, Any] | None = None,
        execution_queue: str | None = None,
        monitor_metrics: list | None = None,
        monitor_artifacts: list | None = None,
        monitor_models: list | None = None,
        time_limit: float | None = None,
        base_task_project: str | None = None,
        base_task_name: str | None = None,
        clone_base_task: bool = True,
        continue_on_fail: bool = False,
        pre_execute_callback: Callable[..., Any] | None = None,
        post_execute_callback: Callable[..., Any] | None = None,
        cache_executed_step: bool = False,
        base_task_factory: Callable[[Node], Any] | None = None,
        retry_on_failure: int | Callable[..., bool] | None = None,
        status_change_callback: Callable[..., Any] | None = None,
        recursively_parse_parameters: bool = False,
        output_uri: str | bool | None = None,
        continue_behaviour: Mapping[str, bool] | None = None,
    ) -> bool:
        """Add a step that runs a clone of a base task (see the reference for each option)."""
        self._check_new_step(name)
        if not (base_task_id or base_task_name or base_task_factory):
            raise step_error(name, "base_task_id", "give base_task_id, base_task_project + base_task_name, "
                             "or base_task_factory")
        node = self._make_node(
            name, parents, execution_queue, time_limit, continue_on_fail, continue_behaviour,
            retry_on_failure, pre_execute_callback, post_execute_callback, status_change_callback,
            monitor_metrics, monitor_artifacts, monitor_models, cache_executed_step, output_uri,
        )
        node.base_task_id = base_task_id
        node.base_task_project = base_task_project
        node.base_task_name = base_task_name
        node.base_task_factory = base_task_factory
        node.parameters = _mapping(name, "parameter_override", parameter_override)
        node.configurations = _mapping(name, "configuration_overrides", configuration_overrides)
        node.task_overrides = _mapping(name, "task_overrides", task_overrides)
        node.clone_task = bool(clone_base_task)
        node.recursively_parse_parameters = bool(recursively_parse_parameters)
        self._nodes[name] = node
        return True

    def add_function_step(
        self,
        name: str,
        function: Callable[..., Any],
        function_kwargs: Mapping[str, Any] | None = None,
        function_return: Sequence[str] | None = None,
        project_name: str | None = None,
        task_name: str | None = None,
        task_type: str | None = None,
        auto_connect_frameworks: dict | None = None,
        auto_connect_arg_parser: dict | None = None,
        packages: str | Sequence[str] | None = None,
        repo: str | None = None,
        repo_branch: str | None = None,
        repo_commit: str | None = None,
        helper_functions: Sequence[Callable[..., Any]] | None = None,
        docker: str | None = None,
        docker_args: str | None = None,
        docker_bash_setup_script: str | None = None,
        parents: Sequence[str] | None = None,
        execution_queue: str | None = None,
        monitor_metrics: list | None = None,
        monitor_artifacts: list | None = None,
        monitor_models: list | None = None,
        time_limit: float | None = None,
        continue_on_fail: bool = False,
        pre_execute_callback: Callable[..., Any] | None = None,
        post_execute_callback: Callable[..., Any] | None = None,
        cache_executed_step: bool = False,
        retry_on_failure: int | Callable[..., bool] | None = None,
        status_change_callback: Callable[..., Any] | None = None,
        tags: str | Sequence[str] | None = None,
        output_uri: str | bool | None = None,
        draft: bool = False,
        working_dir: str | None = None,
        continue_behaviour: Mapping[str, bool] | None = None,
    ) -> bool:
        """Add a step made from a Python function: its source, helpers and imports become a
        standalone task, its kwargs parameters, its return values artifacts."""
        self._check_new_step(name)
        if not callable(function):
            raise step_error(name, "function", f"{function!r} is not callable")
        node = self._make_node(
            name, parents, execution_queue, time_limit, continue_on_fail, continue_behaviour,
            retry_on_failure, pre_execute_callback, post_execute_callback, status_change_callback,
            monitor_metrics, monitor_artifacts, monitor_models, cache_executed_step, output_uri,
        )
        if task_type is not None and task_type not in TaskType.__members__:
            raise step_error(name, "task_type", f"unknown task type {task_type!r}")
        try:
            node.function_spec = build_function_spec(
                name, function, function_kwargs, function_return, helper_functions,
                packages if packages is not None else self._packages,
                skip_global_imports=self._skip_global_imports,
                artifact_serialization_function=self._artifact_serialization_function,
                artifact_deserialization_function=self._artifact_deserialization_function,
            )
        except (TypeError, ValueError, OSError) as exc:
            raise step_error(name, "function", str(exc)) from None
        node.function_spec.update(
            task_name=task_name or name, project=project_name, task_type=task_type or "data_processing",
            container={"image": docker or self._container["image"],
                       "arguments": docker_args or self._container["arguments"],
                       "setup_shell_script": docker_bash_setup_script or self._container["setup_shell_script"]},
            repo=(repo, repo_branch, repo_commit), working_dir=working_dir, draft=draft,
        )
        try:
            repository_fields(repo, repo_branch, repo_commit)
        except ValueError as exc:
            raise step_error(name, "repo", str(exc)) from None
        node.return_artifacts = list(function_return or [])
        node.tags = [tags] if isinstance(tags, str) else list(tags or [])
        self._nodes[name] = node
        return True

    def _check_new_step(self, name: Any) -> None:
        if not isinstance(name, str) or not STEP_NAME_RE.match(name):
            raise PipelineDefinitionError(
                f"pipeline step name {name!r}: letters, digits, '_' or '-' (at most 128)")
        if name == "pipeline":
            raise step_error(name, "name", "'pipeline' is reserved for ${pipeline.<param>} references")
        if name in self._nodes:
            raise step_error(name, "name", "a step with this name already exists")

    def _make_node(
        self, name: str, parents: Sequence[str] | None, queue: str | None, time_limit: float | None,
        continue_on_fail: bool, continue_behaviour: Mapping[str, bool] | None,
        retry_on_failure: Any, pre_cb: Any, post_cb: Any, status_cb: Any,
        monitor_metrics: Any, monitor_artifacts: Any, monitor_models: Any, cache: bool, output_uri: Any,
    ) -> Node:
        if parents is not None and (isinstance(parents, str) or not all(isinstance(p, str) for p in parents)):
            raise step_error(name, "parents", "must be a list of step names")
        if time_limit is not None and (not isinstance(time_limit, int | float) or time_limit <= 0):
            raise step_error(name, "time_limit", f"must be a number of seconds > 0, got {time_limit!r}")
        if isinstance(retry_on_failure, bool) or not (
            retry_on_failure is None or callable(retry_on_failure)
            or (isinstance(retry_on_failure, int) and retry_on_failure >= 0)
        ):
            raise step_error(name, "retry_on_failure", "must be a number of retries >= 0 or a callable")
        for field_name, cb in (("pre_execute_callback", pre_cb), ("post_execute_callback", post_cb),
                               ("status_change_callback", status_cb)):
            if cb is not None and not callable(cb):
                raise step_error(name, field_name, "must be callable")
        try:
            behaviour = ContinueBehaviour.from_options(continue_on_fail, continue_behaviour)
        except (TypeError, ValueError) as exc:
            raise step_error(name, "continue_behaviour", str(exc)) from None
        return Node(
            name=name, parents=list(parents or []), queue=queue, timeout=time_limit,
            continue_behaviour=behaviour, retry_on_failure=retry_on_failure,
            pre_execute_callback=pre_cb, post_execute_callback=post_cb, status_change_callback=status_cb,
            monitor_metrics=list(monitor_metrics or []), monitor_artifacts=list(monitor_artifacts or []),
            monitor_models=list(monitor_models or []), cache_executed_step=bool(cache),
            output_uri=output_uri,
        )

    # -------------------------------------------------------------- running
    def start(
        self,
        queue: str = "services",
        step_task_created_callback: Callable[..., Any] | None = None,
        step_task_completed_callback: Callable[..., Any] | None = None,
        wait: bool = True,
    ) -> bool:
        """Run the pipeline on an agent of `queue`.

        Outside an agent: validate, record the controller task, enqueue it and end this
        process. Under an agent: run the pipeline loop here (blocking when `wait`).
        """
        self._apply_default_callbacks(step_task_created_callback, step_task_completed_callback)
        if os.environ.get("CONVEYOR_TASK_ID"):
            self._begin(run_steps_locally=False)
            self._stop_on_sigterm()
            if wait:
                self._run_loop()
            else:
                self._thread = threading.Thread(target=self._run_loop, name="pipeline", daemon=True)
                self._thread.start()
            return True
        self._prepare()
        task = self._create_controller_task(queue=queue)
        self._backend.enqueue(task.id, queue)
        print(f"pipeline '{task.name}' ({task.id}) enqueued on '{queue}'; this process ends here",
              file=sys.stderr)
        sys.exit(0)

    def start_locally(self, run_pipeline_steps_locally: bool = False) -> None:
        """Run the pipeline loop in this process until it ends; steps run on agents, or as
        local subprocesses with `run_pipeline_steps_locally=True`."""
        self._begin(run_steps_locally=run_pipeline_steps_locally)
        self._run_loop()

    def create_draft(self) -> None:
        """Record the pipeline as a controller task in status created (enqueue it later).

        Under an agent, the task being run is such a draft (or a clone of it, e.g. a step
        of another pipeline): then this runs the pipeline, as `start()` would.
        """
        if os.environ.get("CONVEYOR_TASK_ID"):
            self.start()
            return
        self._prepare()
        self._create_controller_task(queue=None)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the pipeline to end (timeout in minutes). True if it ended."""
        if self._started_at is None:
            return True
        return self._done.wait(None if timeout is None else timeout * 60)

    def stop(self, timeout: float | None = None, mark_failed: bool = False, mark_aborted: bool = False) -> None:
        """Stop the pipeline: abort running steps and record the final status.

        Completed unless a step failed (then failed); `mark_failed` / `mark_aborted`
        force failed / stopped. `timeout` (minutes) bounds the wait for the loop to end;
        safe to call from a callback.
        """
        self._stop_mark_failed = self._stop_mark_failed or mark_failed
        self._stop_mark_aborted = self._stop_mark_aborted or mark_aborted
        self._stop_event.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(None if timeout is None else timeout * 60)

    def is_running(self) -> bool:
        """True while the pipeline loop runs."""
        return self._started_at is not None and not self._done.is_set()

    def is_successful(self, fail_on_step_fail: bool = True, fail_condition: str = "all") -> bool:
        """Whether the pipeline ended well (False while it runs).

        `fail_condition`: "all" (failed or aborted is unsuccessful), "failed" or "aborted".
        Cached steps count as successful.
        """
        if fail_condition not in ("all", "failed", "aborted"):
            raise ValueError("fail_condition must be 'all', 'failed' or 'aborted'")
        if not self._done.is_set():
            return False
        status = self._status
        if status == "stopped":
            return fail_condition == "failed"
        if status == "failed":
            if not fail_on_step_fail and self._runner is not None and not self._stop_mark_failed:
                return True
            return fail_condition == "aborted"
        return True

    def elapsed(self) -> float:
        """Minutes since the pipeline started (negative if it has not)."""
        if self._started_at is None:
            return -1.0
        return (time.time() - self._started_at) / 60

    def get_pipeline_dag(self) -> dict[str, Node]:
        """The DAG: step name → Node."""
        return dict(self._nodes)

    def get_processed_nodes(self) -> list[Node]:
        """Nodes that finished (completed, failed, aborted, skipped, cached)."""
        return [n for n in self._nodes.values() if n.is_finished]

    def get_running_nodes(self) -> list[Node]:
        """Nodes whose task is being launched, queued or running."""
        return [n for n in self._nodes.values() if n.is_running]

    def update_execution_plot(self) -> None:
        """Record the DAG state on the pipeline task now (it is also recorded on every change)."""
        self._record_state()

    @property
    def id(self) -> str | None:
        """The pipeline (controller) task id, once started."""
        return self._task_id

    # ------------------------------------------------------------ internals
    def _apply_default_callbacks(self, created: Callable[..., Any] | None, completed: Callable[..., Any] | None) -> None:
        for node in self._nodes.values():
            if created is not None and node.pre_execute_callback is None:
                node.pre_execute_callback = created
            if completed is not None and node.post_execute_callback is None:
                node.post_execute_callback = completed

    def _prepare(self) -> None:
        dag.add_implied_parents(self._nodes)
        if not self._dynamic:
            dag.validate_dag(self._nodes, self._parameters, self._backend)

    def _begin(self, run_steps_locally: bool) -> None:
        self._prepare()
        self._run_steps_locally = run_steps_locally
        attached = os.environ.get("CONVEYOR_TASK_ID")
        if attached:
            self._attach(attached)
        else:
            task = self._create_controller_task(queue=None)
            self._backend.set_status(task.id, TaskStatus.in_progress, reason="started",
                                     message="pipeline running locally")
        self._started_at = time.time()
        self._status = "running"
        self._record_state()

    def _stop_on_sigterm(self) -> None:
        """Under an agent, SIGTERM (an abort, a time limit, agent shutdown) stops the
        pipeline cleanly: running steps are aborted before this process ends."""
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(_signum: int, _frame: Any) -> None:
            log.warning("SIGTERM: stopping the pipeline and its running steps")
            self._stop_mark_aborted = True
            self._stop_event.set()

        signal.signal(signal.SIGTERM, handler)

    def _run_loop(self) -> None:
        self._runner = PipelineRunner(self)
        try:
            self._runner.run()
        finally:
            self._finish()

    def _finish(self) -> None:
        runner = self._runner
        failed = bool(runner and runner.failed) or self._stop_mark_failed
        aborted = self._stop_mark_aborted or bool(runner and runner.aborted)
        if aborted and not self._stop_mark_failed:
            self._status, status, reason = "stopped", TaskStatus.stopped, "aborted"
        elif failed:
            self._status, status, reason = "failed", TaskStatus.failed, "pipeline_failed"
        else:
            self._status, status, reason = "completed", TaskStatus.completed, "completed"
        message = (runner.failure_message if runner and runner.failed else "") or self._status
        self._record_state()
        under_agent = bool(os.environ.get("CONVEYOR_TASK_ID"))
        # Under an agent, success is reported by the agent when this process exits 0.
        if self._task_id and (not under_agent or status != TaskStatus.completed):
            try:
                current = self._task_record().status
                if current == TaskStatus.in_progress or current == TaskStatus.stopping:
                    self._backend.set_status(self._task_id, status, reason=reason, message=message)
            except ConveyorError as exc:
                log.warning("cannot record the pipeline's final status: %s", exc)
        log.info("pipeline %s: %s", self._name, message)
        self._done.set()

    def _attach(self, task_id: str) -> None:
        """Use the task this process runs as (under an agent) as the controller task."""
        self._task_id = task_id
        record = self._task_record()
        from controller.sdk.params import cast_like

        for key, default in list(self._parameters.items()):
            section, name = self._parameter_location(key)
            stored = record.hyperparams.get(section, {})
            if name in stored:  # an override on this run (or its clone), typed like the default
                value = stored[name]
                self._parameters[key] = value if default is None else cast_like(
                    value, default, where=f"pipeline parameter {key!r}")
        for key, value in record.configuration.items():
            if key in self._configurations:
                self._configurations[key] = value
        self._edit_own_task({
            "hyperparams": self._parameter_sections(),
            "configuration": {**self._configurations, "Pipeline": self._definition()},
        })

    def _parameter_location(self, key: str) -> tuple[str, str]:
        """(section, name) of a pipeline parameter: "Pipeline" for add_parameter, the
        argument's section ("Args" by default) for PipelineDecorator arguments."""
        if self._dynamic and "/" in key:
            section, _, name = key.partition("/")
            return section, name
        return PIPELINE_SECTION, key

    def _parameter_sections(self) -> dict[str, dict[str, Any]]:
        sections: dict[str, dict[str, Any]] = {}
        for key, value in self._parameters.items():
            section, name = self._parameter_location(key)
            sections.setdefault(section, {})[name] = to_json_value(value)
        return sections or {PIPELINE_SECTION: {}}

    def _create_controller_task(self, queue: str | None) -> TaskRecord:
        from controller.pipeline.function_step import describe_script

        script, packages = describe_script(self._repo, self._working_dir)
        version = self._version or self._next_version()
        name = self._name
        if self._add_run_number:
            runs = self._backend.query_tasks(project=self._project, type=TaskType.controller.value, limit=10_000)
            count = sum(1 for t in runs if t.name == name or t.name.startswith(f"{name} #"))
            if count:
                name = f"{name} #{count + 1}"
        spec = {
            "name": name, "project": self._project, "type": TaskType.controller.value,
            "tags": list(dict.fromkeys(["pipeline", *self._tags])),
            "script": script,
            "packages": packages if self._packages is None else _packages_list(self._packages),
            "container": self._container,
            "hyperparams": self._parameter_sections(),
            "configuration": {**self._configurations, "Pipeline": self._definition(version)},
            "execution": {"queue": queue or ""},
        }
        task = self._backend.create_task(spec)
        self._task_id = task.id
        self._version = version
        return task

    def _next_version(self) -> str:
        previous = self._backend.query_tasks(project=self._project, type=TaskType.controller.value, limit=1000)
        versions = [
            t.configuration.get("Pipeline", {}).get("version")
            for t in previous
            if t.name == self._name or t.name.startswith(f"{self._name} #")
        ]
        versions = [v for v in versions if isinstance(v, str) and v]
        if not versions:
            return "1.0.0"
        latest = max(versions, key=_version_key)
        parts = latest.split(".")
        if parts[-1].isdigit():
            parts[-1] = str(int(parts[-1]) + 1)
            return ".".join(parts)
        return latest

    def _definition(self, version: str | None = None) -> dict[str, Any]:
        return {
            "name": self._name,
            "version": version or self._version or "",
            "steps": {n.name: {**n.state(), "status": "pending", "task_id": None} for n in self._nodes.values()},
            "parameters": {k: to_json_value(v) for k, v in self._parameters.items()},
            "abort_on_failure": self._abort_on_failure,
            "time_limit_s": self._time_limit_s,
        }

    def _create_step_task(self, node: Node, resolved: ResolvedStep) -> TaskRecord:
        """The task a node will run: a clone of its base task, or made from its function."""
        project = self._step_project()
        tags = [*node.tags]
        if self._add_pipeline_tags and self._task_id:
            tags.append(f"pipe: {self._task_id}")
        if node.function_spec is not None:
            spec = dict(node.function_spec["task_spec"])
            script = dict(spec["script"])
            script.update(repository_fields(*node.function_spec.get("repo", (None, None, None))))
            if node.function_spec.get("working_dir"):
                script["working_dir"] = node.function_spec["working_dir"]
            spec["script"] = script
            spec.update(name=node.function_spec["task_name"], parent=self._task_id,
                        project=node.function_spec.get("project") or project,
                        type=node.function_spec["task_type"], tags=tags,
                        container=node.function_spec["container"])
            return self._backend.create_task(spec)
        if node.base_task_factory is not None:
            made = node.base_task_factory(node)
            task_id = getattr(made, "id", None) or (made if isinstance(made, str) else None)
            if not task_id:
                raise ValueError("base_task_factory must return a Task or a task id")
            node.base_task_id = str(task_id)
        if not node.base_task_id:
            raise NotFoundError(f"step '{node.name}' has no base task")
        if not node.clone_task:
            base = self._backend.get_task(node.base_task_id)
            if base.status != TaskStatus.created:
                raise ValueError(f"clone_base_task=False needs a draft base task; {base.id} is {base.status.value}")
            return self._backend.edit_task(base.id, {"parent": self._task_id, "tags": [*base.tags, *tags]})
        base = self._backend.get_task(node.base_task_id)
        clone = self._backend.clone_task(node.base_task_id, name=node.name, parent=self._task_id,
                                         project=project if self._target_project not in (True, None) else base.project)
        if tags:
            clone = self._backend.edit_task(clone.id, {"tags": [*clone.tags, *tags]})
        return clone

    def _step_project(self) -> str:
        target = self._target_project
        if isinstance(target, str) and target:
            return target
        return self._project

    def _local_settings(self, worker_id: str) -> Any:
        from agent.executor import ExecutionSettings

        return ExecutionSettings(worker_id=worker_id, api_url=self._backend.url,
                                 api_token=os.environ.get("CONVEYOR_API_TOKEN"), home=conveyor_home())

    def _task_record(self) -> TaskRecord:
        assert self._task_id is not None
        return self._backend.get_task(self._task_id)

    def _edit_own_task(self, changes: Mapping[str, Any]) -> None:
        if self._task_id:
            try:
                self._backend.edit_task(self._task_id, changes, force=True)
            except ConveyorError as exc:
                log.warning("cannot update the pipeline task: %s", exc)

    def _record_state(self) -> None:
        """Write the DAG state onto the controller task (runtime.pipeline)."""
        if not self._task_id:
            return
        with self._state_lock:
            state = {
                "name": self._name,
                "version": self._version,
                "status": self._status,
                "started": self._started_at,
                "updated": time.time(),
                "nodes": {name: node.state() for name, node in list(self._nodes.items())},
                "parameters": {k: to_json_value(v) for k, v in self._parameters.items()},
            }
            self._edit_own_task({"runtime": {"pipeline": state}})

    # ------------------------------------------------------------- class API
    @classmethod
    def get(
        cls, pipeline_id: str | None = None, pipeline_project: str | None = None,
        pipeline_name: str | None = None, pipeline_version: str | None = None,
        pipeline_tags: Sequence[str] | None = None, shallow_search: bool = False,
    ) -> PipelineController:
        """An existing pipeline (its controller task), by id or project/name/version/tags."""
        backend = get_backend()
        if pipeline_id:
            record = backend.get_task(pipeline_id)
        else:
            found = [
                t for t in backend.query_tasks(project=pipeline_project, type=TaskType.controller.value,
                                               tags=list(pipeline_tags or []) or None,
                                               limit=500 if shallow_search else 10_000)
                if pipeline_name is None or t.name == pipeline_name or t.name.startswith(f"{pipeline_name} #")
            ]
            if pipeline_version is not None:
                found = [t for t in found if t.configuration.get("Pipeline", {}).get("version") == pipeline_version]
            if not found:
                raise NotFoundError(f"no pipeline named {pipeline_name!r} in project {pipeline_project!r}"
                                    + (f" with version {pipeline_version!r}" if pipeline_version else ""))
            record = max(found, key=lambda t: (_version_key(t.configuration.get("Pipeline", {}).get("version") or ""),
                                               t.created_at))
        definition = record.configuration.get("Pipeline", {})
        pipe = cls(name=definition.get("name") or record.name, project=record.project,
                   version=definition.get("version"), add_run_number=False)
        pipe._task_id = record.id
        pipe._parameters = dict(record.hyperparams.get(PIPELINE_SECTION, {}))
        return pipe

    @classmethod
    def enqueue(cls, pipeline_controller: PipelineController | str, queue_name: str | None = None,
                queue_id: str | None = None, force: bool = False) -> dict[str, Any]:
        """Enqueue a recorded pipeline (object or id) on a queue (default "services")."""
        backend = get_backend()
        task_id = pipeline_controller if isinstance(pipeline_controller, str) else pipeline_controller.id
        if not task_id:
            raise ValueError("the pipeline has no task yet: call create_draft() or start() first")
        record = backend.get_task(task_id)
        if force and record.status.is_terminal:
            backend.reset_task(task_id)
        queued = backend.enqueue(task_id, queue_name or queue_id or "services")
        return {"queued": 1, "updated": 1, "fields": {"status": queued.status.value,
                                                      "execution.queue": queued.execution.queue}}

    @classmethod
    def _pipeline_task(cls) -> Any:
        from controller.sdk.task import Task

        current = Task.current_task()
        if current is None:
            raise ValueError("no pipeline task found: call this from a pipeline or one of its steps")
        record = get_backend().get_task(current.id)
        if record.type != TaskType.controller and record.parent:
            return Task.get_task(task_id=record.parent)
        return current

    @classmethod
    def get_logger(cls) -> Any:
        """The Logger of the pipeline task (from the controller or any of its steps)."""
        return cls._pipeline_task().get_logger()

    @classmethod
    def upload_artifact(cls, name: str, artifact_object: Any, metadata: Mapping | None = None,
                        delete_after_upload: bool = False, auto_pickle: bool = True, preview: Any = None,
                        wait_on_upload: bool = False, serialization_function: Callable | None = None) -> bool:
        """Upload an artifact to the pipeline task (from the controller or any of its steps)."""
        return cls._pipeline_task().upload_artifact(
            name, artifact_object, metadata=metadata, delete_after_upload=delete_after_upload,
            auto_pickle=auto_pickle, preview=preview, wait_on_upload=wait_on_upload,
            serialization_function=serialization_function)

    @classmethod
    def upload_model(cls, model_name: str, model_local_path: str, upload_uri: str | None = None) -> Any:
        """Upload a model file to the pipeline task; returns the OutputModel."""
        from controller.sdk.output_model import OutputModel

        model = OutputModel(task=cls._pipeline_task(), name=model_name)
        model.update_weights(weights_filename=model_local_path, upload_uri=upload_uri)
        return model


def _mapping(step: str, field_name: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise step_error(step, field_name, "must be a dict")
    return dict(value)


def _packages_list(packages: str | Sequence[str]) -> list[str]:
    if isinstance(packages, str):
        path = Path(packages)
        if path.is_file():
            return [line.strip() for line in path.read_text().splitlines()
                    if line.strip() and not line.startswith("#")]
        return [packages]
    return list(packages)


def _version_key(version: str) -> tuple:
    return tuple(int(p) if p.isdigit() else -1 for p in str(version).split("."))


__all__ = ["PipelineController", "PipelineDefinitionError", "COMPLETED", "CACHED"]
