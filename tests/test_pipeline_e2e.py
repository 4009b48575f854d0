"""PipelineController end to end: real agents run the steps of real pipelines.

One embedded store and one agent daemon (6 slots, services and default) serve every test of this module; each
test uses its own project. Steps read their parameters and record outputs through the
Backend, as any step code can.
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

from controller.automation import PipelineController
from controller.backend import Backend
from controller.connect import backend_from_url
from controller.models import TaskStatus
from controller.pipeline import PipelineDefinitionError

ROOT = Path(__file__).resolve().parents[1]

# A step that prints its parameters, sleeps SLEEP_S, fails if FAIL_TIMES says so (counting
# runs in COUNTER_FILE) and records an artifact "out" (its name) and its parameters.
STEP = '''
import json, os, sys, time
from controller.connect import get_backend
backend = get_backend()
task = backend.get_task(os.environ["CONVEYOR_TASK_ID"])
params = task.hyperparams.get("General", {})
print("params", json.dumps(params, sort_keys=True), flush=True)
time.sleep(float(params.get("sleep_s", 0)))
counter = params.get("counter_file")
if counter:
    runs = int(open(counter).read()) + 1 if os.path.exists(counter) else 1
    open(counter, "w").write(str(runs))
    if runs <= int(params.get("fail_times", 0)):
        print("failing run", runs, flush=True)
        sys.exit(2)
if params.get("always_fail"):
    sys.exit(3)
backend.edit_task(task.id, {"artifacts": {"out": {"uri": "file:///data/" + task.name + ".csv",
                                                   "sha256": "feed" + task.name}}}, force=True)
'''


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A store and a running agent daemon (queues services and default, 6 slots) for the module."""
    home = tmp_path_factory.mktemp("pipeline-home")
    url = f"sqlite:///{home / 'conveyor.db'}"
    env = {**os.environ, "CONVEYOR_HOME": str(home), "CONVEYOR_API": url}
    log = open(home / "agent.log", "wb")  # noqa: SIM115
    agent = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "daemon", "--queue", "services", "default", "--foreground",
         "--concurrency", "6", "--stop-grace", "1"],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
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


@pytest.fixture
def project() -> str:
    return f"p-{uuid.uuid4().hex[:8]}"


def base_task(backend: Backend, project: str, name: str, **general: object) -> str:
    return backend.create_task({
        "name": name, "project": project, "script": {"code": STEP, "entry_point": "step.py"},
        "hyperparams": {"General": {"sleep_s": 0, **general}},
    }).id


def new_pipeline(project: str, **options: object) -> PipelineController:
    pipe = PipelineController(name="pipe", project=project, version="1.0.0", **options)
    pipe.set_default_execution_queue("default")
    return pipe


def step_log(backend: Backend, pipe: PipelineController, step: str) -> str:
    task_id = pipe.get_pipeline_dag()[step].executed
    return "\n".join(line.line for line in backend.get_log(task_id))


def statuses(pipe: PipelineController) -> dict[str, str]:
    return {name: node.status for name, node in pipe.get_pipeline_dag().items()}


