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
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from controller.backend import Backend
from controller.connect import get_backend
from controller.errors import ConveyorError
from controller.models import TaskStatus
from controller.pipeline import dag
from controller.pipeline.dag import PipelineDefinitionError
from controller.pipeline.definition import DefinitionMixin
from controller.pipeline.node import Node
from controller.pipeline.pipeline_task import PipelineTaskMixin
from controller.pipeline.runner import PipelineRunner

log = logging.getLogger("conveyor.pipeline")



class PipelineController(DefinitionMixin, PipelineTaskMixin):
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














__all__ = ["PipelineController", "PipelineDefinitionError"]
