"""Turning a ready node into an enqueued task: resolve references, clone, override, cache.

`Resolver.resolve_node` resolves every `${...}` of a node against the current state of
its parents (one place for all reference kinds); `function_step_spec` makes a function
step's task spec, `clone_step_task` clones a base task; `task_override_changes` turns
task_overrides into edit changes; `cache_key` hashes what defines the step's result so
`cache_executed_step` can reuse a completed task. The loop that calls them is `controller.pipeline.running`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from controller.backend import Backend
from controller.errors import NotFoundError
from controller.models import EDITABLE_FIELDS, TaskRecord, TaskStatus
from controller.pipeline import references
from controller.pipeline.function_step import input_packages, merge_packages, repository_fields
from controller.pipeline.node import Node

#: ClearML-style task_overrides keys mapped onto our task record.
TASK_OVERRIDE_ALIASES = {
    "script.version_num": "script.commit",
    "script.requirements.pip": "packages",
    "script.requirements": "packages",
    "script.diff": "script.diff",
    "container.docker_args": "container.arguments",
    "container.docker_bash_setup_script": "container.setup_shell_script",
}
#: Hyperparameter section of a function step's keyword arguments.
KWARGS_SECTION = "kwargs"
#: Section naming which kwargs are other steps' returned objects ("task_id.artifact").
KWARGS_ARTIFACTS_SECTION = "kwargs_artifacts"


@dataclass(frozen=True)
class ArtifactInput:
    """A function-step argument stored as an artifact: "<task id>.<artifact name>"."""

    marker: str


class StepLaunchError(RuntimeError):
    """A step cannot be launched (bad reference value, missing base task, store error)."""


@dataclass
class ResolvedStep:
    """A node's overrides with every reference replaced."""

    parameters: dict[str, Any] = field(default_factory=dict)
    configurations: dict[str, Any] = field(default_factory=dict)
    task_overrides: dict[str, Any] = field(default_factory=dict)
    kwargs: dict[str, Any] = field(default_factory=dict)
    kwargs_artifacts: dict[str, str] = field(default_factory=dict)
    # url or "task.artifact" → sha256, for cache keys by content
    artifact_hashes: dict[str, str] = field(default_factory=dict)