# --------------------------------------------------------------------------- tests
def test_three_steps_pass_artifact_urls_ids_and_parameters(backend: Backend, project: str) -> None:
    base_task(backend, project, "pipeline step 1 dataset artifact")
    base_task(backend, project, "pipeline step 2 process dataset")
    base_task(backend, project, "pipeline step 3 train model")
    pipe = new_pipeline(project)
    pipe.add_parameter("test_size", 0.25)
    pipe.add_step("stage_data", base_task_project=project, base_task_name="pipeline step 1 dataset artifact")
    pipe.add_step("stage_process", parents=["stage_data"], base_task_project=project,
                  base_task_name="pipeline step 2 process dataset",
                  parameter_override={"General/dataset_url": "${stage_data.artifacts.out.url}",
                                      "General/test_size": "${pipeline.test_size}"})
    pipe.add_step("stage_train", parents=["stage_process"], base_task_project=project,
                  base_task_name="pipeline step 3 train model",
                  parameter_override={"General/dataset_task_id": "${stage_process.id}"})
    pipe.start_locally()
    assert pipe.is_successful(), statuses(pipe)
    dag = pipe.get_pipeline_dag()
    assert '"dataset_url": "file:///data/stage_data.csv"' in step_log(backend, pipe, "stage_process")
    assert '"test_size": 0.25' in step_log(backend, pipe, "stage_process")  # the type is kept
    assert f'"dataset_task_id": "{dag["stage_process"].executed}"' in step_log(backend, pipe, "stage_train")
    # the steps are clones (children of the pipeline task), the base tasks never ran
    step = backend.get_task(dag["stage_data"].executed)
    assert step.parent == pipe.id and step.name == "stage_data"
    assert backend.query_tasks(project=project, name="pipeline step 1 dataset artifact")[0].status == TaskStatus.created
    # the pipeline task records the DAG and ends completed
    record = backend.get_task(pipe.id)
    assert record.status == TaskStatus.completed and record.type.value == "controller"
    nodes = record.runtime.pipeline["nodes"]
    assert {n: nodes[n]["status"] for n in nodes} == {"stage_data": "completed", "stage_process": "completed",
                                                      "stage_train": "completed"}
    assert nodes["stage_train"]["parents"] == ["stage_process"]
    assert nodes["stage_process"]["resolved_parameters"]["General/dataset_url"] == "file:///data/stage_data.csv"


def test_independent_steps_of_a_diamond_run_in_parallel(backend: Backend, project: str) -> None:
    base = base_task(backend, project, "base")
    pipe = new_pipeline(project)
    pipe.add_step("top", base_task_id=base)
    pipe.add_step("left", base_task_id=base, parents=["top"], parameter_override={"General/sleep_s": 2})
    pipe.add_step("right", base_task_id=base, parents=["top"], parameter_override={"General/sleep_s": 2})
    pipe.add_step("bottom", base_task_id=base, parents=["left", "right"])
    pipe.start_locally()
    assert pipe.is_successful(), statuses(pipe)
    dag = pipe.get_pipeline_dag()
    left, right, bottom = (backend.get_task(dag[n].executed) for n in ("left", "right", "bottom"))
    assert left.started_at < right.finished_at and right.started_at < left.finished_at, "not in parallel"
    assert bottom.started_at >= max(left.finished_at, right.finished_at)


def test_a_step_that_fails_twice_passes_on_its_second_retry(backend: Backend, project: str, tmp_path: Path) -> None:
    base = base_task(backend, project, "flaky", counter_file=str(tmp_path / "runs"), fail_times=2)
    pipe = new_pipeline(project)
    pipe.add_step("flaky", base_task_id=base, retry_on_failure=2)
    pipe.start_locally()
    assert pipe.is_successful(), statuses(pipe)
    node = pipe.get_pipeline_dag()["flaky"]
    assert node.retries == 2 and backend.get_task(node.executed).runtime.attempt == 3


def test_retries_run_out(backend: Backend, project: str, tmp_path: Path) -> None:
    base = base_task(backend, project, "flaky", counter_file=str(tmp_path / "runs"), fail_times=5)
    calls: list[int] = []
    pipe = new_pipeline(project)
    pipe.add_step("flaky", base_task_id=base, retry_on_failure=lambda p, node, n: calls.append(n) or n < 1)
    pipe.start_locally()
    assert not pipe.is_successful() and statuses(pipe) == {"flaky": "failed"}
    assert calls == [0, 1]
    assert backend.get_task(pipe.id).status == TaskStatus.failed


