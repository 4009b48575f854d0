"""`${...}` references: well-formed ones are parsed, malformed ones are errors naming their
text (never literal text), and a pipeline holding one is refused before anything runs."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from controller.automation import PipelineController
from controller.backend import Backend
from controller.connect import backend_from_url
from controller.pipeline import PipelineDefinitionError
from controller.pipeline.references import Reference, ReferenceError_, parse, substitute


@pytest.mark.parametrize(
    "text, shown, problem",
    [
        ("${a.", "'${a.'", "no closing '}'"),
        ("${a.b", "'${a.b'", "no closing '}'"),
        ("${", "'${'", "no closing '}'"),
        ("lr=${pipeline.lr", "'${pipeline.lr' in 'lr=${pipeline.lr'", "no closing '}'"),
        ("${a.id} then ${b.id", "'${b.id' in '${a.id} then ${b.id'", "no closing '}'"),
        ("${}", "'${}'", "nothing between the braces"),
        ("x ${} y", "'${}' in 'x ${} y'", "nothing between the braces"),
        ("${a{b}}", "'${a{b}'", "'{' inside it"),
        ("${ }", "empty reference '${ }'", ""),
        ("${.id}", "no step name in reference '${.id}'", ""),
        ("${a.}", "'${a.}'", "an empty name between dots"),
        ("${a..id}", "'${a..id}'", "an empty name between dots"),
        ("${a.parameters.}", "'${a.parameters.}'", "an empty name between dots"),
        ("${pipeline.}", "'${pipeline.}'", "an empty name between dots"),
        ("${pipeline}", "'${pipeline}' names no pipeline parameter", ""),
    ],
)
def test_a_malformed_reference_is_an_error_naming_its_text(text: str, shown: str, problem: str) -> None:
    with pytest.raises(ReferenceError_) as err:
        parse(text)
    message = str(err.value)
    assert shown in message and problem in message, message
    assert "${step.field}" in message or "${pipeline.name}" in message  # how to write one


def test_a_long_text_is_shortened_in_the_message() -> None:
    with pytest.raises(ReferenceError_) as err:
        parse("x" * 500 + " ${a.")
    assert len(str(err.value)) < 400 and "'${a.'" in str(err.value)


@pytest.mark.parametrize(
    "text, refs",
    [
        ("${a.id}", [("a", ("id",))]),
        ("${ a.id }", [("a", ("id",))]),
        ("${a.artifacts.data.url}", [("a", ("artifacts", "data", "url"))]),
        ("${a.parameters.General/lr.max}", [("a", ("parameters", "General/lr.max"))]),
        ("${a.models.output.-1.url}", [("a", ("models", "output", "-1", "url"))]),
        ("${pipeline.lr} and ${b.id}", [("pipeline", ("lr",)), ("b", ("id",))]),
        ("${a}", [("a", ())]),  # the DAG check asks for a field
        ("plain text, $HOME, {braces}, $ {x}, }{", []),
    ],
)
def test_well_formed_references_and_plain_text(text: str, refs: list[tuple[str, tuple[str, ...]]]) -> None:
    assert [(r.step, r.path) for r in parse(text)] == refs


def test_substitution_keeps_plain_text_and_types() -> None:
    def resolve(ref: Reference) -> object:
        return {"a": 3, "b": "x"}[ref.step]

    assert substitute("${a.id}", resolve) == 3
    assert substitute("n=${a.id}, s=${b.id}, $HOME {x}", resolve) == "n=3, s=x, $HOME {x}"
    with pytest.raises(ReferenceError_, match="'\\$\\{b.id'"):
        substitute("${a.id} ${b.id", resolve)


# --------------------------------------------------------------- in a pipeline

@pytest.fixture
def backend(sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Backend]:
    monkeypatch.setenv("CONVEYOR_API", sqlite_url)
    client = backend_from_url(sqlite_url)
    yield client
    client.close()


@pytest.mark.parametrize("value", ["${a.", "${}", "${a.b", "lr ${pipeline.", "${a..id}"])
@pytest.mark.parametrize("where", ["parameter_override", "configuration_overrides", "task_overrides"])
def test_a_pipeline_with_a_malformed_reference_is_refused_before_anything_runs(
    backend: Backend, value: str, where: str
) -> None:
    base = backend.create_task({"name": "base", "project": "p", "script": {"code": "print(1)\n"}}).id
    pipe = PipelineController(name="refs", project="p")
    pipe.add_parameter("lr", 0.1)
    pipe.add_step("a", base_task_id=base)
    key = {"parameter_override": "General/x", "configuration_overrides": "cfg",
           "task_overrides": "script.branch"}[where]
    pipe.add_step("b", base_task_id=base, parents=["a"], **{where: {key: value}})
    before = len(backend.query_tasks(limit=1000))
    with pytest.raises(PipelineDefinitionError) as err:
        pipe.start_locally()
    message = str(err.value)
    assert "pipeline step 'b'" in message and "malformed reference" in message
    assert repr(value.split(" ")[-1]) in message or repr(value) in message, message
    assert len(backend.query_tasks(limit=1000)) == before, "nothing may be created"