class Resolver:
    """Resolves references against pipeline parameters and the records of finished steps."""

    def __init__(
        self,
        backend: Backend,
        nodes: Mapping[str, Node],
        pipeline_parameters: Mapping[str, Any],
        known_records: Mapping[str, TaskRecord] | None = None,
    ) -> None:
        """`known_records`: records of finished step tasks by task id, as the wait that
        saw them end returned them (read instead of asking the store again; they lack
        only the status history, which a reference to it reads from the store)."""
        self.backend = backend
        self.nodes = nodes
        self.pipeline_parameters = pipeline_parameters
        self.known_records = known_records or {}
        self._records: dict[str, dict[str, Any]] = {}

    def task_json(self, task_id: str, *, with_history: bool = False) -> dict[str, Any]:
        """A task's record (json mode): a known record, else read from the store once
        per resolver; `with_history` always reads the store (known records have none)."""
        if with_history:
            return self.backend.get_task(task_id).model_dump(mode="json")
        if task_id not in self._records:
            known = self.known_records.get(task_id)
            record = known if known is not None else self.backend.get_task(task_id)
            self._records[task_id] = record.model_dump(mode="json")
        return self._records[task_id]

    def _record(self, step: str, *, with_history: bool = False) -> dict[str, Any] | None:
        node = self.nodes[step]
        if not node.executed or not node.is_successful:
            return None  # a failed parent whose children still run: its values are None
        return self.task_json(node.executed, with_history=with_history)

    def artifact_of(self, marker: str) -> dict[str, Any] | None:
        """The artifact (json mode) an input marker "<task id>.<artifact name>" names."""
        task_id, _, name = str(marker).partition(".")
        return self.task_json(task_id).get("artifacts", {}).get(name)

    def value(self, ref: references.Reference, out: ResolvedStep | None = None) -> Any:
        """The value a reference stands for (None for a parent that did not succeed)."""
        if ref.is_pipeline_parameter:
            name = ".".join(ref.path)
            if name not in self.pipeline_parameters:
                raise references.ReferenceError_(f"{ref.text}: no pipeline parameter {name!r}")
            return self.pipeline_parameters[name]
        if ref.step not in self.nodes:
            raise references.ReferenceError_(f"{ref.text}: unknown step '{ref.step}'")
        record = self._record(ref.step, with_history=ref.path[:1] == ("status_history",))
        if record is None:
            return None
        node = self.nodes[ref.step]
        if node.function_spec is not None and len(ref.path) == 1 and ref.path[0] in node.return_artifacts:
            artifact = record.get("artifacts", {}).get(ref.path[0])
            if artifact is None:
                raise references.ReferenceError_(
                    f"{ref.text}: step '{ref.step}' stored no return value {ref.path[0]!r}")
            marker = f"{record['id']}.{ref.path[0]}"
            if out is not None:
                out.artifact_hashes[marker] = artifact.get("sha256", "")
            return marker
        value = references.lookup_task_field(record, ref.path, ref)
        if out is not None and ref.path[0] == "artifacts" and len(ref.path) >= 2:
            artifact = record.get("artifacts", {}).get(ref.path[1], {})
            if isinstance(value, str) and artifact.get("sha256"):
                out.artifact_hashes[value] = artifact["sha256"]
        return value

    def resolve_node(self, node: Node) -> ResolvedStep:
        """Every override of `node` with its references replaced."""
        out = ResolvedStep()
        recursive = node.recursively_parse_parameters

        def sub(value: Any, nested: bool) -> Any:
            return references.substitute(value, lambda ref: self.value(ref, out), nested)

        out.parameters = {k: sub(v, recursive) for k, v in node.parameters.items()}
        out.configurations = {k: sub(v, False) for k, v in node.configurations.items()}
        out.task_overrides = {k: sub(v, False) for k, v in node.task_overrides.items()}
        if node.function_spec:
            for name, value in (node.function_spec.get("kwargs") or {}).items():
                if isinstance(value, ArtifactInput):
                    out.kwargs_artifacts[name] = value.marker
                    continue
                refs = references.references_in(value) if isinstance(value, str) else []
                is_return = (
                    len(refs) == 1
                    and refs[0].text == value.strip()
                    and not refs[0].is_pipeline_parameter
                    and self.nodes[refs[0].step].function_spec is not None
                    and len(refs[0].path) == 1
                    and refs[0].path[0] in self.nodes[refs[0].step].return_artifacts
                )
                resolved = sub(value, True)
                if is_return and resolved is not None:
                    out.kwargs_artifacts[name] = resolved
                else:
                    out.kwargs[name] = resolved
        return out


def function_step_spec(
    node: Node, *, pipeline_task_id: str | None, tags: list[str], project: str
) -> dict[str, Any]:
    """The task spec of a function step (json mode): made from its function, a child of
    the pipeline task, in `project` unless the step names its own, with `tags`."""
    assert node.function_spec is not None
    spec = dict(node.function_spec["task_spec"])
    script = dict(spec["script"])
    script.update(repository_fields(*node.function_spec.get("repo", (None, None, None))))
    if node.function_spec.get("working_dir"):
        script["working_dir"] = node.function_spec["working_dir"]
    spec["script"] = script
    spec.update(name=node.function_spec["task_name"], parent=pipeline_task_id,
                project=node.function_spec.get("project") or project,
                type=node.function_spec["task_type"], tags=tags,
                container=node.function_spec["container"])
    return spec