@pytest.mark.parametrize(
    "behaviour, child_status, pipeline_ok",
    [
        (None, "skipped", False),
        ({"continue_on_fail": True}, "skipped", True),
        ({"continue_on_fail": True, "skip_children_on_fail": False}, "completed", True),
        ({"continue_on_fail": False, "skip_children_on_fail": False}, "completed", False),
    ],
    ids=["default", "continue", "continue-and-run-children", "run-children-but-fail"],
)
def test_continue_behaviour_of_a_failed_step(
    backend: Backend, project: str, behaviour: dict | None, child_status: str, pipeline_ok: bool
) -> None:
    base = base_task(backend, project, "base")
    failing = base_task(backend, project, "failing", always_fail=True)
    pipe = new_pipeline(project)
    pipe.add_step("bad", base_task_id=failing, continue_behaviour=behaviour)
    pipe.add_step("child", base_task_id=base, parents=["bad"],
                  parameter_override={"General/from_bad": "${bad.artifacts.out.url}"})
    pipe.add_step("independent", base_task_id=base)
    pipe.start_locally()
    got = statuses(pipe)
    assert got["bad"] == "failed" and got["independent"] == "completed"
    assert got["child"] == child_status
    assert pipe.is_successful() is pipeline_ok
    if child_status == "completed":  # a failed parent's values default to None
        assert '"from_bad": null' in step_log(backend, pipe, "child")


def test_a_pre_execute_callback_returning_false_skips_the_step_and_its_children(
    backend: Backend, project: str
) -> None:
    base = base_task(backend, project, "base")
    seen: list[tuple[str, dict]] = []

    def gate(pipeline: PipelineController, node: PipelineController.Node, parameters: dict) -> bool:
        seen.append((node.name, parameters))
        return node.name != "gated"

    pipe = new_pipeline(project)
    pipe.add_parameter("p", 7)
    pipe.add_step("first", base_task_id=base, pre_execute_callback=gate,
                  parameter_override={"General/value": "${pipeline.p}"})
    pipe.add_step("gated", base_task_id=base, parents=["first"], pre_execute_callback=gate)
    pipe.add_step("after", base_task_id=base, parents=["gated"])
    pipe.start_locally()
    assert statuses(pipe) == {"first": "completed", "gated": "skipped", "after": "skipped"}
    assert seen[0] == ("first", {"General/value": 7})
    assert pipe.is_successful()


def test_a_step_over_its_time_limit_is_stopped_and_fails_the_pipeline(backend: Backend, project: str) -> None:
    base = base_task(backend, project, "slow", sleep_s=60)
    pipe = new_pipeline(project)
    pipe.add_step("slow", base_task_id=base, time_limit=1)
    started = time.monotonic()
    pipe.start_locally()
    assert time.monotonic() - started < 20
    assert statuses(pipe) == {"slow": "failed"}
    task = backend.get_task(pipe.get_pipeline_dag()["slow"].executed)
    assert task.status == TaskStatus.stopped and task.status_reason == "time_limit"
    assert not pipe.is_successful()


def test_abort_on_failure_stops_the_running_steps(backend: Backend, project: str) -> None:
    base = base_task(backend, project, "base")
    slow = base_task(backend, project, "slow", sleep_s=60)
    failing = base_task(backend, project, "failing", always_fail=True, sleep_s=0.5)
    pipe = new_pipeline(project, abort_on_failure=True)
    pipe.add_step("slow", base_task_id=slow)
    pipe.add_step("bad", base_task_id=failing)
    pipe.add_step("later", base_task_id=base, parents=["bad"])
    started = time.monotonic()
    pipe.start_locally()
    assert time.monotonic() - started < 30
    got = statuses(pipe)
    assert got["bad"] == "failed" and got["slow"] == "aborted" and got["later"] == "skipped"
    slow_task = backend.get_task(pipe.get_pipeline_dag()["slow"].executed)
    deadline = time.monotonic() + 15
    while not slow_task.status.is_terminal and time.monotonic() < deadline:
        time.sleep(0.1)
        slow_task = backend.get_task(slow_task.id)
    assert slow_task.status == TaskStatus.stopped
    assert backend.get_task(pipe.id).status == TaskStatus.failed


