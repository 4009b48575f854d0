"""Pipelines behave the same in every run mode (issue 18).

The same three pipelines — from tasks, from functions, with PipelineDecorator — run in
every mode they have, each as a user's script in its own process:

| mode            | PipelineController                          | PipelineDecorator                   |
|-----------------|---------------------------------------------|-------------------------------------|
| `agent`         | `start(queue="services")`                   | default (`pipeline_execution_queue`) |
| `start_locally` | `start_locally()` (steps on agents)         | `start_controller_locally=True`     |
| `local_steps`   | `start_locally(run_pipeline_steps_locally=True)` | `PipelineDecorator.run_locally()` |
| `debug`         | (no such mode)                              | `PipelineDecorator.debug_pipeline()` |

Each pipeline computes (x + 1) * 2 in two steps, the second failing on its first attempt
as a task (a retry, int or callable, runs it again); the logic, a callback and a step
report to the pipeline task through the class API (logger, artifacts, a model). One
store and one agent daemon serve the module; the steps need no packages.
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
from controller.backend import Backend
from controller.connect import backend_from_url
from controller.models import TaskRecord, TaskStatus

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r'''
import os, sys, tempfile

from controller import Task
from controller.automation import PipelineController
from controller.automation.controller import PipelineDecorator

KIND, MODE, PROJECT, FLAKY = sys.argv[1:5]
UNDER_AGENT = bool(os.environ.get("CONVEYOR_TASK_ID"))
EVENTS = []

STEP_CODE = """
import os, sys
from controller import Task
from controller.automation import PipelineController
task = Task.init()
params = task.data.hyperparams.get("General", {})
parent = params.get("parent_id")
if parent:
    flaky = params.get("flaky_file")
    if flaky and not os.path.exists(flaky):
        open(flaky, "w").write("failed once")
        sys.exit("flaky: the first attempt fails")
    value = Task.get_task(task_id=parent).artifacts["value"].get() * 2
    PipelineController.upload_artifact("from_step", value)
else:
    value = int(params["x"]) + 1
