"""PipelineDecorator end to end: the reference's decorator example in all three modes.

The components train a model on the iris data that scikit-learn ships; step venvs get
scikit-learn, pandas and numpy offline from wheels rebuilt from this environment.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller import Task
from controller.automation.controller import PipelineDecorator
from controller.backend import Backend
from controller.connect import backend_from_url
from controller.models import TaskStatus
from controller.pipeline import PipelineStepError
from tests.helpers_wheels import offline_wheelhouse

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["scikit-learn", "pandas"]


# ------------------------------------------------------------------- the components
@PipelineDecorator.component(return_values=["data_frame"], cache=True, packages=PACKAGES)
def step_one(test_rows: int = 150):
    from sklearn.datasets import load_iris

    iris = load_iris(as_frame=True)
    data_frame = iris.frame.head(test_rows)
    return data_frame


@PipelineDecorator.component(return_values=["X_train", "X_test", "y_train", "y_test"], packages=PACKAGES)
def step_two(data_frame, test_size: float = 0.2, random_state: int = 42):
    from sklearn.model_selection import train_test_split

    y = data_frame["target"]
    X = data_frame[[c for c in data_frame.columns if c != "target"]]
    return train_test_split(X, y, test_size=test_size, random_state=random_state)


@PipelineDecorator.component(return_values=["model"], packages=PACKAGES)
def step_three(X_train, y_train):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(max_iter=500).fit(X_train, y_train)


@PipelineDecorator.component(return_values=["accuracy"], cache=True, packages=PACKAGES)
def step_four(model, X_data, Y_data):
    return float(model.score(X_data, Y_data))


def executing_pipeline(test_rows: int = 150, test_size: float = 0.2):
    data_frame = step_one(test_rows)
    X_train, X_test, y_train, y_test = step_two(data_frame, test_size=test_size)
    model = step_three(X_train, y_train)
    accuracy = 100 * step_four(model, X_data=X_test, Y_data=y_test)
    print(f"accuracy: {accuracy:.1f}%")
    return accuracy


@PipelineDecorator.component(return_values=["waited"], packages=[])
def sleeper(seconds: float = 2.0, tag: str = ""):
    import time

    time.sleep(seconds)
    return tag


@PipelineDecorator.component(return_values=["never"], packages=[])
def broken(x: int = 1):
    raise RuntimeError(f"broken component got {x}")


# -------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A store and an agent (services + default, 4 slots) that installs packages offline."""
    try:
        wheels = offline_wheelhouse(PACKAGES, tmp_path_factory.mktemp("wheels"))
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"cannot build the offline wheelhouse for {PACKAGES}: {exc}")
    home = tmp_path_factory.mktemp("decorator-home")
    url = f"sqlite:///{home / 'conveyor.db'}"
    env = {**os.environ, "CONVEYOR_HOME": str(home), "CONVEYOR_API": url,
           "CONVEYOR_PIP_ARGS": f"--no-index --find-links {wheels}"}
    agent = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "daemon", "--queue", "services", "default", "--foreground",
         "--concurrency", "4", "--stop-grace", "1"],
        env=env, stdout=open(home / "agent.log", "wb"), stderr=subprocess.STDOUT, cwd=ROOT,  # noqa: SIM115
    )
    os.environ["CONVEYOR_PIP_ARGS"] = env["CONVEYOR_PIP_ARGS"]  # for run_locally() steps
    yield url
    os.environ.pop("CONVEYOR_PIP_ARGS", None)
    agent.terminate()
    agent.wait(60)


@pytest.fixture
def backend(store: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Backend]:
    monkeypatch.setenv("CONVEYOR_API", store)
    PipelineDecorator._mode = "remote"
    client = backend_from_url(store)
    yield client
    client.close()
    PipelineDecorator._mode = "remote"


def make_pipeline(function, project: str, **options):  # noqa: ANN001, ANN201
    defaults = dict(name="decorated", project=project, version="1.0.0", pipeline_execution_queue=None,
                    default_queue="default", return_value="result")
    return PipelineDecorator.pipeline(**{**defaults, **options})(function)


# ----------------------------------------------------------------------------- tests
def test_the_reference_example_gives_the_same_result_in_all_three_modes(backend: Backend) -> None:
    results = {}
    for mode in ("remote", "local", "debug"):
        project = f"deco-{mode}-{uuid.uuid4().hex[:6]}"
        if mode == "local":
            PipelineDecorator.run_locally()
        elif mode == "debug":
            PipelineDecorator.debug_pipeline()
        results[mode] = make_pipeline(executing_pipeline, project)(test_rows=150, test_size=0.2)
        if mode != "debug":
            (controller,) = backend.query_tasks(project=project, type="controller")
            assert controller.status == TaskStatus.completed, controller.status_message
            nodes = controller.runtime.pipeline["nodes"]
            assert set(nodes) == {"step_one", "step_two", "step_three", "step_four"}
            assert controller.hyperparams["Args"] == {"test_rows": 150, "test_size": 0.2}
            assert nodes["step_three"]["parents"] == ["step_two"]
            if mode == "local":  # step_one is served from the cache of the remote run
                assert nodes["step_one"]["status"] == "cached"
                trained = backend.get_task(nodes["step_three"]["task_id"])
                assert trained.runtime.worker.startswith("local:")
        else:  # the pipeline task is recorded in every mode; components are plain calls
            (controller,) = backend.query_tasks(project=project)
            assert controller.type == "controller" and controller.status == TaskStatus.completed
    assert results["remote"] == results["local"] == results["debug"]
    assert 80 <= float(results["remote"]) <= 100