def test_stop_from_a_callback_ends_the_pipeline(backend: Backend, project: str) -> None:
    base = base_task(backend, project, "base")
    slow = base_task(backend, project, "slow", sleep_s=60)

    def on_change(pipeline: PipelineController, node: PipelineController.Node, previous: str) -> None:
        if node.name == "slow" and node.status == "running":
            pipeline.stop(mark_aborted=True)

    pipe = new_pipeline(project)
    pipe.add_step("slow", base_task_id=slow, status_change_callback=on_change)
    pipe.add_step("after", base_task_id=base, parents=["slow"])
    started = time.monotonic()
    pipe.start_locally()
    assert time.monotonic() - started < 30
    assert statuses(pipe) == {"slow": "aborted", "after": "skipped"}
    assert backend.get_task(pipe.id).status == TaskStatus.stopped
    assert not pipe.is_successful() and pipe.is_successful(fail_condition="failed")


def test_a_cached_step_reuses_the_completed_task_on_the_second_run(backend: Backend, project: str) -> None:
    base = base_task(backend, project, "base")
    runs = []
    for _ in range(2):
        pipe = new_pipeline(project)
        pipe.add_step("cached", base_task_id=base, cache_executed_step=True,
                      parameter_override={"General/x": 1})
        pipe.add_step("fresh", base_task_id=base, parents=["cached"],
                      parameter_override={"General/data": "${cached.artifacts.out.url}"})
        pipe.start_locally()
        assert pipe.is_successful()
        runs.append(pipe.get_pipeline_dag())
    assert runs[0]["cached"].status == "completed" and runs[1]["cached"].status == "cached"
    assert runs[1]["cached"].executed == runs[0]["cached"].executed
    assert runs[1]["fresh"].status == "completed" and runs[1]["fresh"].executed != runs[0]["fresh"].executed
    second = backend.query_tasks(project=project, name="pipe #2")
    assert second, "the second run is numbered"


def test_the_pipeline_time_limit_stops_everything(backend: Backend, project: str) -> None:
    slow = base_task(backend, project, "slow", sleep_s=60)
    pipe = new_pipeline(project)
    pipe.set_pipeline_execution_time_limit(0.05)  # 3 s
    pipe.add_step("slow", base_task_id=slow)
    started = time.monotonic()
    pipe.start_locally()
    assert 2.5 < time.monotonic() - started < 20
    assert statuses(pipe) == {"slow": "aborted"}
    record = backend.get_task(pipe.id)
    assert record.status == TaskStatus.failed and "time limit" in record.status_message


PIPELINE_SCRIPT = """
import os, sys
from controller.automation import PipelineController
from controller.pipeline import PipelineDefinitionError
pipe = PipelineController(name="{name}", project="{project}", version="1.0.0")
pipe.set_default_execution_queue("default")
pipe.add_parameter("size", 3)
pipe.add_step("a", base_task_project="{project}", base_task_name="base",
              parameter_override={{"General/size": "${{pipeline.size}}"}})
pipe.add_step("b", base_task_project="{project}", base_task_name="base", parents=["a"])
pipe.{launch}
print("pipeline finished, successful:", pipe.is_successful(), flush=True)
"""


