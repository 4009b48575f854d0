"""Running a pipeline: starting and stopping it, launching its steps, following them.

`RunningMixin` is PipelineController's run API (start, start_locally, stop, wait, ...)
and what a start does: validate, record or attach to the controller task, run the loop,
record how it ended. `PipelineRunner` is the loop: launch ready steps, follow their
statuses, apply the rules.

The loop is event driven: it sleeps in `Backend.wait_for_status_change` on the tasks of
its running steps (and its own controller task, to notice an abort) and wakes as soon as
one moves, instead of polling on a tick. Launches (resolve, clone, override, enqueue)
run in a thread pool so every ready step starts in parallel and a slow launch or a
pre_execute_callback never blocks the others. Callbacks (status change, post execute)
run on their own thread, off the scheduling path, so a callback may call `stop()`.

The DAG state on the controller task (`runtime.pipeline`) is not written on every node
change but once per turn of the loop, before it waits, with every change of the turn;
a launch writes it itself as soon as its step's task exists (before that task is
enqueued: a resume must know every task that may run), which also records what changed
before it. So the step after a finished one is launched without waiting for any write of
the state, and a chain costs about three writes per step instead of five.

A step that cannot be launched fails through the same retry / continue rules as a step
whose task failed; nothing a step does can kill or hang the loop.

Outages: while the control plane is unreachable (BackendUnavailableError) launching a
step, following the steps and recording the pipeline's final state wait and retry
(`retry_through_outage`, a log line every `OUTAGE_LOG_EVERY_S`); an outage never fails a
step. A launch retried after an outage finds the step task it may have created already
(no orphan clone). A pipeline running in this process (`start_locally`,
`PipelineDecorator.run_locally`) holds a lease on its own task (`ControllerLease`), so
a dead controller process is found like a dead agent.

Resuming: `_begin` restores a recorded run when the task carries a resume request (see
`controller.pipeline.state`); the loop then follows what was queued or running and
launches only what never started.
"""

from __future__ import annotations

import copy
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from controller.backend import Backend
from controller.errors import (
    BackendUnavailableError,
    ConflictError,
    ConveyorError,
    IllegalTransitionError,
)
from controller.models import DEFAULT_LEASE_S, TaskRecord, TaskStatus, merge_task_changes
from controller.pipeline.launch import (
    KWARGS_ARTIFACTS_SECTION,
    KWARGS_SECTION,
    ResolvedStep,
    Resolver,
    StepLaunchError,
    cache_key,
    clone_step_task,
    function_step_spec,
    hyperparams_from_overrides,
    packages_for_inputs,
    task_override_changes,
)
from controller.pipeline.local_step import LocalStep
from controller.pipeline.node import (
    ABORTED,
    CACHED,
    COMPLETED,
    FAILED,
    LAUNCHING,
    PENDING,
    QUEUED,
    RUNNING,
    SKIPPED,
    Node,
    StepJob,
    node_status_of,
    to_json_value,
)
from controller.pipeline.state import DEFAULT_AUTO_RESUMES, RESUME_KEY

if TYPE_CHECKING:  # pragma: no cover
    from controller.pipeline.controller import PipelineController

log = logging.getLogger("conveyor.pipeline")

#: Longest single wait for a status change (bounds how late stop() is noticed).
MAX_WAIT_S = 1.0
#: Wait while launches are in flight (their tasks join the watch list when done).
LAUNCHING_WAIT_S = 0.01
#: A step's move to queued or running is shown in the recorded state at most this much
#: later (at once with any other change): a short step costs no state write of its own
#: (its launch recorded its task before enqueuing it; a resume follows it from there).
STATE_PROGRESS_DELAY_S = 0.5
LAUNCH_THREADS = 8
CACHE_TAG_PREFIX = "cache:"
#: During an outage of the control plane, how often a waiting call says so in the log.
OUTAGE_LOG_EVERY_S = 5.0
#: Longest pause between two attempts of a call during an outage.
OUTAGE_RETRY_MAX_S = 2.0
#: How often a pipeline running in this process renews the lease on its own task.
CONTROLLER_HEARTBEAT_S = 2.0

_T = TypeVar("_T")


