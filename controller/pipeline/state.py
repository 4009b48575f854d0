"""A pipeline's recorded state: its own (controller) task and what is recorded on it.

Creating or attaching to the controller task, its parameters and definition, the run
state of every node written to `runtime.pipeline` on each transition, and the
class-level API that finds a recorded pipeline (`get`, `enqueue`, `resume`) or reports to
its task (`get_logger`, `upload_artifact`, `upload_model`).

Resuming: `runtime.resume` on the controller task holds the automatic resume budget
(`auto_max`, `auto_count`, set by `start(queue)`) and a pending request (`pending`: why).
The store's lease expiry puts a lost controller task back on its queue while the budget
lasts and sets `pending`; `request_resume` (`controller pipelines resume`) sets it by
hand. A controller that attaches to a task with a pending request first reads the
recorded run (`restore_recorded_run`): completed steps are reused (the same task),
queued or running steps followed, failed ones follow the retry rules, and only what
never started is launched.

Part of PipelineController (see `controller.pipeline.controller`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from controller.backend import Backend
from controller.connect import get_backend
from controller.errors import BackendUnavailableError, ConflictError, ConveyorError, NotFoundError
from controller.models import TaskRecord, TaskStatus, TaskType
from controller.pipeline.definition import packages_list
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
    to_json_value,
)

if TYPE_CHECKING:  # pragma: no cover
    from controller.pipeline.controller import PipelineController

log = logging.getLogger("conveyor.pipeline")

PIPELINE_SECTION = "Pipeline"
#: Key of the controller task's `runtime` holding the resume budget and request.
RESUME_KEY = "resume"
#: Automatic resumes of a pipeline started on a queue whose controller is lost.
DEFAULT_AUTO_RESUMES = 3
#: `pending` value the store's lease expiry writes (anything else is a manual resume).
AUTO_RESUME = "auto"
#: Queue a pipeline resumes on when it names none (one run by start_locally()).
DEFAULT_RESUME_QUEUE = "services"


def resume_settings(record: TaskRecord) -> dict[str, Any]:
    """The controller task's `runtime.resume` (budget and pending request), defaults filled."""
    current = record.runtime.model_dump().get(RESUME_KEY)
    current = current if isinstance(current, dict) else {}
    return {"auto_max": int(current.get("auto_max") or 0), "auto_count": int(current.get("auto_count") or 0),
            "pending": str(current.get("pending") or "")}


def recorded_run(record: TaskRecord) -> dict[str, Any]:
    """The run state recorded on a controller task (`runtime.pipeline`), {} if none."""
    state = record.runtime.model_dump().get("pipeline")
    return state if isinstance(state, dict) else {}


def request_resume(backend: Backend, pipeline_id: str, queue: str | None = None) -> TaskRecord:
    """Put a failed, stopped or lost pipeline back on a queue to resume from its record.

    The queue is `queue`, else the pipeline's own, else "services". ConflictError for a
    pipeline that is queued, running or completed, or that never ran (re-running from
    scratch is `controller tasks reset` + `controller tasks enqueue`).
    """
    record = backend.get_task(pipeline_id)
    if record.type != TaskType.controller:
        raise ConflictError(f"task {pipeline_id} is a {record.type.value} task, not a pipeline", field="task_id")
    if not record.status.is_terminal:
        raise ConflictError(f"pipeline {pipeline_id} is {record.status.value}: only a failed, stopped "
                            "or lost pipeline can be resumed", field="status")
    if record.status == TaskStatus.completed:
        raise ConflictError(f"pipeline {pipeline_id} completed: nothing to resume (to run it again from "
                            f"scratch: controller tasks reset {pipeline_id}, then controller tasks enqueue "
                            f"{pipeline_id})", field="status")
    if not recorded_run(record).get("nodes"):
        raise ConflictError(f"pipeline {pipeline_id} has no recorded run to resume from", field="task_id")
    settings = resume_settings(record)
    settings["pending"] = "manual"
    backend.edit_task(pipeline_id, {"runtime": {RESUME_KEY: settings}}, force=True)
    return backend.enqueue(pipeline_id, queue or record.execution.queue or DEFAULT_RESUME_QUEUE)


