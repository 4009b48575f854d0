"""A pipeline's recorded state: its own (controller) task and what is recorded on it.

Creating or attaching to the controller task, its parameters and definition, the run
state of every node written to `runtime.pipeline` on each transition, and the
class-level API that finds a recorded pipeline (`get`, `enqueue`) or reports to its task
(`get_logger`, `upload_artifact`, `upload_model`).

Part of PipelineController (see `controller.pipeline.controller`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from controller.connect import get_backend
from controller.errors import ConveyorError, NotFoundError
from controller.models import TaskRecord, TaskType
from controller.pipeline.definition import packages_list
from controller.pipeline.node import to_json_value

if TYPE_CHECKING:  # pragma: no cover
    from controller.pipeline.controller import PipelineController

log = logging.getLogger("conveyor.pipeline")

PIPELINE_SECTION = "Pipeline"


class PipelineStateMixin:
    """The controller task of a pipeline and the run state recorded on it."""

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


def _version_key(version: str) -> tuple:
    return tuple(int(p) if p.isdigit() else -1 for p in str(version).split("."))