def test_independent_components_run_in_parallel(backend: Backend) -> None:
    def two_sleepers():
        first = sleeper(2.0, "a")
        second = sleeper(2.0, "b")
        return f"{first}{second}"

    project = f"par-{uuid.uuid4().hex[:6]}"
    started = time.monotonic()
    result = make_pipeline(two_sleepers, project)()
    elapsed = time.monotonic() - started
    assert result == "ab"
    (controller,) = backend.query_tasks(project=project, type="controller")
    first, second = (backend.get_task(controller.runtime.pipeline["nodes"][n]["task_id"]) for n in ("sleeper", "sleeper_1"))
    assert first.started_at < second.finished_at and second.started_at < first.finished_at, (
        f"the two components did not overlap (pipeline took {elapsed:.1f} s)")


@PipelineDecorator.component(return_values=["squares"], cache=True, packages=[])
def squares(n: int = 3):
    return [i * i for i in range(n)]


@PipelineDecorator.component(return_values=["total"], packages=[])
def total_of(values: list = None):
    return sum(values or [])


def test_cached_components_are_reused_on_a_second_run(backend: Backend) -> None:
    def cached_pipeline(n: int = 4):
        return total_of(squares(n)) + 0

    project = f"cache-{uuid.uuid4().hex[:6]}"
    first = make_pipeline(cached_pipeline, project)(n=5)
    second = make_pipeline(cached_pipeline, project)(n=5)
    assert first == second == 30
    runs = sorted(backend.query_tasks(project=project, type="controller"), key=lambda t: t.created_at)
    nodes = runs[1].runtime.pipeline["nodes"]
    assert nodes["squares"]["status"] == "cached"
    assert nodes["squares"]["task_id"] == runs[0].runtime.pipeline["nodes"]["squares"]["task_id"]
    assert nodes["total_of"]["status"] == "completed"
    third = make_pipeline(cached_pipeline, project)(n=6)  # other arguments: no cache hit
    assert third == 55


def test_a_failing_component_raises_where_its_result_is_used(backend: Backend) -> None:
    def uses_broken():
        value = broken(5)
        return value + 1

    project = f"fail-{uuid.uuid4().hex[:6]}"
    with pytest.raises(PipelineStepError, match="pipeline step 'broken' failed"):
        make_pipeline(uses_broken, project)()
    (controller,) = backend.query_tasks(project=project, type="controller")
    assert controller.status == TaskStatus.failed
    (step,) = backend.query_tasks(parent=controller.id)
    assert "broken component got 5" in "\n".join(line.line for line in backend.get_log(step.id))


def test_parallel_multi_instance_pipelines_return_results_in_call_order(backend: Backend) -> None:
    def tagged(tag: str = "", seconds: float = 1.0):
        return sleeper(seconds, tag) + "!"

    project = f"multi-{uuid.uuid4().hex[:6]}"
    pipeline = make_pipeline(tagged, project, multi_instance_support="parallel")
    assert pipeline(tag="first", seconds=1.5) is None
    assert pipeline(tag="second", seconds=0.5) is None
    assert PipelineDecorator.wait_for_multi_pipelines() == ["first!", "second!"]
    assert len(backend.query_tasks(project=project, type="controller")) == 2


REMOTE_SCRIPT = """
from controller.automation.controller import PipelineDecorator

@PipelineDecorator.component(return_values=["doubled"], packages=[])
def double(x: int = 1):
    return 2 * x

@PipelineDecorator.pipeline(name="remote decorated", project="{project}", version="1.0.0",
                            return_value="total", default_queue="default")
def main(x: int = 3):
    total = double(x) + double(10)
    print("total is", total)
    return total

if __name__ == "__main__":
    main(x=4)
"""


def test_the_default_mode_runs_the_pipeline_logic_on_the_services_queue(
    backend: Backend, store: str, tmp_path: Path
) -> None:
    project = f"remote-{uuid.uuid4().hex[:6]}"
    script = tmp_path / "remote_decorated.py"
    script.write_text(REMOTE_SCRIPT.format(project=project))
    done = subprocess.run([sys.executable, str(script)], env={**os.environ, "CONVEYOR_API": store},
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "total is" not in done.stdout
    (controller,) = backend.query_tasks(project=project, type="controller")
    deadline = time.monotonic() + 90
    while not backend.get_task(controller.id).status.is_terminal:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    record = backend.get_task(controller.id)
    log = "\n".join(line.line for line in backend.get_log(controller.id))
    assert record.status == TaskStatus.completed, log
    assert "total is 28" in log
    from controller import Task

    assert Task.get_task(task_id=controller.id).artifacts["total"].get() == 28


def test_components_from_another_module(backend: Backend) -> None:
    from tests.pipeline_components import summarize

    def uses_other_module(values: list = None):
        mean, spread = summarize(values)
        return f"{mean}/{spread}"

    assert make_pipeline(uses_other_module, f"mod-{uuid.uuid4().hex[:6]}")(values=[2, 4, 9]) == "5/7"


@pytest.mark.parametrize("where", ["agent", "local"])
def test_the_function_steps_example_runs_and_its_last_step_gets_what_its_inputs_need(
    backend: Backend, store: str, where: str
) -> None:
    """examples/pipeline_from_functions.py: `score` imports nothing, yet unpickles a sklearn
    model (on an agent its venv gets scikit-learn from the model artifact's metadata)."""
    args = ["--local"] if where == "local" else []
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "pipeline_from_functions.py"), *args],
                          env={**os.environ, "CONVEYOR_API": store}, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "successful: True" in done.stdout
    score_id = next(line.split()[-1] for line in done.stdout.splitlines() if line.startswith("score "))
    score = backend.get_task(score_id)
    assert any(p.lower().startswith("scikit-learn==") for p in score.packages), score.packages
    assert 0.8 <= Task.get_task(task_id=score_id).artifacts["accuracy"].get() <= 1.0
