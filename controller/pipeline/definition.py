"""Defining a pipeline: parameters, steps from base tasks, steps from functions, validation.

Part of PipelineController (see `controller.pipeline.controller`). Bad option values are
refused when a step is added, with one PipelineDefinitionError naming the step and the
field; what needs the whole DAG (parents, cycles, references, base tasks) is checked
when the pipeline starts.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from controller.models import TaskType
from controller.pipeline.dag import (
    PipelineDefinitionError,
    add_implied_parents,
    step_error,
    validate_dag,
)
from controller.pipeline.function_step import build_function_spec, repository_fields
from controller.pipeline.node import ContinueBehaviour, Node, to_json_value

STEP_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_\-]{0,127}$")

log = logging.getLogger("conveyor.pipeline")

#: Arguments accepted for compatibility with the reference that do nothing here (see the
#: table in docs/pipelines.md), and why.
NOT_SUPPORTED = {
    "draft": "steps are always created to run",
    "auto_version_bump": "a new version is always the last one + 1 (deprecated in the reference)",
    "always_create_from_code=False": "the pipeline is always built from its code",
    "auto_connect_frameworks": "no framework hooks",
    "auto_connect_arg_parser": "no argparse hooks",
    "pool_frequency": "the loop wakes on status changes, it does not poll",
}
_warned: set[str] = set()


def warn_not_supported(argument: str) -> None:
    """Log once per process that an accepted argument is not supported (NOT_SUPPORTED)."""
    if argument in _warned:
        return
    _warned.add(argument)
    log.warning("pipeline argument %s is accepted but not supported: %s (see docs/pipelines.md)",
                argument, NOT_SUPPORTED[argument])


def warn_unsupported_step_options(draft: bool, auto_connect_frameworks: Any, auto_connect_arg_parser: Any) -> None:
    """The one-time warnings for a step's accepted-not-supported options that were given."""
    if draft:
        warn_not_supported("draft")
    if auto_connect_frameworks is not None:
        warn_not_supported("auto_connect_frameworks")
    if auto_connect_arg_parser is not None:
        warn_not_supported("auto_connect_arg_parser")


class DefinitionMixin:
    """add_parameter, add_step, add_function_step and the other definition calls."""

    def add_parameter(
        self, name: str, default: Any = None, description: str | None = None, param_type: str | None = None
    ) -> None:
        """Add a pipeline parameter (section "Pipeline"), referenced as `${pipeline.<name>}`."""
        if not isinstance(name, str) or not name or "/" in name:
            raise PipelineDefinitionError(f"pipeline parameter name {name!r}: a non-empty name without '/'")
        self._parameters[name] = default
        if description:
            self._parameter_descriptions[name] = description
        if param_type:
            self._parameter_types[name] = str(param_type)

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
        warn_unsupported_step_options(draft, auto_connect_frameworks, auto_connect_arg_parser)
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

    def _prepare(self) -> None:
        """Add the parents references imply; validate the whole DAG (see `dag.validate_dag`)."""
        add_implied_parents(self._nodes)
        if not self._dynamic:
            validate_dag(self._nodes, self._parameters, self._backend)

    def _definition(self, version: str | None = None) -> dict[str, Any]:
        """The definition as recorded in the controller task's configuration["Pipeline"]."""
        return {
            "name": self._name,
            "version": version or self._version or "",
            "steps": {n.name: {**n.state(), "status": "pending", "task_id": None} for n in self._nodes.values()},
            "parameters": {k: to_json_value(v) for k, v in self._parameters.items()},
            "parameter_descriptions": dict(self._parameter_descriptions),
            "parameter_types": dict(self._parameter_types),
            "abort_on_failure": self._abort_on_failure,
            "time_limit_s": self._time_limit_s,
        }

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


def _mapping(step: str, field_name: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise step_error(step, field_name, "must be a dict")
    return dict(value)


def packages_list(packages: str | Sequence[str]) -> list[str]:
    """`packages` as a list: a requirements file's lines, one requirement, or the list given."""
    if isinstance(packages, str):
        path = Path(packages)
        if path.is_file():
            return [line.strip() for line in path.read_text().splitlines()
                    if line.strip() and not line.startswith("#")]
        return [packages]
    return list(packages)
