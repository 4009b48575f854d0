"""The DAG of a pipeline: validation before anything runs, and graph queries.

`validate_dag` checks the whole definition at once and raises one PipelineDefinitionError
naming the step and the field at fault: unknown parents, cycles, references to unknown
steps or pipeline parameters, references to a function step's unknown return value,
missing base tasks and bad option values. Nothing is created or enqueued before it
passes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from controller.backend import Backend
from controller.errors import NotFoundError
from controller.pipeline import references
from controller.pipeline.node import Node


class PipelineDefinitionError(ValueError):
    """A pipeline definition that cannot run; the message names the step and the field."""


def step_error(step: str, field: str, message: str) -> PipelineDefinitionError:
    """The error for one field of one step."""
    return PipelineDefinitionError(f"pipeline step '{step}': {field}: {message}")


def referenced_steps(node: Node) -> set[str]:
    """Steps whose results `node` refers to (implied parents)."""
    values = [
        *node.parameters.values(),
        *node.configurations.values(),
        *node.task_overrides.values(),
    ]
    if node.function_spec:
        values.extend((node.function_spec.get("kwargs") or {}).values())
    try:
        refs = {
            ref.step
            for value in values
            for ref in references.references_in(value, recursive=True)
            if not ref.is_pipeline_parameter
        }
    except references.ReferenceError_ as exc:  # a malformed reference: refused before anything runs
        raise step_error(node.name, "references", str(exc)) from None
    refs.discard(node.name)
    return refs


def add_implied_parents(nodes: Mapping[str, Node]) -> None:
    """Make every referenced step a parent (references imply edges)."""
    for node in nodes.values():
        for step in sorted(referenced_steps(node)):
            if step not in node.parents and step in nodes:
                node.parents.append(step)


def validate_dag(
    nodes: Mapping[str, Node], parameters: Mapping[str, object], backend: Backend | None
) -> None:
    """Raise PipelineDefinitionError unless the pipeline can run (see module doc)."""
    if not nodes:
        raise PipelineDefinitionError("the pipeline has no steps: add one with add_step or add_function_step")
    for node in nodes.values():
        for parent in node.parents:
            if parent not in nodes:
                raise step_error(node.name, "parents", f"unknown step '{parent}'")
        _check_references(node, nodes, parameters)
        if backend is not None and node.function_spec is None and node.base_task_factory is None:
            _check_base_task(node, backend)
    cycle = find_cycle(nodes)
    if cycle:
        raise PipelineDefinitionError(
            f"pipeline step '{cycle[0]}': parents: the steps form a cycle: {' -> '.join(cycle)}"
        )


def _check_references(node: Node, nodes: Mapping[str, Node], parameters: Mapping[str, object]) -> None:
    fields = {
        "parameter_override": node.parameters,
        "configuration_overrides": node.configurations,
        "task_overrides": node.task_overrides,
    }
    if node.function_spec:
        fields["function_kwargs"] = node.function_spec.get("kwargs") or {}
    for field_name, values in fields.items():
        for key, value in values.items():
            try:
                refs = references.references_in(value, recursive=True)
            except references.ReferenceError_ as exc:
                raise step_error(node.name, f"{field_name}[{key!r}]", str(exc)) from None
            for ref in refs:
                where = f"{field_name}[{key!r}]"
                if ref.is_pipeline_parameter:
                    name = ".".join(ref.path)
                    if name not in parameters:
                        raise step_error(node.name, where, f"{ref.text} names no pipeline parameter "
                                         f"(add it with add_parameter('{name}'))")
                    continue
                if ref.step not in nodes:
                    raise step_error(node.name, where, f"{ref.text} refers to unknown step '{ref.step}'")
                if ref.step == node.name:
                    raise step_error(node.name, where, f"{ref.text} refers to the step itself")
                target = nodes[ref.step]
                if not ref.path:
                    raise step_error(node.name, where, f"{ref.text} must name a field, e.g. ${{{ref.step}.id}}")
                if (
                    target.function_spec is not None
                    and len(ref.path) == 1
                    and ref.path[0] not in ("id",)
                    and ref.path[0] not in target.return_artifacts
                ):
                    raise step_error(node.name, where, f"{ref.text}: step '{ref.step}' returns no "
                                     f"{ref.path[0]!r} (function_return: {target.return_artifacts})")


def _check_base_task(node: Node, backend: Backend) -> None:
    if node.base_task_id:
        try:
            backend.get_task(node.base_task_id)
        except NotFoundError:
            raise step_error(node.name, "base_task_id", f"no task with id {node.base_task_id!r}") from None
        return
    if not node.base_task_name:
        raise step_error(node.name, "base_task_id", "give base_task_id, base_task_project + "
                         "base_task_name, or base_task_factory")
    found = backend.query_tasks(project=node.base_task_project, name=node.base_task_name, limit=1)
    if not found:
        raise step_error(node.name, "base_task_name", f"no task named {node.base_task_name!r} in "
                         f"project {node.base_task_project!r}")
    node.base_task_id = found[0].id


def find_cycle(nodes: Mapping[str, Node]) -> list[str]:
    """A cycle of parent edges as a list of step names (first repeated last), or []."""
    state: dict[str, int] = {}  # 1 visiting, 2 done
    stack: list[str] = []

    def visit(name: str) -> list[str]:
        state[name] = 1
        stack.append(name)
        for parent in nodes[name].parents:
            if parent not in nodes:
                continue
            if state.get(parent) == 1:
                return stack[stack.index(parent):] + [parent]
            if parent not in state:
                found = visit(parent)
                if found:
                    return found
        stack.pop()
        state[name] = 2
        return []

    for name in nodes:
        if name not in state:
            found = visit(name)
            if found:
                return found
    return []


def children_of(nodes: Mapping[str, Node], name: str) -> list[str]:
    """Steps that list `name` as a parent."""
    return [n.name for n in nodes.values() if name in n.parents]


def descendants_of(nodes: Mapping[str, Node], names: Iterable[str]) -> set[str]:
    """Every step reachable from `names` through child edges (not including them)."""
    found: set[str] = set()
    todo = list(names)
    while todo:
        for child in children_of(nodes, todo.pop()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found