def call_key_of(node: Node) -> str:
    """What identifies a component call of a decorator pipeline across runs: the
    component's code and its inputs (the position in the call order is the node name)."""
    spec = node.function_spec or {}
    material = {"code": (spec.get("task_spec") or {}).get("script", {}).get("code", ""),
                "kwargs": spec.get("kwargs") or {}}
    blob = json.dumps(material, sort_keys=True, default=lambda v: getattr(v, "marker", repr(v)))
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


class _RunningHere(threading.local):
    """The pipeline whose logic runs in this thread (PipelineDecorator's logic thread)."""

    task_id: str | None = None


#: Pipeline task ids running in this process: the one of this thread, else the last one
#: started here (callbacks and launches run on other threads of the same pipeline).
_running_in_thread = _RunningHere()
_last_started_here: list[str] = []


def set_pipeline_of_this_thread(task_id: str | None) -> None:
    """Name the pipeline task whose logic runs in this thread (None: none)."""
    _running_in_thread.task_id = task_id


class PipelineStateMixin:
    """The controller task of a pipeline and the run state recorded on it."""

    #: (recorded run state, why) when this run resumes a recorded one (see `_attach`).
    _resume_from: tuple[dict[str, Any], str] | None = None
    #: Recorded nodes not in the DAG yet (decorator components are added as they are called).
    _recorded_nodes: dict[str, dict[str, Any]] | None = None
    #: The recorded state is behind: a change not written yet (the loop writes it before
    #: it waits, see `PipelineRunner`), or a write that failed while the control plane
    #: was unreachable.
    _state_unsaved = False
    #: Since when a step's move to queued or running is not in the recorded state yet
    #: (the loop writes it STATE_PROGRESS_DELAY_S later, or with the next other change).
    _state_behind_since: float | None = None
    #: This resume, as recorded in runtime.pipeline["resumes"] (see `_restore_recorded_run`).
    _this_resume: tuple[dict[str, Any], ...] = ()

    def _attach(self, task_id: str) -> None:
        """Use the task this process runs as (under an agent) as the controller task.

        A pending resume request on the task (see the module docstring) makes this run
        resume the recorded one: the request is taken (cleared) here.
        """
        self._task_id = task_id
        record = self._task_record()
        settings = resume_settings(record)
        if settings["pending"]:
            self._resume_from = (recorded_run(record), settings["pending"])
            self._edit_own_task({"runtime": {RESUME_KEY: {**settings, "pending": ""}}})
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
            "packages": packages if self._packages is None else packages_list(self._packages),
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
        """Write the DAG state onto the controller task (runtime.pipeline).

        While the control plane is unreachable the write is marked unsaved and the
        loop writes the state again (see `PipelineRunner`); other errors are logged.
        A change made while this writes marks the state unsaved again (the flag is
        cleared before the nodes are read).
        """
        if not self._task_id:
            return
        with self._state_lock:
            self._state_unsaved = False
            self._state_behind_since = None
            nodes: dict[str, Any] = dict(self._recorded_nodes or {})  # decorator calls not made yet
            for name, node in list(self._nodes.items()):
                nodes[name] = {**node.state(), **({"call_key": call_key_of(node)} if node.function_spec else {})}
            state = {
                "name": self._name,
                "version": self._version,
                "status": self._status,
                "message": self._status_message,
                "started": self._started_at,
                "updated": time.time(),
                "nodes": nodes,
                "parameters": {k: to_json_value(v) for k, v in self._parameters.items()},
                "resumes": list(self._resumes),
            }
            try:
                self._backend.edit_task(self._task_id, {"runtime": {"pipeline": state}}, force=True)
            except BackendUnavailableError as exc:
                if not self._state_unsaved:
                    log.warning("cannot record the pipeline state yet (%s); it is written again "
                                "when the control plane answers", exc)
                self._state_unsaved = True
            except ConveyorError as exc:
                log.warning("cannot update the pipeline task: %s", exc)

    # ----------------------------------------------------------------- resume
    @property
    def _resumes(self) -> list[dict[str, Any]]:
        """Every resume of this run (when, why, what was reused), as recorded."""
        if self._resume_from is None:
            return []
        recorded, _why = self._resume_from
        return list(recorded.get("resumes") or []) + list(self._this_resume)

    def _restore_recorded_run(self) -> None:
        """Resume from the record (see the module docstring): set every recorded node's
        task, status, attempts and resolved parameters; delete clones whose launch was
        interrupted. Nodes are set directly: no callback fires for what was recorded."""
        if self._resume_from is None:
            return
        recorded, why = self._resume_from
        counts: Counter[str] = Counter()
        pending_nodes: dict[str, dict[str, Any]] = {}
        for name, state in (recorded.get("nodes") or {}).items():
            node = self._nodes.get(name)
            if node is None:
                if self._dynamic:
                    pending_nodes[name] = state
                else:
                    log.warning("resume: recorded step %r is not in the pipeline any more: ignored", name)
                continue
            counts[self._restore_node(node, state)] += 1
        self._recorded_nodes = pending_nodes
        self._delete_unlaunched_clones()
        if recorded.get("started"):
            self._started_at = float(recorded["started"])
        summary = ", ".join(f"{n} {what}" for what, n in sorted(counts.items())) or "no step ran yet"
        reason = "its controller was lost" if why == AUTO_RESUME else f"resume requested ({why})"
        self._this_resume = ({"time": time.time(), "reason": reason, **counts},)
        message = f"resuming pipeline {self._task_id} from its record ({reason}): {summary}"
        log.warning(message)
        print(message, flush=True)  # the controller task's log (under an agent)

    def _restore_recorded_node(self, node: Node) -> str | None:
        """For a node added while the pipeline runs (a decorator component call): restore
        it from the record if the same call (name = position, same code and inputs)
        was recorded; returns what was done, None if there was nothing to restore."""
        state = (self._recorded_nodes or {}).pop(node.name, None)
        if state is None:
            return None
        if state.get("call_key") != call_key_of(node):
            log.info("resume: component call %s differs from the recorded one: launched again", node.name)
            return None
        what = self._restore_node(node, state)
        log.info("resume: component call %s: %s", node.name, what)
        return what

    def _restore_node(self, node: Node, state: Mapping[str, Any]) -> str:
        """Set one node from its recorded state; returns "reused", "followed", "re-run"
        or "to launch". A manual resume runs failed and aborted steps again (their
        retry count starts over); an automatic one keeps what the lost controller decided."""
        recorded = str(state.get("status") or PENDING)
        task_id = state.get("task_id")
        node.retries = int(state.get("retries") or 0)
        node.resolved_parameters = dict(state.get("resolved_parameters") or {})
        node.resolved_overrides = dict(state.get("overrides") or {})
        node.worker = str(state.get("worker") or "")
        if not task_id or recorded == PENDING:
            return "to launch"
        try:
            task = self._backend.get_task(str(task_id))
        except NotFoundError:
            return "to launch"
        if task.status == TaskStatus.created and recorded in (LAUNCHING, QUEUED, RUNNING, PENDING):
            self._delete_unlaunched(node, task)
            return "to launch"
        node.executed = task.id
        node.job = StepJob(self._backend, task.id)
        node.job_started = state.get("started")
        node.task_status = task.status.value
        message = str(state.get("status_message") or "")
        if recorded in (CACHED, SKIPPED) or (recorded == COMPLETED and task.status == TaskStatus.completed):
            node.job_ended = state.get("ended")
            node.set_status(recorded, message)
            return "reused"
        if recorded in (FAILED, ABORTED) and task.status.is_terminal:
            if self._resume_from and self._resume_from[1] == AUTO_RESUME:
                node.job_ended = state.get("ended")
                node.set_status(recorded, message)
                return "reused"
            try:
                self._backend.enqueue(task.id)
            except ConveyorError as exc:
                log.warning("resume: cannot run step %s again: %s", node.name, exc)
                node.job_ended = state.get("ended")
                node.set_status(recorded, f"{message} (cannot run it again: {exc})")
                return "reused"
            node.retries = 0
            node.task_status = TaskStatus.queued.value
            node.set_status(QUEUED, f"run again on resume after: {message}")
            return "re-run"
        # Launching, queued or running when recorded: follow the task from the status
        # recorded; the loop sees what changed since (and applies the rules to it).
        node.task_status = TaskStatus.queued.value if recorded in (LAUNCHING, QUEUED) else TaskStatus.in_progress.value
        node.set_status(QUEUED if recorded in (LAUNCHING, QUEUED) else RUNNING, message)
        return "followed"

    def _delete_unlaunched(self, node: Node, task: TaskRecord) -> None:
        """Delete a step task created by a launch that never enqueued it (not a base task)."""
        if task.id == node.base_task_id or not node.clone_task:
            return
        try:
            self._backend.delete_task(task.id)
            log.info("resume: deleted task %s of step %s (its launch was interrupted)", task.id, node.name)
        except ConveyorError as exc:
            log.warning("resume: cannot delete unlaunched task %s of step %s: %s", task.id, node.name, exc)

    def _delete_unlaunched_clones(self) -> None:
        """Delete the pipeline's child tasks still in status created that no step uses
        (clones whose launch was interrupted before the record named them)."""
        used = {n.executed for n in self._nodes.values()} | {n.base_task_id for n in self._nodes.values()}
        used |= {s.get("task_id") for s in (self._recorded_nodes or {}).values()}
        try:
            drafts = self._backend.query_tasks(parent=self._task_id, status=["created"], limit=10_000)
        except ConveyorError as exc:
            log.warning("resume: cannot look for unlaunched step tasks: %s", exc)
            return
        for draft in drafts:
            if draft.id in used:
                continue
            try:
                self._backend.delete_task(draft.id)
                log.info("resume: deleted unlaunched step task %s (%s)", draft.id, draft.name)
            except ConveyorError as exc:
                log.warning("resume: cannot delete unlaunched step task %s: %s", draft.id, exc)

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

    def _mark_running_here(self) -> None:
        """Make this pipeline's task the one the class-level API reports to from this process."""
        if self._task_id:
            _last_started_here.append(self._task_id)

    @classmethod
    def resume(cls, pipeline_id: str, queue_name: str | None = None) -> TaskRecord:
        """Resume a failed, stopped or lost pipeline from its record on an agent of
        `queue_name` (default: its own queue, else "services"); see `request_resume`."""
        return request_resume(get_backend(), pipeline_id, queue_name)

    @classmethod
    def _pipeline_task(cls) -> Any:
        """The pipeline task: of the pipeline whose logic runs in this thread; under an
        agent, the task run (or the parent of a step); else the last pipeline started in
        this process (its callbacks, start_locally, run_locally, debug_pipeline)."""
        from controller.sdk.task import Task

        if _running_in_thread.task_id:
            return Task.get_task(task_id=_running_in_thread.task_id)
        current = Task.current_task() if os.environ.get("CONVEYOR_TASK_ID") else None
        if current is None and _last_started_here:
            return Task.get_task(task_id=_last_started_here[-1])
        current = current or Task.current_task()
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


def _version_key(version: str) -> tuple:
    return tuple(int(p) if p.isdigit() else -1 for p in str(version).split("."))
