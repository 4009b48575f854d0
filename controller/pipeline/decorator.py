"""PipelineDecorator: pipelines from decorated functions, on the PipelineController engine.

`@PipelineDecorator.component` turns a function into a step factory; calling it inside a
running pipeline adds a function step to the DAG and launches it at once, returning lazy
results (`controller.pipeline.lazy`). `@PipelineDecorator.pipeline` turns the pipeline
logic function into a pipeline: calling it runs the pipeline.

Modes (decisions where the reference is vague):

- remote (default): outside an agent the call records the pipeline task (this script,
  the call's arguments as parameters in sections per `args_map`, default "Args"),
  enqueues it on `pipeline_execution_queue` ("services") and ends the process (exit 0);
  the agent runs the script again, and there the call runs the logic, with the
  parameters stored on the task (they may have been edited) replacing the arguments.
  `pipeline_execution_queue=None` or `start_controller_locally=True` run the logic in
  this process; steps always go to agents (`default_queue`, else "default").
- `PipelineDecorator.run_locally()`: the logic here, each step as a local subprocess,
  data passed exactly as in remote mode (through artifacts).
- `PipelineDecorator.debug_pipeline()`: components are plain function calls, serially,
  with no task of their own; the pipeline task is recorded as in every mode (parameters,
  return value, logger, artifacts and models reported through the class API).

A component whose step failed raises PipelineStepError (naming the step and the reason)
where its result is used, unless its continue behaviour lets the pipeline go on, in
which case the result is None.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from controller.pipeline.controller import PipelineController
from controller.pipeline.definition import warn_unsupported_step_options
from controller.pipeline.function_step import OBJECT_MODULES_KEY, innermost_function, object_modules
from controller.pipeline.launch import ArtifactInput
from controller.pipeline.lazy import LazyResult, PipelineStepError, resolve_value
from controller.pipeline.node import CACHED, COMPLETED
from controller.pipeline.running import PipelineRunner
from controller.pipeline.state import set_pipeline_of_this_thread

_local = threading.local()


def _current() -> PipelineController | None:
    return getattr(_local, "pipeline", None)


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


class PipelineDecorator(PipelineController):
    """Pipelines from functions: `@PipelineDecorator.pipeline` and `@PipelineDecorator.component`.

    A subclass of PipelineController, as in the reference: the class-level API
    (get_logger, upload_artifact, upload_model, get, enqueue, ...) is inherited. The
    pipeline a decorated function runs is a PipelineController instance.
    """

    _mode = "remote"  # remote | local | debug
    _default_queue: str | None = None
    _multi_results: list[threading.Thread | Any] = []
    _multi_lock = threading.Lock()

    # ----------------------------------------------------------------- modes
    @classmethod
    def run_locally(cls) -> None:
        """Run the pipeline logic here and every step as a local subprocess."""
        cls._mode = "local"

    @classmethod
    def debug_pipeline(cls) -> None:
        """Run components as plain functions, serially, creating no step tasks (the
        pipeline task is recorded as in every mode)."""
        cls._mode = "debug"

    @classmethod
    def set_default_execution_queue(cls, default_execution_queue: str | None) -> None:
        """The queue of components that name none (default: the pipeline's default_queue)."""
        cls._default_queue = default_execution_queue

    @classmethod
    def get_current_pipeline(cls) -> PipelineController | None:
        """The pipeline running in this thread (None outside a pipeline)."""
        return _current()

    # ------------------------------------------------------------- component
    @classmethod
    def component(
        cls,
        _func: Callable[..., Any] | None = None,
        *,
        return_values: str | Sequence[str] = ("return_object",),
        name: str | None = None,
        cache: bool = False,
        packages: str | Sequence[str] | None = None,
        parents: Sequence[str] | None = None,
        execution_queue: str | None = None,
        continue_on_fail: bool = False,
        docker: str | None = None,
        docker_args: str | None = None,
        docker_bash_setup_script: str | None = None,
        task_type: str | None = None,
        auto_connect_frameworks: dict | None = None,
        auto_connect_arg_parser: dict | None = None,
        repo: str | None = None,
        repo_branch: str | None = None,
        repo_commit: str | None = None,
        helper_functions: Sequence[Callable[..., Any]] | None = None,
        monitor_metrics: list | None = None,
        monitor_artifacts: list | None = None,
        monitor_models: list | None = None,
        retry_on_failure: int | Callable[..., bool] | None = None,
        pre_execute_callback: Callable[..., Any] | None = None,
        post_execute_callback: Callable[..., Any] | None = None,
        status_change_callback: Callable[..., Any] | None = None,
        tags: str | Sequence[str] | None = None,
        output_uri: str | bool | None = None,
        draft: bool = False,
        working_dir: str | None = None,
        continue_behaviour: Mapping[str, bool] | None = None,
    ) -> Any:
        """Decorate a function as a pipeline component (see the module docstring)."""
        returns = [return_values] if isinstance(return_values, str) else list(return_values or [])
        warn_unsupported_step_options(False, auto_connect_frameworks, auto_connect_arg_parser)
        options = dict(
            cache_executed_step=cache, packages=packages, parents=parents, execution_queue=execution_queue,
            continue_on_fail=continue_on_fail, docker=docker, docker_args=docker_args,
            docker_bash_setup_script=docker_bash_setup_script, task_type=task_type, repo=repo,
            repo_branch=repo_branch, repo_commit=repo_commit, helper_functions=helper_functions,
            monitor_metrics=monitor_metrics, monitor_artifacts=monitor_artifacts, monitor_models=monitor_models,
            retry_on_failure=retry_on_failure, pre_execute_callback=pre_execute_callback,
            post_execute_callback=post_execute_callback, status_change_callback=status_change_callback,
            tags=tags, output_uri=output_uri, draft=draft, working_dir=working_dir,
            continue_behaviour=continue_behaviour,
        )

        def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
            step_name = name or innermost_function(function).__name__

            @functools.wraps(function)
            def call(*args: Any, **kwargs: Any) -> Any:
                pipe = _current()
                if pipe is None or cls._mode == "debug":
                    values = function(*(resolve_value(a) for a in args),
                                      **{k: resolve_value(v) for k, v in kwargs.items()})
                    return values
                return _launch_component(pipe, function, step_name, returns, options, args, kwargs)

            call.__conveyor_component__ = function  # type: ignore[attr-defined]
            return call

        return decorate(_func) if _func is not None else decorate

    # -------------------------------------------------------------- pipeline
    @classmethod
    def pipeline(
        cls,
        _func: Callable[..., Any] | None = None,
        *,
        name: str,
        project: str,
        version: str | None = None,
        return_value: str | None = None,
        default_queue: str | None = None,
        pool_frequency: float = 0.2,
        add_pipeline_tags: bool = False,
        target_project: str | None = None,
        abort_on_failure: bool = False,
        pipeline_execution_queue: str | None = "services",
        multi_instance_support: bool | str = False,
        add_run_number: bool = True,
        args_map: Mapping[str, Sequence[str]] | None = None,
        start_controller_locally: bool = False,
        retry_on_failure: int | Callable[..., bool] | None = None,
        docker: str | None = None,
        docker_args: str | None = None,
        docker_bash_setup_script: str | None = None,
        packages: str | Sequence[str] | None = None,
        repo: str | None = None,
        repo_branch: str | None = None,
        repo_commit: str | None = None,
        artifact_serialization_function: Callable[[Any], bytes] | None = None,
        artifact_deserialization_function: Callable[[bytes], Any] | None = None,
        output_uri: str | bool | None = None,
        skip_global_imports: bool = False,
        working_dir: str | None = None,
    ) -> Any:
        """Decorate the pipeline logic function (see the module docstring)."""
        controller_options = dict(
            name=name, project=project, version=version, pool_frequency=pool_frequency,
            add_pipeline_tags=add_pipeline_tags, target_project=target_project or True,
            abort_on_failure=abort_on_failure, add_run_number=add_run_number,
            retry_on_failure=retry_on_failure, docker=docker, docker_args=docker_args,
            docker_bash_setup_script=docker_bash_setup_script, packages=packages, repo=repo,
            repo_branch=repo_branch, repo_commit=repo_commit,
            artifact_serialization_function=artifact_serialization_function,
            artifact_deserialization_function=artifact_deserialization_function,
            output_uri=output_uri, skip_global_imports=skip_global_imports, working_dir=working_dir,
        )

        def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
            signature = inspect.signature(function)
            sections = {arg: section for section, names in (args_map or {}).items() for arg in names}

            @functools.wraps(function)
            def run(*args: Any, **kwargs: Any) -> Any:
                bound = signature.bind(*args, **kwargs)
                bound.apply_defaults()
                arguments = dict(bound.arguments)
                job = functools.partial(
                    _run_pipeline, function, arguments, sections, controller_options, return_value,
                    default_queue, pipeline_execution_queue, start_controller_locally,
                )
                if multi_instance_support == "parallel":
                    result: dict[str, Any] = {}
                    thread = threading.Thread(target=lambda: result.update(value=job()), daemon=True)
                    thread.start()
                    with cls._multi_lock:
                        cls._multi_results.append((thread, result))
                    return None
                return job()

            return run

        return decorate(_func) if _func is not None else decorate

    @classmethod
    def wait_for_multi_pipelines(cls) -> list[Any]:
        """Wait for every parallel pipeline call; their results in call order."""
        with cls._multi_lock:
            pending, cls._multi_results = list(cls._multi_results), []
        results = []
        for thread, result in pending:
            thread.join()
            results.append(result.get("value"))
        return results


def _run_pipeline(
    function: Callable[..., Any],
    arguments: dict[str, Any],
    sections: dict[str, str],
    controller_options: dict[str, Any],
    return_value: str | None,
    default_queue: str | None,
    execution_queue: str | None,
    start_locally: bool,
) -> Any:
    """Run one pipeline call (see the module docstring for the modes)."""
    pipe = PipelineController(**controller_options)
    pipe._dynamic = True
    pipe._default_queue = PipelineDecorator._default_queue or default_queue or "default"
    for arg, value in arguments.items():
        section = sections.get(arg, "Args")
        pipe._parameters[f"{section}/{arg}"] = value if _jsonable(value) else repr(value)
    under_agent = bool(os.environ.get("CONVEYOR_TASK_ID"))
    mode = PipelineDecorator._mode
    if mode == "debug":
        return _debug_pipeline(pipe, function, arguments, return_value)
    if mode == "remote" and not under_agent and execution_queue and not start_locally:
        pipe.start(queue=execution_queue)  # records, enqueues and ends this process
    pipe._begin(run_steps_locally=(mode == "local"))
    if under_agent:
        pipe._stop_on_sigterm()
        for key, value in pipe._parameters.items():  # the task's stored values win
            section, _, arg = key.partition("/")
            if arg in arguments and sections.get(arg, "Args") == section:
                arguments[arg] = value
    pipe._definition_open = True
    runner = PipelineRunner(pipe)
    pipe._runner = runner
    loop = threading.Thread(target=runner.run, name="pipeline-loop", daemon=True)
    loop.start()
    _local.pipeline = pipe
    set_pipeline_of_this_thread(pipe._task_id)
    error: BaseException | None = None
    result: Any = None
    try:
        result = resolve_value(function(**arguments))
    except BaseException as exc:  # noqa: BLE001 - recorded on the pipeline, then raised
        error = exc
        runner._fail(f"the pipeline function raised {type(exc).__name__}: {exc}")
        pipe._stop_event.set()
    finally:
        _local.pipeline = None
        set_pipeline_of_this_thread(None)
        pipe._definition_open = False
        runner._launches.put(("", None))
        loop.join()
    return _end_pipeline(pipe, runner, result, error, return_value)


def _end_pipeline(pipe: PipelineController, runner: PipelineRunner, result: Any, error: BaseException | None,
                  return_value: str | None) -> Any:
    """Store the return value, record how the pipeline ended, raise the logic's error."""
    if error is None and return_value and pipe._task_id:
        try:
            from controller.sdk.task import Task

            Task.get_task(task_id=pipe._task_id).upload_artifact(return_value, result)
        except Exception as exc:  # noqa: BLE001
            runner._fail(f"cannot store the return value as artifact {return_value!r}: {exc}")
    pipe._finish()
    if error is not None:
        raise error
    pipe._exit_if_failed_under_agent()
    return result


def _debug_pipeline(pipe: PipelineController, function: Callable[..., Any], arguments: dict[str, Any],
                    return_value: str | None) -> Any:
    """debug_pipeline(): the pipeline task is recorded as in every mode; the components
    are plain function calls, serially, with no task of their own (as the reference says)."""
    pipe._begin(run_steps_locally=True)
    runner = PipelineRunner(pipe)  # never run: it only records how the logic ended
    pipe._runner = runner
    _local.pipeline = pipe
    set_pipeline_of_this_thread(pipe._task_id)
    error: BaseException | None = None
    result: Any = None
    try:
        result = function(**arguments)
    except BaseException as exc:  # noqa: BLE001 - recorded on the pipeline, then raised
        error = exc
        runner._fail(f"the pipeline function raised {type(exc).__name__}: {exc}")
    finally:
        _local.pipeline = None
        set_pipeline_of_this_thread(None)
    return _end_pipeline(pipe, runner, result, error, return_value)


def _launch_component(
    pipe: PipelineController,
    function: Callable[..., Any],
    step_name: str,
    returns: list[str],
    options: dict[str, Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """Add a component call as a function step, launch it, return its lazy results."""
    signature = inspect.signature(innermost_function(function))
    bound = signature.bind_partial(*args, **kwargs).arguments
    name = _unique_name(pipe, step_name)
    function_kwargs: dict[str, Any] = {}
    parents = list(options.get("parents") or [])
    for arg, value in bound.items():
        if isinstance(value, LazyResult):
            function_kwargs[arg] = value.reference
            if value._step not in parents:
                parents.append(value._step)
        elif _jsonable(value):
            function_kwargs[arg] = value
        else:
            function_kwargs[arg] = _upload_input(pipe, name, arg, resolve_value(value))
    step_options = {k: v for k, v in options.items() if k != "parents"}
    queue = step_options.pop("execution_queue") or pipe._default_queue
    pipe.add_function_step(
        name, function, function_kwargs=function_kwargs, function_return=returns,
        parents=parents, execution_queue=queue, **step_options,
    )
    node = pipe._nodes[name]
    pipe._runner.add_node(node)
    results = [LazyResult(name, ret, functools.partial(_fetch, pipe, name, ret)) for ret in returns]
    if not results:
        return None
    return results[0] if len(results) == 1 else tuple(results)


def _unique_name(pipe: PipelineController, base: str) -> str:
    if base not in pipe._nodes:
        return base
    n = 1
    while f"{base}_{n}" in pipe._nodes:
        n += 1
    return f"{base}_{n}"


def _upload_input(pipe: PipelineController, step: str, arg: str, value: Any) -> ArtifactInput:
    """A non-JSON argument goes to the pipeline task as an artifact the step fetches."""
    from controller.sdk.task import Task

    artifact = f"{step}.{arg}"
    Task.get_task(task_id=pipe._task_id).upload_artifact(
        artifact, value, metadata={OBJECT_MODULES_KEY: object_modules(value)},
        serialization_function=pipe._artifact_serialization_function)
    return ArtifactInput(f"{pipe._task_id}.{artifact}")


def _fetch(pipe: PipelineController, step: str, return_name: str) -> Any:
    """Wait for a component's step and return one of its results."""
    with pipe._node_finished:
        pipe._node_finished.wait_for(lambda: pipe._nodes[step].is_finished)
    node = pipe._nodes[step]
    if node.status not in (COMPLETED, CACHED):
        behaviour = node.continue_behaviour
        if (node.status == "failed" and behaviour.continue_on_fail) or (
            node.status == "aborted" and behaviour.continue_on_abort
        ):
            return None
        raise PipelineStepError(f"pipeline step '{step}' {node.status}: {node.status_message}")
    from controller.sdk.task import Task

    task = Task.get_task(task_id=node.executed)
    return task.artifacts[return_name].get(deserialization_function=pipe._artifact_deserialization_function)