def clone_step_task(
    backend: Backend, node: Node, *, pipeline_task_id: str | None, tags: list[str], project: str,
    keep_base_project: bool,
) -> TaskRecord:
    """The task a step made from a base task will run: a clone of it.

    The task is a child of the pipeline task, in `project` (a clone stays in its base
    task's project with `keep_base_project`), with `tags` added. With
    `clone_base_task=False` the base task itself (a draft) is used.
    """
    if node.base_task_factory is not None:
        made = node.base_task_factory(node)
        task_id = getattr(made, "id", None) or (made if isinstance(made, str) else None)
        if not task_id:
            raise ValueError("base_task_factory must return a Task or a task id")
        node.base_task_id = str(task_id)
    if not node.base_task_id:
        raise NotFoundError(f"step '{node.name}' has no base task")
    base = backend.get_task(node.base_task_id)
    if not node.clone_task:
        if base.status != TaskStatus.created:
            raise ValueError(f"clone_base_task=False needs a draft base task; {base.id} is {base.status.value}")
        return backend.edit_task(base.id, {"parent": pipeline_task_id, "tags": [*base.tags, *tags]})
    clone = backend.clone_task(node.base_task_id, name=node.name, parent=pipeline_task_id,
                               project=base.project if keep_base_project else project)
    if tags:
        clone = backend.edit_task(clone.id, {"tags": [*clone.tags, *tags]})
    return clone


def packages_for_inputs(resolver: Resolver, node: Node, kwargs_artifacts: Mapping[str, str],
                        packages: list[str]) -> list[str] | None:
    """A function step's packages with those its artifact inputs need added (None: no
    change; only when its packages were inferred from its imports, not given)."""
    if not node.function_spec or not node.function_spec.get("packages_inferred") or not kwargs_artifacts:
        return None
    artifacts = [a for a in map(resolver.artifact_of, kwargs_artifacts.values()) if a is not None]
    merged = merge_packages(packages, input_packages(artifacts))
    return merged if merged != packages else None


def hyperparams_from_overrides(parameters: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """{"Section/name": value} → {"Section": {"name": value}} ("General" without a section)."""
    sections: dict[str, dict[str, Any]] = {}
    for key, value in parameters.items():
        section, sep, name = str(key).partition("/")
        if not sep:
            section, name = "General", str(key)
        sections.setdefault(section, {})[name] = value
    return sections


def task_override_changes(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """edit_task changes for task_overrides given as dotted paths ("script.branch": "main")."""
    changes: dict[str, Any] = {}
    for raw_key, value in overrides.items():
        key = TASK_OVERRIDE_ALIASES.get(raw_key, raw_key)
        parts = key.split(".")
        top = parts[0]
        if top == "packages":
            if isinstance(value, str):
                value = [line.strip() for line in value.splitlines() if line.strip()]
            changes["packages"] = list(value or [])
            continue
        if top not in EDITABLE_FIELDS:
            raise StepLaunchError(f"task_overrides: unknown task field {raw_key!r}")
        if len(parts) == 1:
            changes[top] = value
            continue
        section = changes.setdefault(top, {})
        cursor = section
        for part in parts[1:-1]:
            cursor = cursor.setdefault(part, {})
        cursor[parts[-1]] = "" if value is None and top in ("script", "container") else value
    return changes


def cache_key(task: TaskRecord, resolved: ResolvedStep) -> str | None:
    """A hash of what defines the step's result, or None when it cannot be cached.

    Covers the code (commit, or the code itself), entry point, diff, parameters (artifact
    inputs by content hash instead of URL), configuration, container and packages. A
    repository without a pinned commit is never cached (its code can change).
    """
    script = task.script
    if script.repository and not script.commit:
        return None

    def by_content(value: Any) -> Any:
        if isinstance(value, str) and value in resolved.artifact_hashes:
            return f"sha256:{resolved.artifact_hashes[value]}"
        if isinstance(value, dict):
            return {k: by_content(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [by_content(v) for v in value]
        return value

    material = {
        "script": {
            "repository": script.repository,
            "commit": script.commit,
            "entry_point": script.entry_point,
            "working_dir": script.working_dir,
            "diff": script.diff,
            "code": script.code,
            "binary": script.binary,
        },
        "hyperparams": by_content(task.hyperparams),
        "configuration": task.configuration,
        "container": task.container.model_dump(),
        "packages": sorted(task.packages),
    }
    blob = json.dumps(material, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:40]