task.upload_artifact("value", value)
"""


def report_from_logic(value):
    """What the pipeline logic reports to its pipeline task, in every mode."""
    PipelineController.get_logger().report_scalar("logic", "value", value, iteration=0)
    PipelineController.upload_artifact("from_logic", value)
    model = os.path.join(tempfile.mkdtemp(), "model.bin")
    open(model, "wb").write(b"weights")
    PipelineController.upload_model("matrix-model", model)


def on_status(pipeline, node, previous):
    EVENTS.append([node.name, node.status])


def after_make(pipeline, node):
    PipelineController.get_logger().report_scalar("callback", "make", 1, iteration=0)


def before_add(pipeline, node, parameters):
    PipelineController.upload_artifact("add_parameters", sorted(parameters))


def make(x: int = 3):
    return x + 1


def add(y, flaky_file: str = ""):
    import os
    if os.environ.get("CONVEYOR_TASK_ID") and not os.path.exists(flaky_file):
        open(flaky_file, "w").write("failed once")
        raise RuntimeError("flaky: the first attempt fails")
    from controller.automation import PipelineController
    PipelineController.upload_artifact("from_step", y * 2)
    return y * 2


def controller_pipeline():
    retry = 1 if KIND == "tasks" else (lambda pipeline, node, retries: retries < 1)
    pipe = PipelineController(name="matrix", project=PROJECT, version="1.0.0", retry_on_failure=retry)
    pipe.set_default_execution_queue("default")
    pipe.add_parameter("x", 3)
    pipe.add_parameter("flaky_file", FLAKY)
    common = dict(status_change_callback=on_status)
    if KIND == "tasks":
        if not UNDER_AGENT:
            backend = pipe._backend
            for name in ("make template", "add template"):
                backend.create_task({"name": name, "project": PROJECT,
                                     "script": {"code": STEP_CODE, "entry_point": "step.py"}})
        pipe.add_step("make", base_task_project=PROJECT, base_task_name="make template",
                      parameter_override={"General/x": "${pipeline.x}"},
                      post_execute_callback=after_make, **common)
        pipe.add_step("add", parents=["make"], base_task_project=PROJECT, base_task_name="add template",
                      parameter_override={"General/parent_id": "${make.id}",
                                          "General/flaky_file": "${pipeline.flaky_file}"},
                      pre_execute_callback=before_add, **common)
        result_name = "value"
    else:
        pipe.add_function_step("make", make, function_kwargs={"x": "${pipeline.x}"}, function_return=["y"],
                               packages=[], post_execute_callback=after_make, **common)
        pipe.add_function_step("add", add, function_kwargs={"y": "${make.y}", "flaky_file": "${pipeline.flaky_file}"},
                               function_return=["z"], packages=[], pre_execute_callback=before_add, **common)
        result_name = "z"
    if MODE == "agent":
        pipe.start(queue="services")  # outside the agent: enqueue and exit
    else:
        pipe.start_locally(run_pipeline_steps_locally=(MODE == "local_steps"))
    if not pipe.is_successful():
        sys.exit("pipeline failed")
    value = Task.get_task(task_id=pipe.get_pipeline_dag()["add"].executed).artifacts[result_name].get()
    report_from_logic(value)
    PipelineController.upload_artifact("result", value)
    PipelineController.upload_artifact("events", EVENTS)


@PipelineDecorator.component(return_values=["y"], packages=[])
def make_component(x: int = 3):
    return x + 1


@PipelineDecorator.component(return_values=["z"], packages=[], retry_on_failure=1)
def add_component(y, flaky_file: str = ""):
    import os
    if os.environ.get("CONVEYOR_TASK_ID") and not os.path.exists(flaky_file):
        open(flaky_file, "w").write("failed once")
        raise RuntimeError("flaky: the first attempt fails")
    from controller.automation.controller import PipelineDecorator
    PipelineDecorator.upload_artifact("from_step", y * 2)
    return y * 2


@PipelineDecorator.pipeline(name="matrix", project=PROJECT, version="1.0.0", return_value="result",
                            default_queue="default", start_controller_locally=(MODE == "start_locally"))
def decorated(x: int = 3, flaky_file: str = ""):
    value = int(add_component(make_component(x), flaky_file=flaky_file))
    report_from_logic(value)
    assert PipelineDecorator.get_current_pipeline() is not None
    return value


if __name__ == "__main__":
    if KIND == "decorator":
        if MODE == "local_steps":
            PipelineDecorator.run_locally()
        elif MODE == "debug":
            PipelineDecorator.debug_pipeline()
        decorated(x=3, flaky_file=FLAKY)
    else:
        controller_pipeline()
'''

CASES = [
    *[(kind, mode) for kind in ("tasks", "functions") for mode in ("agent", "start_locally", "local_steps")],
    *[("decorator", mode) for mode in ("agent", "start_locally", "local_steps", "debug")],
]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A store and one agent daemon (services + default, 4 slots) for the module."""
    home = tmp_path_factory.mktemp("modes-home")
    url = f"sqlite:///{home / 'conveyor.db'}"
    env = {**os.environ, "CONVEYOR_HOME": str(home), "CONVEYOR_API": url}
    agent = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "daemon", "--queue", "services", "default", "--foreground",
         "--concurrency", "4", "--stop-grace", "1"],
        env=env, stdout=open(home / "agent.log", "wb"), stderr=subprocess.STDOUT, cwd=ROOT,  # noqa: SIM115
    )
    yield url
    agent.terminate()
    agent.wait(60)


@pytest.fixture
def backend(store: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Backend]:
    monkeypatch.setenv("CONVEYOR_API", store)
    client = backend_from_url(store)
    yield client
    client.close()