def wait_terminal(backend: Backend, task_id: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not backend.get_task(task_id).status.is_terminal:
        assert time.monotonic() < deadline, f"task {task_id} did not end"
        time.sleep(0.1)


def test_start_enqueues_the_controller_on_services_where_an_agent_runs_it(
    backend: Backend, project: str, store: str, tmp_path: Path
) -> None:
    base_task(backend, project, "base")
    script = tmp_path / "remote_pipeline.py"
    script.write_text(PIPELINE_SCRIPT.format(name="remote", project=project, launch='start(queue="services")'))
    result = subprocess.run([sys.executable, str(script)], env={**os.environ, "CONVEYOR_API": store},
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "enqueued on 'services'" in result.stderr
    assert "pipeline finished" not in result.stdout  # the local process ended at start()
    (controller,) = backend.query_tasks(project=project, type="controller")
    assert controller.execution.queue == "services" and controller.script.code
    wait_terminal(backend, controller.id)
    done = backend.get_task(controller.id)
    log = "\n".join(line.line for line in backend.get_log(controller.id))
    assert done.status == TaskStatus.completed, log
    assert "pipeline finished, successful: True" in log
    steps = backend.query_tasks(parent=controller.id)
    assert sorted(s.name for s in steps) == ["a", "b"]
    assert all(s.status == TaskStatus.completed for s in steps)
    assert done.runtime.pipeline["nodes"]["b"]["status"] == "completed"


def test_a_pipeline_can_be_a_step_of_another_pipeline(
    backend: Backend, project: str, store: str, tmp_path: Path
) -> None:
    base_task(backend, project, "base")
    script = tmp_path / "inner_pipeline.py"
    script.write_text(PIPELINE_SCRIPT.format(name="inner", project=project, launch="create_draft()"))
    result = subprocess.run([sys.executable, str(script)], env={**os.environ, "CONVEYOR_API": store},
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (draft,) = backend.query_tasks(project=project, type="controller")
    assert draft.status == TaskStatus.created
    base = base_task(backend, project, "after")
    outer = PipelineController(name="outer", project=project, version="1.0.0")
    outer.set_default_execution_queue("default")
    outer.add_step("inner", base_task_id=draft.id, parameter_override={"Pipeline/size": 5})
    outer.add_step("after", base_task_id=base, parameter_override={"General/inner": "${inner.id}"})
    outer.start_locally()
    assert outer.is_successful(), statuses(outer)
    inner_task = backend.get_task(outer.get_pipeline_dag()["inner"].executed)
    assert inner_task.status == TaskStatus.completed and inner_task.parent == outer.id
    inner_steps = backend.query_tasks(parent=inner_task.id)
    assert sorted(s.name for s in inner_steps) == ["a", "b"]
    assert all(s.status == TaskStatus.completed for s in inner_steps)
    assert backend.get_task(outer.get_pipeline_dag()["after"].executed).started_at >= inner_task.finished_at
    a_step = next(s for s in inner_steps if s.name == "a")
    assert a_step.hyperparams["General"]["size"] == 5  # the outer override reached the inner pipeline


# ------------------------------------------------------------------ function steps
def make_numbers(count: int = 3, scale: float = 1.0):
    numbers = [i * scale for i in range(count)]
    return numbers, sum(numbers)


def add_offset(numbers: list, offset: int = 0):
    import statistics

    shifted = [n + offset for n in numbers]
    return shifted, statistics.mean(shifted)


def report(shifted: list, mean: float = 0.0, total: float = 0.0):
    print(f"report: {len(shifted)} numbers, mean {mean}, total {total}")
    return {"mean": mean, "total": total}


def test_a_pipeline_of_function_steps_passes_returned_objects(backend: Backend, project: str) -> None:
    pipe = new_pipeline(project)
    pipe.add_parameter("count", 4)
    pipe.add_function_step("make", make_numbers, function_kwargs={"count": "${pipeline.count}", "scale": 2.0},
                           function_return=["numbers", "total"], cache_executed_step=True)
    pipe.add_function_step("shift", add_offset, function_kwargs={"numbers": "${make.numbers}", "offset": 10},
                           function_return=["shifted", "mean"])
    pipe.add_function_step("report", report,
                           function_kwargs={"shifted": "${shift.shifted}", "mean": "${shift.mean}",
                                            "total": "${make.total}"},
                           function_return=["summary"])
    pipe.start_locally()
    assert pipe.is_successful(), {n: (x.status, x.status_message) for n, x in pipe.get_pipeline_dag().items()}
    dag = pipe.get_pipeline_dag()
    assert dag["report"].parents == ["shift", "make"] or set(dag["report"].parents) == {"shift", "make"}
    assert "report: 4 numbers, mean 13.0, total 12.0" in step_log(backend, pipe, "report")
    from controller import Task

    summary = Task.get_task(task_id=dag["report"].executed).artifacts["summary"].get()
    assert summary == {"mean": 13.0, "total": 12.0}
    shift_task = backend.get_task(dag["shift"].executed)
    assert shift_task.hyperparams["kwargs"]["offset"] == 10
    assert shift_task.hyperparams["kwargs_artifacts"]["numbers"] == f"{dag['make'].executed}.numbers"


def test_aborting_a_remote_pipeline_aborts_its_running_steps(
    backend: Backend, project: str, store: str, tmp_path: Path
) -> None:
    base_task(backend, project, "base", sleep_s=60)
    script = tmp_path / "slow_pipeline.py"
    script.write_text(PIPELINE_SCRIPT.format(name="slow", project=project, launch='start(queue="services")'))
    subprocess.run([sys.executable, str(script)], env={**os.environ, "CONVEYOR_API": store},
                   capture_output=True, text=True, timeout=60, cwd=tmp_path, check=True)
    (controller,) = backend.query_tasks(project=project, type="controller")
    deadline = time.monotonic() + 60
    while not any(s.status == TaskStatus.in_progress for s in backend.query_tasks(parent=controller.id)):
        assert time.monotonic() < deadline, "the first step never ran"
        time.sleep(0.1)
    backend.abort_task(controller.id)
    wait_terminal(backend, controller.id, timeout=30)
    assert backend.get_task(controller.id).status == TaskStatus.stopped
    (step,) = backend.query_tasks(parent=controller.id, name="a")
    wait_terminal(backend, step.id, timeout=30)
    assert backend.get_task(step.id).status == TaskStatus.stopped
    assert not backend.query_tasks(parent=controller.id, name="b"), "the second step must not start"


# ----------------------------------------------------- the reference flow, with the SDK
SDK_STEP_1 = """
from controller import Task
task = Task.init(project_name="{project}", task_name="pipeline step 1 dataset artifact")
task.execute_remotely()
task.upload_artifact("dataset", {{"rows": [[1, 2], [3, 4], [5, 6], [7, 8]], "labels": [0, 1, 0, 1]}})
print("dataset stored")
"""
SDK_STEP_2 = """
import json
from controller import StorageManager, Task
args = {{"dataset_url": "", "test_size": 0.5, "random_state": 42}}
task = Task.init(project_name="{project}", task_name="pipeline step 2 process dataset")
task.connect(args)
task.execute_remotely()
data = json.load(open(StorageManager.get_local_copy(remote_url=args["dataset_url"])))
cut = int(len(data["rows"]) * (1 - args["test_size"]))
task.upload_artifact("X_train", data["rows"][:cut])
task.upload_artifact("X_test", data["rows"][cut:])
print("split with test_size", repr(args["test_size"]), "random_state", repr(args["random_state"]))
"""
SDK_STEP_3 = """
from controller import Task
args = {{"dataset_task_id": ""}}
task = Task.init(project_name="{project}", task_name="pipeline step 3 train model")
task.connect(args)
task.execute_remotely()
source = Task.get_task(task_id=args["dataset_task_id"])
train = source.artifacts["X_train"].get()
task.get_logger().report_scalar("model", "rows", len(train), iteration=0)
print("trained on", train)
"""


def test_the_reference_example_with_step_templates_registered_by_running_them(
    backend: Backend, project: str, store: str, tmp_path: Path
) -> None:
    for i, source in enumerate((SDK_STEP_1, SDK_STEP_2, SDK_STEP_3), start=1):
        script = tmp_path / f"step{i}.py"
        script.write_text(source.format(project=project))
        done = subprocess.run([sys.executable, str(script)], env={**os.environ, "CONVEYOR_API": store},
                              capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    pipe = new_pipeline(project)
    pipe.add_step("stage_data", base_task_project=project, base_task_name="pipeline step 1 dataset artifact")
    pipe.add_step("stage_process", parents=["stage_data"], base_task_project=project,
                  base_task_name="pipeline step 2 process dataset",
                  parameter_override={"General/dataset_url": "${stage_data.artifacts.dataset.url}",
                                      "General/test_size": 0.25})
    pipe.add_step("stage_train", parents=["stage_process"], base_task_project=project,
                  base_task_name="pipeline step 3 train model",
                  parameter_override={"General/dataset_task_id": "${stage_process.id}"},
                  monitor_metrics=[("model", "rows")])
    pipe.start_locally()
    assert pipe.is_successful(), {n: (x.status, x.status_message) for n, x in pipe.get_pipeline_dag().items()}
    assert "split with test_size 0.25 random_state 42" in step_log(backend, pipe, "stage_process")
    assert "trained on [[1, 2], [3, 4], [5, 6]]" in step_log(backend, pipe, "stage_train")
    assert [s.value for s in backend.get_scalars(pipe.id, title="model", series="rows")] == [3.0]


def test_steps_can_run_as_local_subprocesses_without_an_agent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'no-agent.db'}"
    monkeypatch.setenv("CONVEYOR_API", url)
    local = backend_from_url(url)
    pipe = PipelineController(name="local", project="p", version="1.0.0")
    pipe.add_function_step("make", make_numbers, function_kwargs={"count": 3}, function_return=["numbers", "total"])
    pipe.add_function_step("shift", add_offset, function_kwargs={"numbers": "${make.numbers}", "offset": 1},
                           function_return=["shifted", "mean"])
    pipe.start_locally(run_pipeline_steps_locally=True)
    assert pipe.is_successful(), {n: (x.status, x.status_message) for n, x in pipe.get_pipeline_dag().items()}
    shift = local.get_task(pipe.get_pipeline_dag()["shift"].executed)
    assert shift.runtime.worker.startswith("local:") and local.list_workers() == []
    local.close()


def sleep_then_print(seconds: float = 60.0):
    import time

    print("local step started", flush=True)
    time.sleep(seconds)
    return seconds


def test_local_steps_are_stopped_by_their_time_limit_and_by_a_pipeline_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'local-stop.db'}"
    monkeypatch.setenv("CONVEYOR_API", url)
    local = backend_from_url(url)

    def stop_when_running(pipeline: PipelineController, node: PipelineController.Node, previous: str) -> None:
        if node.name == "stopped" and node.status == "running":
            deadline = time.monotonic() + 30
            while not any("local step started" in line.line for line in local.get_log(node.executed)):
                assert time.monotonic() < deadline, "the local step never printed its first line"
                time.sleep(0.1)
            pipeline.stop(mark_aborted=True)

    pipe = PipelineController(name="local-stop", project="p", version="1.0.0")
    pipe.add_function_step("limited", sleep_then_print, function_return=["slept"], time_limit=2,
                           continue_behaviour={"continue_on_fail": True, "skip_children_on_fail": False})
    pipe.add_function_step("stopped", sleep_then_print, function_return=["slept"], parents=["limited"],
                           status_change_callback=stop_when_running)
    started = time.monotonic()
    pipe.start_locally(run_pipeline_steps_locally=True)
    assert time.monotonic() - started < 40
    assert statuses(pipe) == {"limited": "failed", "stopped": "aborted"}
    limited = local.get_task(pipe.get_pipeline_dag()["limited"].executed)
    assert limited.status == TaskStatus.stopped and limited.status_reason == "time_limit"
    stopped = local.get_task(pipe.get_pipeline_dag()["stopped"].executed)
    assert stopped.status == TaskStatus.stopped and stopped.status_reason == "aborted"
    assert "local step started" in [line.line for line in local.get_log(stopped.id)]
    assert local.get_task(pipe.id).status == TaskStatus.stopped and local.list_workers() == []
    local.close()


def test_pipeline_tags_and_target_project(backend: Backend, project: str) -> None:
    base = base_task(backend, project, "base")
    pipe = new_pipeline(project, add_pipeline_tags=True, target_project=f"{project}/steps")
    pipe.add_tags(["nightly"])
    pipe.add_step("a", base_task_id=base)
    pipe.start_locally()
    step = backend.get_task(pipe.get_pipeline_dag()["a"].executed)
    assert step.project == f"{project}/steps" and f"pipe: {pipe.id}" in step.tags
    assert "nightly" in backend.get_task(pipe.id).tags


@pytest.mark.parametrize("continue_on_abort", [True, False])
def test_an_aborted_step_with_and_without_continue_on_abort(
    backend: Backend, project: str, continue_on_abort: bool
) -> None:
    base = base_task(backend, project, "base")
    slow = base_task(backend, project, "slow", sleep_s=60)

    def abort_when_running(pipeline: PipelineController, node: PipelineController.Node, previous: str) -> None:
        if node.status == "running":
            backend_from_url(os.environ["CONVEYOR_API"]).abort_task(node.executed)

    pipe = new_pipeline(project)
    pipe.add_step("slow", base_task_id=slow, status_change_callback=abort_when_running,
                  continue_behaviour={"continue_on_abort": continue_on_abort, "skip_children_on_abort": False})
    pipe.add_step("child", base_task_id=base, parents=["slow"])
    pipe.start_locally()
    assert statuses(pipe) == {"slow": "aborted", "child": "completed"}
    assert pipe.is_successful() is continue_on_abort


def triple_with_repo_helper(x: int = 1):
    import repo_helpers  # a module of the step's repository

    return repo_helpers.triple(x)


def upload_to_pipeline(value: int = 1):
    from controller.automation import PipelineController

    PipelineController.upload_artifact("from_step", {"value": value})
    PipelineController.get_logger().report_scalar("pipeline", "value", value, iteration=0)
    return value


def test_function_steps_in_a_repository_and_reporting_to_the_pipeline(
    backend: Backend, project: str, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    git_env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e",
               "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@e"}
    (repo / "repo_helpers.py").write_text("def triple(x):\n    return 3 * x\n")
    for args in (["init", "-q", "-b", "main"], ["add", "."], ["commit", "-qm", "helpers"]):
        subprocess.run(["git", *args], cwd=repo, check=True, env=git_env, capture_output=True)
    pipe = new_pipeline(project)
    pipe.add_function_step("triple", triple_with_repo_helper, function_kwargs={"x": 7},
                           function_return=["tripled"], repo=str(repo), packages=[])
    pipe.add_function_step("report", upload_to_pipeline, function_kwargs={"value": "${triple.tripled}"},
                           function_return=["echo"], packages=[])
    pipe.start_locally()
    assert pipe.is_successful(), {n: (x.status, x.status_message) for n, x in pipe.get_pipeline_dag().items()}
    step = backend.get_task(pipe.get_pipeline_dag()["triple"].executed)
    assert step.script.repository and step.script.commit
    from controller import Task

    pipeline_task = Task.get_task(task_id=pipe.id)
    assert pipeline_task.artifacts["from_step"].get() == {"value": 21}
    assert [s.value for s in backend.get_scalars(pipe.id, title="pipeline")] == [21.0]
    found = PipelineController.get(pipeline_project=project, pipeline_name="pipe")
    assert found.id == pipe.id
    with pytest.raises(PipelineDefinitionError, match="step 'x': repo"):
        new_pipeline(project).add_function_step("x", triple_with_repo_helper, repo=str(tmp_path))


def test_a_recorded_pipeline_can_be_found_and_enqueued(backend: Backend, project: str, tmp_path: Path,
                                                       store: str) -> None:
    base_task(backend, project, "base")
    script = tmp_path / "draft_pipeline.py"
    script.write_text(PIPELINE_SCRIPT.format(name="drafted", project=project, launch="create_draft()"))
    subprocess.run([sys.executable, str(script)], env={**os.environ, "CONVEYOR_API": store},
                   capture_output=True, text=True, timeout=60, cwd=tmp_path, check=True)
    found = PipelineController.get(pipeline_project=project, pipeline_name="drafted", pipeline_version="1.0.0")
    reply = PipelineController.enqueue(found, queue_name="services")
    assert reply["fields"]["status"] == "queued"
    wait_terminal(backend, found.id)
    assert backend.get_task(found.id).status == TaskStatus.completed