def retry_through_outage(what: str, call: Callable[[], _T], stop_event: threading.Event | None = None) -> _T:
    """`call()`, retried while the control plane is unreachable (BackendUnavailableError),
    with a log line every OUTAGE_LOG_EVERY_S naming `what` waits. Other errors are raised
    at once; so is the outage error once `stop_event` is set."""
    outage_started: float | None = None
    next_log = 0.0
    pause_s = 0.2
    while True:
        try:
            result = call()
        except BackendUnavailableError as exc:
            now = time.monotonic()
            if outage_started is None:
                outage_started = now
            if now >= next_log:
                log.warning("the control plane is unreachable (%.0f s): waiting to %s: %s",
                            now - outage_started, what, exc)
                next_log = now + OUTAGE_LOG_EVERY_S
            if stop_event is not None and stop_event.is_set():
                raise
            if stop_event is not None:
                stop_event.wait(pause_s)
            else:
                time.sleep(pause_s)
            pause_s = min(pause_s * 2, OUTAGE_RETRY_MAX_S)
            continue
        if outage_started is not None:
            log.warning("the control plane answers again after %.0f s: %s done",
                        time.monotonic() - outage_started, what)
        return result


class ControllerLease:
    """The lease a pipeline running in this process holds on its own task, like an agent.

    The pipeline registers as the worker `pipeline:<host>:<pid>`, starts its task as
    that worker and heartbeats every CONTROLLER_HEARTBEAT_S with the task as its current
    task. If the process dies the lease expires and the store fails the task
    (`lease_expired`), as for a lost agent. A heartbeat answer that names the task
    (aborted, or no longer held) stops the pipeline through `on_abort`.
    """

    def __init__(self, backend: Backend, task_id: str, worker_id: str, on_abort: Callable[[], None],
                 lease_s: float = DEFAULT_LEASE_S) -> None:
        self.backend = backend
        self.task_id = task_id
        self.worker_id = worker_id
        self.lease_s = lease_s
        self._on_abort = on_abort
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="pipeline-lease", daemon=True)

    def start(self) -> None:
        """Register the worker, start the task as that worker, renew the lease on a thread."""
        retry_through_outage("register the pipeline's worker", lambda: self.backend.register_worker(
            self.worker_id, hostname=os.uname().nodename, queues=[]))
        retry_through_outage("start the pipeline task", lambda: self.backend.set_status(
            self.task_id, TaskStatus.in_progress, reason="started", message="pipeline running locally",
            worker_id=self.worker_id))
        self._thread.start()

    def stop(self) -> None:
        """Stop renewing and forget the worker (after the task's final status is recorded)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        try:
            self.backend.unregister_worker(self.worker_id)
        except ConveyorError as exc:
            log.debug("cannot unregister the pipeline's worker %s: %s", self.worker_id, exc)

    def _renew(self) -> None:
        failing_since: float | None = None
        while not self._stop.wait(CONTROLLER_HEARTBEAT_S):
            try:
                reply = self.backend.heartbeat(self.worker_id, current_tasks=[self.task_id], lease_s=self.lease_s)
            except Exception as exc:  # noqa: BLE001 - the lease thread must not die
                now = time.monotonic()
                if failing_since is None or now - failing_since >= OUTAGE_LOG_EVERY_S:
                    log.warning("cannot renew the pipeline task's lease: %s", exc)
                    failing_since = now
                continue
            failing_since = None
            if self.task_id in reply.abort:
                log.warning("the pipeline task %s was aborted or is no longer held by %s: stopping",
                            self.task_id, self.worker_id)
                self._on_abort()


class RunningMixin:
    """start, start_locally, stop, wait and the questions about a run."""

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
                self._exit_if_failed_under_agent()
            else:
                self._thread = threading.Thread(target=self._run_loop, name="pipeline", daemon=True)
                self._thread.start()
            return True
        self._prepare()
        task = self._create_controller_task(queue=queue)
        if self._auto_resumes:
            self._backend.edit_task(task.id, {"runtime": {RESUME_KEY: {
                "auto_max": self._auto_resumes, "auto_count": 0, "pending": ""}}}, force=True)
        self._backend.enqueue(task.id, queue)
        print(f"pipeline '{task.name}' ({task.id}) enqueued on '{queue}'; this process ends here",
              file=sys.stderr)
        sys.exit(0)

    #: Automatic resumes of a pipeline started on a queue (see `set_auto_resume`).
    _auto_resumes: int = DEFAULT_AUTO_RESUMES
    #: The lease on the pipeline's own task while it runs in this process.
    _lease: ControllerLease | None = None

    def set_auto_resume(self, max_resumes: int) -> None:
        """How many times a pipeline started with `start(queue)` is put back on its queue
        to resume when its controller is lost (its agent or process died); 0 turns it off.
        Default DEFAULT_AUTO_RESUMES."""
        if isinstance(max_resumes, bool) or not isinstance(max_resumes, int) or max_resumes < 0:
            raise ValueError(f"max_resumes must be an integer >= 0, got {max_resumes!r}")
        self._auto_resumes = max_resumes

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

    def get_processed_nodes(self) -> list[Node]:
        """Nodes that finished (completed, failed, aborted, skipped, cached)."""
        return [n for n in self._nodes.values() if n.is_finished]

    def get_running_nodes(self) -> list[Node]:
        """Nodes whose task is being launched, queued or running."""
        return [n for n in self._nodes.values() if n.is_running]

    # ------------------------------------------------------------ internals
    def _apply_default_callbacks(self, created: Callable[..., Any] | None, completed: Callable[..., Any] | None) -> None:
        for node in self._nodes.values():
            if created is not None and node.pre_execute_callback is None:
                node.pre_execute_callback = created
            if completed is not None and node.post_execute_callback is None:
                node.post_execute_callback = completed

    def _begin(self, run_steps_locally: bool) -> None:
        self._prepare()
        self._run_steps_locally = run_steps_locally
        attached = os.environ.get("CONVEYOR_TASK_ID")
        self._started_at = time.time()
        if attached:
            self._attach(attached)
            self._restore_recorded_run()
        else:
            task = self._create_controller_task(queue=None)
            self._lease = ControllerLease(self._backend, task.id, f"pipeline:{self._local_worker_id}",
                                          on_abort=self._stop_on_lost_lease)
            self._lease.start()
        self._status = "running"
        self._mark_running_here()
        self._record_state()

    def _stop_on_lost_lease(self) -> None:
        self._stop_mark_aborted = True
        self._stop_event.set()

    def _exit_if_failed_under_agent(self) -> None:
        """Under an agent, end this process with exit code 1 and the pipeline's message
        when the pipeline failed (the agent then reports the task failed)."""
        if os.environ.get("CONVEYOR_TASK_ID") and self._status == "failed":
            sys.exit(f"pipeline {self._name} failed: {self._status_message}")

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
        self._status_message = message
        self._record_state()
        if self._state_unsaved:
            retry_through_outage("record the pipeline's final state", self._record_state_or_raise)
        under_agent = bool(os.environ.get("CONVEYOR_TASK_ID"))
        # Under an agent, the agent reports how this process ended: exit 0 (completed) or
        # non-zero with the pipeline's message as the log's last line (failed, see
        # _exit_if_failed_under_agent). Setting the status here would make the agent
        # abort this process (a task it no longer holds): only a stop is recorded here.
        if self._task_id and (not under_agent or status == TaskStatus.stopped):
            try:
                retry_through_outage("record the pipeline's final status",
                                     lambda: self._set_final_status(status, reason, message))
            except ConveyorError as exc:
                log.warning("cannot record the pipeline's final status: %s", exc)
        if self._lease is not None:
            self._lease.stop()
        log.info("pipeline %s: %s", self._name, message)
        self._done.set()

    def _record_state_or_raise(self) -> None:
        self._record_state()
        if self._state_unsaved:
            raise BackendUnavailableError("the pipeline state was not recorded")

    def _set_final_status(self, status: TaskStatus, reason: str, message: str) -> None:
        current = self._task_record().status
        if current in (TaskStatus.in_progress, TaskStatus.stopping):
            self._backend.set_status(self._task_id, status, reason=reason, message=message)


class PipelineRunner:
    """Runs one pipeline to its end. Used by PipelineController; not public API."""

    def __init__(self, pipe: PipelineController) -> None:
        self.pipe = pipe
        self.backend = pipe._backend
        self.nodes: dict[str, Node] = pipe._nodes
        self.failed = False
        self.failure_message = ""
        self.aborted = False
        self._launches: queue.SimpleQueue[tuple[str, BaseException | None]] = queue.SimpleQueue()
        self._in_flight: set[str] = set()
        self._launch_pool = ThreadPoolExecutor(LAUNCH_THREADS, thread_name_prefix="pipeline-launch")
        self._callback_pool = ThreadPoolExecutor(1, thread_name_prefix="pipeline-callback")
        self._local_steps: list[LocalStep] = []
        self._lock = threading.RLock()
        self._outage_since: float | None = None
        self._outage_next_log = 0.0
        #: Records of completed step tasks by id, as the wait that saw them end returned
        #: them: what the references of the steps after them read.
        self._completed_records: dict[str, TaskRecord] = {}

    # ------------------------------------------------------------------ loop
    def run(self) -> None:
        """Launch and follow steps until every step is finished or the pipeline stops."""
        pipe = self.pipe
        deadline = (
            time.monotonic() + pipe._time_limit_s if pipe._time_limit_s else None
        )
        for node in list(self.nodes.values()):  # restored from the record (a resume)
            self._account_finished(node)
        try:
            while True:
                self._collect_launches()
                if pipe._stop_event.is_set():
                    self.aborted = self.aborted or pipe._stop_mark_aborted
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    self._fail(f"pipeline time limit of {pipe._time_limit_s / 60:g} min exceeded")
                    self.abort_running("the pipeline time limit was exceeded")
                    pipe._stop_event.set()  # local steps' processes are stopped too
                    break
                self._skip_unreachable()
                self._launch_ready()
                if self._finished():
                    break
                if not self._in_flight and (pipe._state_unsaved or self._progress_write_due() == 0):
                    pipe._record_state()  # (a launch records the state itself)
                self._wait_and_apply(deadline)
        finally:
            self._launch_pool.shutdown(wait=True)
            self._collect_launches()
            if pipe._stop_event.is_set() or self.failed and pipe._abort_on_failure:
                self.abort_running("the pipeline was stopped")
            for step in self._local_steps:
                step.join()
            self._callback_pool.shutdown(wait=True)
            pipe._record_state()

    def _finished(self) -> bool:
        with self._lock:
            return (
                not self.pipe._definition_open
                and not self._in_flight
                and all(n.is_finished for n in list(self.nodes.values()))
            )

    def add_node(self, node: Node) -> None:
        """Add a step while the pipeline runs (PipelineDecorator components) and launch it
        now if its parents are done; otherwise the loop launches it when they are.

        On a resume, a call recorded by the previous run (same component, same position
        in the call order, same inputs) takes the recorded step instead: a completed
        one's result is returned as it is, a queued or running one is followed."""
        if self.pipe._recorded_nodes:
            try:
                restored = self.pipe._restore_recorded_node(node)
            except ConveyorError as exc:
                log.warning("resume: cannot restore component call %s (%s): launched again", node.name, exc)
                restored = None
            if restored is not None:
                self._account_finished(node)
        with self._lock:
            self.nodes[node.name] = node
        self._skip_unreachable()
        self._launch_ready()
        self._launches.put(("", None))  # wake the loop: it may have nothing else to wait on

    def _wait_and_apply(self, deadline: float | None) -> None:
        known: dict[str, str] = {}
        for node in list(self.nodes.values()):
            if node.executed and node.status in (QUEUED, RUNNING):
                known[node.executed] = self._task_status_of(node)
        if self.pipe._task_id:
            known[self.pipe._task_id] = TaskStatus.in_progress.value
        wait_s = LAUNCHING_WAIT_S if self._in_flight else MAX_WAIT_S
        due_s = self._progress_write_due()
        if due_s is not None and not self._in_flight:  # (a launch writes the state itself)
            wait_s = min(wait_s, due_s)
        if deadline is not None:
            wait_s = max(0.0, min(wait_s, deadline - time.monotonic()))
        if not known:
            try:
                self._launches.put(self._launches.get(timeout=wait_s))
            except queue.Empty:
                pass
            return
        try:
            changed = self.backend.wait_for_status_change(known, wait_s=wait_s)
        except BackendUnavailableError as exc:
            now = time.monotonic()
            if self._outage_since is None:
                self._outage_since = now
            if now >= self._outage_next_log:
                log.warning("the control plane is unreachable (%.0f s): waiting to follow the steps: %s",
                            now - self._outage_since, exc)
                self._outage_next_log = now + OUTAGE_LOG_EVERY_S
            self.pipe._stop_event.wait(0.5)
            return
        except ConveyorError as exc:
            log.warning("cannot follow the steps (%s); retrying", exc)
            time.sleep(0.5)
            return
        if self._outage_since is not None:
            log.warning("the control plane answers again after %.0f s: following the steps",
                        time.monotonic() - self._outage_since)
            self._outage_since = None
            self._outage_next_log = 0.0
        for record in changed:
            if record.id == self.pipe._task_id:
                if record.status in (TaskStatus.stopping, TaskStatus.stopped):
                    log.info("the pipeline task was aborted: stopping")
                    self.pipe._stop_mark_aborted = True
                    self.pipe._stop_event.set()
                continue
            node = self._node_of_task(record.id)
            if node is not None:
                self._apply_task_status(node, record)

    def _progress_write_due(self) -> float | None:
        """Seconds until a step's move to queued or running must be written to the
        recorded state (0: now); None when no such change waits."""
        since = self.pipe._state_behind_since
        if since is None:
            return None
        return max(0.0, since + STATE_PROGRESS_DELAY_S - time.monotonic())

    def _task_status_of(self, node: Node) -> str:
        if node.status == QUEUED:
            return TaskStatus.queued.value
        return node.task_status or TaskStatus.in_progress.value

    def _node_of_task(self, task_id: str) -> Node | None:
        for node in list(self.nodes.values()):
            if node.executed == task_id:
                return node
        return None

    # ---------------------------------------------------------------- launch
    def _ready(self, node: Node) -> bool:
        if node.status != PENDING:
            return False
        for parent_name in node.parents:
            parent = self.nodes[parent_name]
            if not parent.is_finished:
                return False
        return True

    def _skip_unreachable(self) -> None:
        """Skip pending steps whose parent failed or aborted with skip-children on."""
        changed = True
        while changed:
            changed = False
            for node in list(self.nodes.values()):
                if node.status != PENDING:
                    continue
                for parent_name in node.parents:
                    parent = self.nodes[parent_name]
                    cb = parent.continue_behaviour
                    skip = (
                        parent.status == SKIPPED
                        or (parent.status == FAILED and cb.skip_children_on_fail)
                        or (parent.status == ABORTED and cb.skip_children_on_abort)
                    )
                    if skip:
                        self._set(node, SKIPPED, f"skipped: parent step '{parent_name}' is {parent.status}")
                        changed = True
                        break

    def _launch_ready(self) -> None:
        with self._lock:
            for node in list(self.nodes.values()):
                if self._ready(node) and not self.pipe._stop_event.is_set():
                    self._set(node, LAUNCHING)
                    self._in_flight.add(node.name)
                    self._launch_pool.submit(self._launch_safely, node)

    def _launch_safely(self, node: Node) -> None:
        try:
            self._launch(node)
            self._launches.put((node.name, None))
        except BaseException as exc:  # noqa: BLE001 - reported through the node
            log.debug("launch of %s failed:\n%s", node.name, traceback.format_exc())
            self._launches.put((node.name, exc))

    def _collect_launches(self) -> None:
        while True:
            try:
                name, error = self._launches.get_nowait()
            except queue.Empty:
                return
            if not name:
                continue
            with self._lock:
                self._in_flight.discard(name)
            node = self.nodes[name]
            if error is not None:
                self._finish(node, FAILED, f"cannot launch step '{name}': {error}")

    def _through_outage(self, what: str, call: Callable[[], Any]) -> Any:
        return retry_through_outage(what, call, self.pipe._stop_event)

    def _launch(self, node: Node) -> None:
        """Resolve, create (clone) the step task with its overrides, cache, callback, enqueue.

        Every call waits through an outage of the control plane; a creation retried
        after one first looks for the task it may have made (see `_create_once`)."""
        pipe = self.pipe
        resolver = Resolver(self.backend, self.nodes, pipe._parameters, self._completed_records)

        def resolve() -> Any:
            try:
                return resolver.resolve_node(node)
            except ValueError as exc:
                raise StepLaunchError(str(exc)) from None

        resolved = self._through_outage(f"resolve step '{node.name}'", resolve)
        node.resolved_parameters = dict(resolved.parameters)
        node.resolved_overrides = dict(resolved.task_overrides)
        task = self._create_once(node, resolved, resolver)
        node.executed = task.id  # recorded from here on: a resume finds (or deletes) it
        pipe._record_state()
        if node.function_spec is None:  # a clone: its overrides are an edit (a function step is created with them)
            changes = self._step_changes(node, resolved, resolver, task.model_dump(mode="json"))
            task = self._through_outage(f"set up the task of step '{node.name}'", lambda: self.backend.edit_task(
                task.id, changes, force=not node.clone_task))
        execution_queue = task.execution.queue
        if node.cache_executed_step:
            key = cache_key(task, resolved)
            if key is not None:
                hit = self._through_outage(f"look up step '{node.name}' in the cache", lambda: self.backend.query_tasks(
                    tags=[CACHE_TAG_PREFIX + key], status=["completed"], limit=1))
                if hit:
                    self._use_cached(node, task, hit[0])
                    return
                tags = [*task.tags, CACHE_TAG_PREFIX + key]
                task = self._through_outage(f"tag step '{node.name}'", lambda: self.backend.edit_task(
                    task.id, {"tags": tags}, force=not node.clone_task))
        node.job = StepJob(self.backend, task.id)
        if node.pre_execute_callback is not None:
            keep = node.pre_execute_callback(pipe, node, callback_parameters(resolved))
            if keep is False:
                self._abort_quietly(task.id, "skipped by its pre_execute_callback")
                self._set(node, SKIPPED, "skipped by its pre_execute_callback")
                return
        if pipe._run_steps_locally:
            self._run_locally(node, task)
        else:
            self._enqueue_once(node, task.id, execution_queue)
        self._set(node, QUEUED)

    def _step_changes(self, node: Node, resolved: ResolvedStep, resolver: Resolver,
                      fields: dict[str, Any]) -> dict[str, Any]:
        """What the step's task gets on top of `fields` (its spec or its clone's record,
        json mode): resolved parameters and arguments, configuration, the packages its
        inputs need, task_overrides, queue and time limit."""
        pipe = self.pipe
        changes: dict[str, Any] = {}
        hyperparams = hyperparams_from_overrides(resolved.parameters)
        if node.function_spec:
            hyperparams[KWARGS_SECTION] = {k: to_json_value(v) for k, v in resolved.kwargs.items()}
            hyperparams[KWARGS_ARTIFACTS_SECTION] = resolved.kwargs_artifacts
        output_uri = node.output_uri if node.output_uri is not None else pipe._output_uri
        if isinstance(output_uri, str) and output_uri:  # where the step's SDK stores outputs
            hyperparams.setdefault("Environment", {})["CONVEYOR_OUTPUT_URI"] = output_uri
        if hyperparams:
            changes["hyperparams"] = hyperparams
        if resolved.configurations:
            changes["configuration"] = resolved.configurations
        packages = packages_for_inputs(resolver, node, resolved.kwargs_artifacts, list(fields.get("packages") or []))
        if packages is not None:  # what unpickling its inputs needs (a DataFrame: pandas)
            changes["packages"] = packages
        if resolved.task_overrides:
            changes.update(task_override_changes(resolved.task_overrides))
        execution: dict[str, Any] = {"queue": node.queue or pipe._default_queue or "default"}
        if node.timeout:
            execution["time_limit_s"] = float(node.timeout)
        changes["execution"] = {**changes.get("execution", {}), **execution}
        return changes

    def _create_once(self, node: Node, resolved: ResolvedStep, resolver: Resolver) -> TaskRecord:
        """The step's task, created once even when the control plane fails mid-call: a
        retry after an outage first takes a task of the step that is still a draft
        (created by the attempt whose answer was lost) instead of making another.

        A function step's task is created whole, its resolved arguments and overrides
        included (one store call); a clone is edited after (`_launch`)."""
        pipe = self.pipe
        target = pipe._target_project
        tags = [*node.tags, *([f"pipe: {pipe._task_id}"] if pipe._add_pipeline_tags and pipe._task_id else [])]
        project = target if isinstance(target, str) and target else pipe._project
        attempts = 0

        def create() -> TaskRecord:
            nonlocal attempts
            attempts += 1
            if attempts > 1:
                found = self._unlaunched_task_of(node)
                if found is not None:
                    log.info("step %s: reusing task %s created before the outage", node.name, found.id)
                    return found
            if node.function_spec is not None:
                spec = function_step_spec(node, pipeline_task_id=pipe._task_id, tags=tags, project=project)
                return self.backend.create_task(
                    merge_task_changes(spec, self._step_changes(node, resolved, resolver, spec)))
            return clone_step_task(self.backend, node, pipeline_task_id=pipe._task_id, tags=tags,
                                   project=project, keep_base_project=target in (True, None))

        return self._through_outage(f"create the task of step '{node.name}'", create)

    def _unlaunched_task_of(self, node: Node) -> TaskRecord | None:
        """A draft child task of the pipeline named like the step's task, that no step uses."""
        if not self.pipe._task_id or not node.clone_task:
            return None
        name = node.function_spec["task_name"] if node.function_spec else node.name
        used = {n.executed for n in list(self.nodes.values())}
        for task in self.backend.query_tasks(parent=self.pipe._task_id, name=name, status=["created"], limit=100):
            if task.name == name and task.id not in used:
                return task
        return None

    def _enqueue_once(self, node: Node, task_id: str, queue_name: str) -> None:
        """Enqueue the step's task; after an outage, an enqueue whose answer was lost is
        found done (the task is no longer a draft) instead of failing the step."""
        attempts = 0

        def enqueue() -> None:
            nonlocal attempts
            attempts += 1
            try:
                self.backend.enqueue(task_id, queue_name)
            except ConflictError:
                if attempts == 1 or self.backend.get_task(task_id).status == TaskStatus.created:
                    raise

        self._through_outage(f"enqueue step '{node.name}'", enqueue)

    def _use_cached(self, node: Node, draft: TaskRecord, hit: TaskRecord) -> None:
        if draft.id != hit.id and node.clone_task:
            try:
                self.backend.delete_task(draft.id)
            except ConveyorError:
                pass
        node.executed = hit.id
        node.job = StepJob(self.backend, hit.id)
        self._finish(node, CACHED, f"reused completed task {hit.id} (cache hit)")

    def _run_locally(self, node: Node, task: TaskRecord) -> None:
        """Start the step as the worker `local:...` and run it through `agent execute`."""
        # One worker id per attempt: the follower of a failed attempt must not take the
        # next attempt (same task, in_progress again) for its own unreported run.
        worker = f"local:{self.pipe._local_worker_id}:{node.name}" + (f"#{node.retries}" if node.retries else "")
        # registered before it takes the task (registering a worker ends what it held)
        self.backend.register_worker(worker, hostname=socket.gethostname())
        self.backend.set_status(task.id, TaskStatus.in_progress, reason="started",
                                message="run locally by the pipeline", worker_id=worker)
        step = LocalStep(self.backend, task.id, worker, self.pipe._stop_event)
        self._local_steps.append(step)
        step.start()

    # ------------------------------------------------------------- statuses
    def _apply_task_status(self, node: Node, record: TaskRecord) -> None:
        node.task_status = record.status.value
        node.worker = record.runtime.worker or node.worker
        status = node_status_of(record)
        if status in (QUEUED, RUNNING):
            if status != node.status:
                self._set(node, status)
            return
        if status == COMPLETED:
            self._completed_records[record.id] = record
            self._finish(node, COMPLETED, record.status_message)
            return
        if status == FAILED and self._should_retry(node):
            node.retries += 1
            log.info("step %s failed (%s): retry %d", node.name, record.status_message, node.retries)
            try:
                self._through_outage(f"retry step '{node.name}'", lambda: self._retry(node, record))
                self._set(node, QUEUED, f"retry {node.retries} after: {record.status_message}")
                return
            except ConveyorError as exc:
                self._finish(node, FAILED, f"cannot retry: {exc}")
                return
        self._finish(node, status, record.status_message or record.status_reason)

    def _retry(self, node: Node, record: TaskRecord) -> None:
        """Run a failed step's task again: on this machine for local steps (reset to
        created, its previous attempt's outputs cleared, then started here as the first
        attempt was), else on its queue."""
        node.task_status = ""
        if not self.pipe._run_steps_locally:
            self.backend.enqueue(record.id)
            return
        self.backend.reset_task(record.id)  # not enqueued: no agent may take it
        self.backend.append_log(record.id, [
            f"pipeline: attempt {node.retries} failed ({record.status_message}); retrying locally"])
        self._run_locally(node, self.backend.get_task(record.id))

    def _should_retry(self, node: Node) -> bool:
        rule = node.retry_on_failure if node.retry_on_failure is not None else self.pipe._retry_on_failure
        if rule is None:
            return False
        if callable(rule):
            try:
                return bool(rule(self.pipe, node, node.retries))
            except Exception:  # noqa: BLE001
                log.exception("retry_on_failure callback of step %s failed", node.name)
                return False
        return node.retries < int(rule)

    def _finish(self, node: Node, status: str, message: str) -> None:
        self._set(node, status, message)
        self._account_finished(node)
        if status in (COMPLETED, CACHED):
            self._monitor(node)
            if node.post_execute_callback is not None:
                self._callback(node.post_execute_callback, self.pipe, node)
        if self.failed and self.pipe._abort_on_failure and status in (FAILED, ABORTED):
            self.abort_running(f"step '{node.name}' failed and abort_on_failure is set")
            self.pipe._stop_event.set()

    def _account_finished(self, node: Node) -> None:
        """What a failed or aborted step means for the pipeline (its continue behaviour)."""
        cb = node.continue_behaviour
        if node.status == FAILED and not cb.continue_on_fail:
            self._fail(f"step '{node.name}' failed: {node.status_message}")
        elif node.status == ABORTED and not cb.continue_on_abort:
            self._fail(f"step '{node.name}' was aborted: {node.status_message}")

    def _fail(self, message: str) -> None:
        if not self.failed:
            self.failed = True
            self.failure_message = message
            log.warning("pipeline failed: %s", message)

    def _set(self, node: Node, status: str, message: str = "") -> None:
        with self._lock:
            previous = node.set_status(status, message)
            # What the status change callback gets: the node as of this change (its
            # status does not move on while the event waits for the callback thread).
            event_node = copy.copy(node)
        if previous == status:
            return
        if node.is_finished:
            with self.pipe._node_finished:
                self.pipe._node_finished.notify_all()
        log.info("step %s: %s%s", node.name, status, f" ({message})" if message else "")
        if status in (QUEUED, RUNNING):  # shown within STATE_PROGRESS_DELAY_S, or with the next other change
            if self.pipe._state_behind_since is None:
                self.pipe._state_behind_since = time.monotonic()
        else:
            self.pipe._state_unsaved = True  # written by the loop before it waits, or by a launch
        callback = node.status_change_callback
        if callback is not None:
            self._callback(callback, self.pipe, event_node, previous)

    def _callback(self, function: Callable[..., Any], *args: Any) -> None:
        def call() -> None:
            try:
                function(*args)
            except Exception:  # noqa: BLE001 - a user callback must not break the pipeline
                log.exception("pipeline callback %s failed", getattr(function, "__name__", function))

        try:
            self._callback_pool.submit(call)
        except RuntimeError:  # pool already shut down: run inline
            call()

    # ------------------------------------------------------------ stopping
    def abort_running(self, message: str) -> None:
        """Abort every queued or running step task; mark their nodes aborted."""
        for node in list(self.nodes.values()):
            if node.executed and node.status in (QUEUED, RUNNING, LAUNCHING):
                self._abort_quietly(node.executed, message)
                self._set(node, ABORTED, message)
            elif node.status == PENDING:
                self._set(node, SKIPPED, "skipped: the pipeline stopped")

    def _abort_quietly(self, task_id: str, message: str) -> None:
        try:
            self.backend.abort_task(task_id, message=message)
        except (IllegalTransitionError, ConveyorError):
            pass

    def _monitor(self, node: Node) -> None:
        """Copy monitored metrics, artifacts and models of a finished step to the pipeline task."""
        pipe_task = self.pipe._task_id
        if not pipe_task or not node.executed or not (
            node.monitor_metrics or node.monitor_artifacts or node.monitor_models
        ):
            return
        try:
            step = self.backend.get_task(node.executed)
            changes: dict[str, Any] = {}
            if node.monitor_artifacts:
                artifacts = {}
                for item in node.monitor_artifacts:
                    source, target = (item, item) if isinstance(item, str) else tuple(item)
                    if source in step.artifacts:
                        artifacts[target] = step.artifacts[source].model_dump(mode="json")
                changes["artifacts"] = artifacts
            if node.monitor_models:
                models = [m.model_dump(mode="json") for m in step.models.get("output", [])
                          if any(_model_matches(m.name, str(p if isinstance(p, str) else p[0]))
                                 for p in node.monitor_models)]
                current = self.backend.get_task(pipe_task).models
                changes["models"] = {"input": [m.model_dump(mode="json") for m in current.get("input", [])],
                                     "output": [m.model_dump(mode="json") for m in current.get("output", [])] + models}
            if changes:
                self.backend.edit_task(pipe_task, changes, force=True)
            if node.monitor_metrics:
                scalars = []
                for item in node.monitor_metrics:
                    (title, series), target = (
                        (item[0], item[1]) if isinstance(item[0], list | tuple) else (item, item)
                    )
                    for s in self.backend.get_scalars(node.executed, title=title, series=series):
                        scalars.append({"title": target[0], "series": target[1],
                                        "iteration": s.iteration, "value": s.value})
                if scalars:
                    self.backend.report_scalars(pipe_task, scalars)
        except (ConveyorError, ValueError, TypeError, IndexError) as exc:
            log.warning("cannot copy monitored outputs of step %s: %s", node.name, exc)


def callback_parameters(resolved: ResolvedStep) -> dict[str, Any]:
    """The parameters a pre_execute / step_task_created callback gets: the step's resolved
    parameter overrides and, for a function step, its resolved arguments as
    "kwargs/<name>" (another step's returned object as "kwargs_artifacts/<name>")."""
    parameters = dict(resolved.parameters)
    parameters.update({f"{KWARGS_SECTION}/{k}": v for k, v in resolved.kwargs.items()})
    parameters.update({f"{KWARGS_ARTIFACTS_SECTION}/{k}": v for k, v in resolved.kwargs_artifacts.items()})
    return parameters


def _model_matches(name: str, pattern: str) -> bool:
    if pattern == "*":
        return True
    if pattern.endswith("*"):
        return name.startswith(pattern[:-1])
    return name == pattern