def run_script(script: Path, store: str, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    home = Path(store.removeprefix("sqlite:///")).parent  # local steps keep their work dirs there
    env = {**os.environ, "CONVEYOR_API": store, "CONVEYOR_HOME": str(home)}
    return subprocess.run([sys.executable, str(script), *args], env=env,
                          capture_output=True, text=True, timeout=timeout_s, cwd=script.parent)


def ended_controller(backend: Backend, project: str, timeout_s: float = 120) -> TaskRecord:
    (controller,) = backend.query_tasks(project=project, type="controller")
    deadline = time.monotonic() + timeout_s
    while not backend.get_task(controller.id).status.is_terminal:
        assert time.monotonic() < deadline, "the pipeline did not end"
        time.sleep(0.2)
    return backend.get_task(controller.id)


def log_of(backend: Backend, task_id: str) -> str:
    return "\n".join(line.line for line in backend.get_log(task_id))


@pytest.mark.parametrize(("kind", "mode"), CASES)
def test_the_same_pipeline_gives_the_same_result_in_every_mode(
    backend: Backend, store: str, tmp_path: Path, kind: str, mode: str
) -> None:
    script = tmp_path / "matrix_pipeline.py"
    script.write_text(SCRIPT)
    project = f"{kind}-{mode}-{uuid.uuid4().hex[:6]}"
    done = run_script(script, store, kind, mode, project, str(tmp_path / "flaky"))
    assert done.returncode == 0, done.stderr[-3000:]
    controller = ended_controller(backend, project)
    assert controller.status == TaskStatus.completed, (controller.status_message, log_of(backend, controller.id))
    pipeline_task = Task.get_task(task_id=controller.id)
    artifacts = pipeline_task.artifacts
    # the same result, reported from the logic, a step and a callback in every mode
    assert artifacts["result"].get() == 8
    assert artifacts["from_logic"].get() == 8
    assert artifacts["from_step"].get() == 8
    assert [s.value for s in backend.get_scalars(controller.id, title="logic", series="value")] == [8.0]
    assert [m.name for m in controller.models.get("output", [])] == ["matrix-model"]
    steps = backend.query_tasks(project=project, type=None)
    step_tasks = [t for t in steps if t.parent == controller.id]
    if mode == "debug":  # components are plain calls: no step task, the pipeline task exists
        assert step_tasks == []
        return
    nodes = controller.runtime.pipeline["nodes"]
    add = "add" if kind != "decorator" else "add_component"
    # the flaky step failed once and its retry ran where the mode runs steps
    assert nodes[add]["status"] == "completed" and nodes[add]["retries"] == 1, nodes[add]
    add_task = backend.get_task(nodes[add]["task_id"])
    assert add_task.runtime.worker.startswith("local:") == (mode == "local_steps"), add_task.runtime.worker
    if mode == "local_steps":
        assert add_task.runtime.worker.endswith("#1")  # the retry, run here
        # in the pipeline's own interpreter and environment, not a venv of its packages
        assert f"running in this environment ({sys.executable})" in log_of(backend, add_task.id)
    if kind != "decorator":
        assert [s.value for s in backend.get_scalars(controller.id, title="callback", series="make")] == [1.0]
        parameters = artifacts["add_parameters"].get()
        if kind == "functions":  # the resolved kwargs of a function step
            assert {"kwargs/flaky_file", "kwargs_artifacts/y"} <= set(parameters), parameters
        events = [status for name, status in artifacts["events"].get() if name == "make"]
        assert events[0] == "launching" and events[-1] == "completed", events
        assert len(set(events)) == len(events), f"events repeat a status: {events}"


SLOW_SCRIPT = r'''
import sys, time
from controller.automation import PipelineController

def sleep_long(seconds: float = 120.0):
    import time
    print("sleeping", flush=True)
    time.sleep(seconds)

pipe = PipelineController(name="limited", project=sys.argv[1], version="1.0.0")
pipe.add_function_step("sleeper", sleep_long, function_return=["nothing"], packages=[])
pipe.set_pipeline_execution_time_limit(0.05)  # minutes: 3 s
started = time.monotonic()
pipe.start_locally(run_pipeline_steps_locally=True)
print(f"returned after {time.monotonic() - started:.1f} s", flush=True)
sys.exit(0 if not pipe.is_successful() else 3)
'''


def test_the_pipeline_time_limit_kills_local_steps(backend: Backend, store: str, tmp_path: Path) -> None:
    script = tmp_path / "limited.py"
    script.write_text(SLOW_SCRIPT)
    project = f"limited-{uuid.uuid4().hex[:6]}"
    started = time.monotonic()
    done = run_script(script, store, project, timeout_s=90)
    assert done.returncode == 0, done.stderr[-3000:]
    assert time.monotonic() - started < 40, done.stdout
    controller = ended_controller(backend, project)
    assert controller.status == TaskStatus.failed
    assert "time limit" in controller.status_message
    (step,) = [t for t in backend.query_tasks(project=project) if t.parent == controller.id]
    assert step.status == TaskStatus.stopped, (step.status, step.status_message)
    assert step.runtime.worker.startswith("local:")


FAILING_SCRIPT = r'''
import sys
from controller.automation import PipelineController

def broken(x: int = 1):
    raise RuntimeError("broken on purpose")

pipe = PipelineController(name="failing", project=sys.argv[1], version="1.0.0")
pipe.set_default_execution_queue("default")
pipe.add_function_step("broken", broken, function_return=["nothing"], packages=[])
pipe.start(queue="services")
'''


def test_a_failed_pipeline_run_by_an_agent_exits_non_zero_with_its_message(
    backend: Backend, store: str, tmp_path: Path
) -> None:
    script = tmp_path / "failing.py"
    script.write_text(FAILING_SCRIPT)
    project = f"failing-{uuid.uuid4().hex[:6]}"
    done = run_script(script, store, project)
    assert done.returncode == 0, done.stderr[-3000:]  # enqueued; this process ends
    controller = ended_controller(backend, project)
    log = log_of(backend, controller.id)
    assert controller.status == TaskStatus.failed, (controller.status_message, log)
    assert controller.status_message.startswith("exited with code 1"), controller.status_message
    assert "pipeline failing failed: step 'broken' failed" in log
    assert "stopped: aborted" not in log


WRAPPED_SCRIPT = r"""
import sys
from controller import Task
from controller.automation import PipelineController
from controller.automation.controller import PipelineDecorator


def log_calls(func):
    def function_wrapper(*args, **kwargs):
        print("calling", func.__name__, flush=True)
        return func(*args, **kwargs)
    return function_wrapper


def times(n):
    def decorate(func):
        def again(*args, **kwargs):
            return func(*args, **kwargs) * n
        return again
    return decorate


@times(3)
@log_calls
def plus_one(x: int = 1):
    return x + 1


@PipelineDecorator.component(return_values=["value"], packages=[])
@log_calls
def doubled(x: int = 1):
    return 2 * x


@PipelineDecorator.pipeline(name="wrapped", project=sys.argv[1], version="1.0.0", return_value="result")
def logic(x: int = 1):
    return int(doubled(x))


pipe = PipelineController(name="wrapped", project=sys.argv[1], version="1.0.0")
pipe.add_function_step("plus", plus_one, function_kwargs={"x": 4}, function_return=["value"], packages=[])
pipe.start_locally(run_pipeline_steps_locally=True)
assert pipe.is_successful(), {n: node.status_message for n, node in pipe.get_pipeline_dag().items()}
print("function step:", Task.get_task(task_id=pipe.get_pipeline_dag()["plus"].executed).artifacts["value"].get())
PipelineDecorator.run_locally()
print("component:", logic(x=5))
"""


def test_a_step_wrapped_in_the_users_decorators_runs_as_written(backend: Backend, store: str, tmp_path: Path) -> None:
    script = tmp_path / "wrapped.py"
    script.write_text(WRAPPED_SCRIPT)
    project = f"wrapped-{uuid.uuid4().hex[:6]}"
    done = run_script(script, store, project)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "function step: 15" in done.stdout  # (4 + 1) * 3, through both decorators
    assert "component: 10" in done.stdout
    steps = {t.name for t in backend.query_tasks(project=project) if t.type != "controller"}
    assert steps == {"plus", "doubled"}, steps  # the component keeps the function's name
    logs = {t.name: log_of(backend, t.id) for t in backend.query_tasks(project=project) if t.type != "controller"}
    assert "calling plus_one" in logs["plus"] and "calling doubled" in logs["doubled"]


def one(x: int = 1):
    return x


def test_accepted_but_unsupported_arguments_warn_once(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    from controller.automation import PipelineController
    from controller.pipeline import definition

    definition._warned.clear()  # other tests of this process may have warned already
    caplog.set_level("WARNING", logger="conveyor.pipeline")
    project = f"warned-{uuid.uuid4().hex[:6]}"
    for _ in range(2):
        pipe = PipelineController(name="warned", project=project, version="1.0.0", pool_frequency=1.0,
                                  auto_version_bump=True, always_create_from_code=False)
        pipe.add_parameter("rows", 3, description="how many rows", param_type="int")
        pipe.add_function_step("step", one, draft=True, auto_connect_frameworks={"sklearn": False},
                               function_return=["x"], packages=[])
    warned = sorted(r.getMessage().split()[2] for r in caplog.records
                    if "accepted but not supported" in r.getMessage())
    assert warned == ["always_create_from_code=False", "auto_connect_frameworks", "auto_version_bump",
                      "draft", "pool_frequency"], warned
    pipe.create_draft()
    definition_recorded = backend.get_task(pipe.id).configuration["Pipeline"]
    assert definition_recorded["parameter_descriptions"] == {"rows": "how many rows"}
    assert definition_recorded["parameter_types"] == {"rows": "int"}
