"""Pipeline definitions that cannot run are refused before anything runs, with one clear error."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from controller.automation import PipelineController
from controller.backend import Backend
from controller.connect import backend_from_url
from controller.pipeline import PipelineDefinitionError


@pytest.fixture
def backend(sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Backend]:
    monkeypatch.setenv("CONVEYOR_API", sqlite_url)
    client = backend_from_url(sqlite_url)
    yield client
    client.close()


def _base(backend: Backend, name: str = "base") -> str:
    return backend.create_task({"name": name, "project": "p", "script": {"code": "print(1)\n"}}).id


def _three_steps(backend: Backend) -> PipelineController:
    base = _base(backend)
    pipe = PipelineController(name="v", project="p")
    pipe.add_step("a", base_task_id=base)
    pipe.add_step("b", base_task_id=base, parents=["a"])
    return pipe


CASES: list[tuple[str, Callable[[PipelineController, str], None], str]] = [
    ("unknown parent", lambda p, base: p.add_step("c", base_task_id=base, parents=["nope"]), "step 'c': parents: unknown step 'nope'"),
    ("cycle", lambda p, base: (p.add_step("c", base_task_id=base, parents=["d"]),
                               p.add_step("d", base_task_id=base, parents=["c"])), "cycle"),
    ("unknown step reference", lambda p, base: p.add_step(
        "c", base_task_id=base, parameter_override={"General/x": "${ghost.id}"}), "unknown step 'ghost'"),
    ("unknown pipeline parameter", lambda p, base: p.add_step(
        "c", base_task_id=base, parameter_override={"General/x": "${pipeline.lr}"}), "add_parameter('lr')"),
    ("reference without a field", lambda p, base: p.add_step(
        "c", base_task_id=base, parameter_override={"General/x": "${a}"}), "must name a field"),
    ("missing base task id", lambda p, base: p.add_step("c", base_task_id="0" * 32), "step 'c': base_task_id"),
    ("missing base task name", lambda p, base: p.add_step(
        "c", base_task_project="p", base_task_name="no such task"), "step 'c': base_task_name"),
]


@pytest.mark.parametrize("case, define, message", CASES, ids=[c[0] for c in CASES])
def test_invalid_pipelines_are_refused_before_anything_runs(
    backend: Backend, case: str, define: Callable[[PipelineController, str], None], message: str
) -> None:
    pipe = _three_steps(backend)
    base = backend.query_tasks(name="base")[0].id
    before = len(backend.query_tasks(limit=1000))
    define(pipe, base)
    with pytest.raises(PipelineDefinitionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        pipe.start_locally()
    assert len(backend.query_tasks(limit=1000)) == before, "nothing may be created"
    assert backend.queue_length("default") == 0


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda p, base: p.add_step("a", base_task_id=base), "step 'a': name: a step with this name already exists"),
        (lambda p, base: p.add_step("bad name!", base_task_id=base), "step name 'bad name!'"),
        (lambda p, base: p.add_step("c"), "step 'c': base_task_id"),
        (lambda p, base: p.add_step("c", base_task_id=base, time_limit=-1), "step 'c': time_limit"),
        (lambda p, base: p.add_step("c", base_task_id=base, parents="a"), "step 'c': parents"),
        (lambda p, base: p.add_step("c", base_task_id=base, retry_on_failure="twice"), "step 'c': retry_on_failure"),
        (lambda p, base: p.add_step("c", base_task_id=base, continue_behaviour={"continue_on_explode": True}),
         "step 'c': continue_behaviour"),
        (lambda p, base: p.add_step("c", base_task_id=base, parameter_override=["x"]), "step 'c': parameter_override"),
        (lambda p, base: p.add_step("c", base_task_id=base, pre_execute_callback="not callable"),
         "step 'c': pre_execute_callback"),
        (lambda p, base: p.add_function_step("f", function=len, function_return=["n"]), "step 'f': function"),
        (lambda p, base: p.set_pipeline_execution_time_limit(-3), "max_execution_minutes"),
    ],
    ids=["duplicate", "bad-name", "no-base", "time-limit", "parents-string", "retry", "continue",
         "override-type", "callback", "builtin-function", "pipeline-limit"],
)
def test_bad_options_are_refused_when_the_step_is_added(
    backend: Backend, call: Callable[[PipelineController, str], None], message: str
) -> None:
    pipe = _three_steps(backend)
    base = backend.query_tasks(name="base")[0].id
    with pytest.raises(PipelineDefinitionError, match=message.replace("(", r"\(").replace("!", "!")):
        call(pipe, base)


def test_a_function_step_reference_to_an_unknown_return_value_is_refused(backend: Backend) -> None:
    def make() -> int:
        return 1

    def use(value: int = 0) -> int:
        return value

    pipe = PipelineController(name="f", project="p")
    pipe.add_function_step("make", make, function_return=["number"])
    pipe.add_function_step("use", use, function_kwargs={"value": "${make.nmber}"})
    with pytest.raises(PipelineDefinitionError, match="step 'use': function_kwargs.*returns no 'nmber'"):
        pipe.start_locally()


def test_references_imply_parent_edges(backend: Backend) -> None:
    base = _base(backend)
    pipe = PipelineController(name="edges", project="p")
    pipe.add_step("a", base_task_id=base)
    pipe.add_step("b", base_task_id=base, parameter_override={"General/x": "${a.artifacts.data.url}"})
    pipe.add_step("c", base_task_id=base, task_overrides={"script.branch": "${b.script.branch}"})
    from controller.pipeline import dag

    dag.add_implied_parents(pipe.get_pipeline_dag())
    assert pipe.get_pipeline_dag()["b"].parents == ["a"]
    assert pipe.get_pipeline_dag()["c"].parents == ["b"]
