"""Pipelines resume where they stopped, and ride out outages (issues 20 and 15), with real
processes: kill -9 of the agent running a pipeline controller, kill -9 of a pipeline
process running locally, kill -9 of `controller serve` during a step launch.

Each case asserts what an operator sees: the pipeline completes, every step ran exactly
once (each step appends a line to its own file), no step task is left queued, running or
as an unlaunched draft, and the resume is in the pipeline task's status history and log.
Agents use short leases (`--lease`) so a lost controller is found in seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.backend import Backend
from controller.connect import backend_from_url
from controller.errors import BackendUnavailableError
from controller.models import TaskRecord, TaskStatus
from tests.helpers_processes import Processes, kill9, started_processes
from tests.helpers_server import REPO_ROOT, free_port

pytestmark = pytest.mark.chaos

#: Lease of the agents (and so of the controller tasks they run), in seconds.
SHORT_LEASE_S = 3
#: Seconds each step sleeps.
STEP_S = 4

#: A step: appends its task id to <runs_dir>/<task name>, sleeps sleep_s.
STEP = """
import os, time
from controller.connect import get_backend
task = get_backend().get_task(os.environ["CONVEYOR_TASK_ID"])
params = task.hyperparams.get("General", {})
with open(os.path.join(params["runs_dir"], task.name), "a") as runs:
    runs.write(task.id + "\\n")
print("step", task.name, "running", flush=True)
time.sleep(float(params.get("sleep_s", 0)))
print("step", task.name, "done", flush=True)
"""

#: A chain of steps s0 → s1 → ... ; LAUNCH is how the pipeline is started.
CHAIN_PIPELINE = """
import os, time
from controller.automation import PipelineController

def before_launch(pipe, node, parameters):
    cue = {cue!r}
    if cue and node.name == "s1":  # the test kills the server now, during this launch
        open(cue, "w").write("launching s1")
        time.sleep(1.0)
    return True

pipe = PipelineController(name="chain", project={project!r}, version="1.0.0")
pipe.set_default_execution_queue("default")
previous = None
for i in range({steps}):
    pipe.add_step(f"s{{i}}", base_task_id={base!r}, parents=[previous] if previous else None,
                  parameter_override={{"General/sleep_s": {sleep_s}}},
                  pre_execute_callback=before_launch)
    previous = f"s{{i}}"
pipe.{launch}
print("pipeline finished, successful:", pipe.is_successful(), flush=True)
"""

#: A decorator pipeline of three chained component calls; each call appends a line to
#: <runs_dir>/<tag>.
DECORATED_PIPELINE = """
from controller.automation.controller import PipelineDecorator

@PipelineDecorator.component(return_values=["out"], packages=[])
def work(value: int, runs_dir: str, tag: str, sleep_s: float):
    import os, time
    with open(os.path.join(runs_dir, tag), "a") as runs:
        runs.write("run\\n")
    time.sleep(sleep_s)
    return value + 1

@PipelineDecorator.pipeline(name="decorated chain", project={project!r}, version="1.0.0",
                            return_value="total", default_queue="default")
def main(runs_dir: str = {runs_dir!r}, sleep_s: float = {sleep_s}):
    first = work(1, runs_dir, "c0", sleep_s)
    second = work(first, runs_dir, "c1", sleep_s)
    third = work(second, runs_dir, "c2", sleep_s)
    print("total is", third, flush=True)
    return third

if __name__ == "__main__":
    main()
"""


# ------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def agent_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One CONVEYOR_HOME (venv and git caches) for the agents of this module."""
    return tmp_path_factory.mktemp("resume-home")


@pytest.fixture
def processes(agent_home: Path, tmp_path: Path) -> Iterator[Processes]:
    yield from started_processes(agent_home, tmp_path)


@pytest.fixture
def store(sqlite_url: str) -> Iterator[Backend]:
    """A client of the test's SQLite store file (read directly, whatever the server does)."""
    client = backend_from_url(sqlite_url)
    if "services" not in {q.name for q in client.list_queues()}:
        client.create_queue("services")
    yield client
    client.close()


@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    path = tmp_path / "runs"
    path.mkdir()
    return path


def submit(processes: Processes, script: Path, api_url: str) -> None:
    """Run a pipeline script that enqueues its controller and ends (start(queue) / remote mode)."""
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                          cwd=script.parent, env={**os.environ, "CONVEYOR_API": api_url,
                                                  "CONVEYOR_HOME": str(processes.home)})
    assert done.returncode == 0, done.stderr
    assert "enqueued on 'services'" in done.stderr


def the_controller(store: Backend, project: str) -> TaskRecord:
    (controller,) = store.query_tasks(project=project, type="controller")
    return controller


def step_task(store: Backend, controller_id: str, name: str) -> TaskRecord | None:
    found = [t for t in store.query_tasks(parent=controller_id) if t.name == name]
    assert len(found) <= 1, f"step {name} has {len(found)} tasks"
    return found[0] if found else None


def step_is(store: Backend, controller_id: str, name: str, *statuses: TaskStatus) -> bool:
    task = step_task(store, controller_id, name)
    return task is not None and task.status in statuses


def log_of(store: Backend, task_id: str) -> str:
    return "\n".join(line.line for line in store.get_log(task_id))


def assert_each_step_ran_once(store: Backend, controller_id: str, runs_dir: Path, names: list[str],
                              run_files: list[str]) -> None:
    """One task per step, completed, on its first attempt; one run of each; nothing left."""
    children = store.query_tasks(parent=controller_id, limit=1000)
    assert sorted(t.name for t in children) == sorted(names), [(t.name, t.status.value) for t in children]
    for task in children:
        assert task.status == TaskStatus.completed, (task.name, task.status, task.status_message)
        assert task.runtime.attempt == 1, (task.name, task.runtime.attempt)
    for name in run_files:
        runs = (runs_dir / name).read_text().splitlines()
        assert len(runs) == 1, f"step {name} ran {len(runs)} times"


def assert_resumed_automatically(controller: TaskRecord, *lost_reasons: str) -> None:
    """The history shows the lost controller (failed for one of `lost_reasons`) and its
    resume right after, then the completed run."""
    history = [(h.status.value, h.reason) for h in controller.status_history]
    assert ("queued", "resume") in history, history
    resumed = history.index(("queued", "resume"))
    assert history[resumed - 1][0] == "failed" and history[resumed - 1][1] in lost_reasons, history
    resume = next(h for h in controller.status_history if h.reason == "resume")
    assert "automatic resume 1 of 3" in resume.message, resume.message
    assert controller.status == TaskStatus.completed, (controller.status, controller.status_message)
    [entry] = controller.runtime.pipeline["resumes"]
    assert entry["reason"] == "its controller was lost"


# -------------------------------------------------------------------------- cases
def test_kill_9_of_the_agent_running_a_pipeline_controller_resumes_it(
    store: Backend, sqlite_url: str, processes: Processes, runs_dir: Path, tmp_path: Path
) -> None:
    project = f"resume-{uuid.uuid4().hex[:6]}"
    base = store.create_task({"name": "step", "project": project,
                              "script": {"code": STEP, "entry_point": "step.py"},
                              "hyperparams": {"General": {"runs_dir": str(runs_dir), "sleep_s": 0}}}).id
    script = tmp_path / "chain.py"
    script.write_text(CHAIN_PIPELINE.format(project=project, base=base, steps=4, sleep_s=STEP_S, cue="",
                                            launch='start(queue="services")'))
    lease = ("--lease", str(SHORT_LEASE_S))
    processes.agent(sqlite_url, "resume-steps", "--concurrency", "2", *lease, queue="default")
    services = processes.agent(sqlite_url, "resume-services-1", *lease, queue="services")
    submit(processes, script, sqlite_url)
    controller = the_controller(store, project)
    processes.wait_until(lambda: step_is(store, controller.id, "s1", TaskStatus.in_progress), 45, "s1 running")
    killed_at = kill9(services)
    processes.agent(sqlite_url, "resume-services-2", *lease, queue="services")
    processes.wait_until(lambda: store.get_task(controller.id).status.is_terminal
               and store.get_task(controller.id).status_reason != "lease_expired", 60,
               "the resumed pipeline to end")
    done = store.get_task(controller.id)
    assert done.status == TaskStatus.completed, f"{done.status_message}\n{log_of(store, controller.id)}"
    assert_resumed_automatically(done, "lease_expired")
    log = log_of(store, controller.id)
    assert "resuming pipeline" in log and "its controller was lost" in log, log
    assert "1 followed" in log and "1 reused" in log, log
    assert_each_step_ran_once(store, controller.id, runs_dir, ["s0", "s1", "s2", "s3"],
                              ["s0", "s1", "s2", "s3"])
    resumed_at = next(h.time for h in done.status_history if h.reason == "resume")
    first_launch = step_task(store, controller.id, "s2").created_at
    print(f"PipelineController: lost controller resumed {resumed_at - killed_at:.1f} s after the kill; "
          f"its first launch (s2, after s1 ended) {first_launch - killed_at:.1f} s after the kill")


def test_kill_9_of_the_agent_running_a_decorator_pipeline_resumes_it(
    store: Backend, sqlite_url: str, processes: Processes, runs_dir: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    project = f"resume-deco-{uuid.uuid4().hex[:6]}"
    script = tmp_path / "decorated.py"
    script.write_text(DECORATED_PIPELINE.format(project=project, runs_dir=str(runs_dir), sleep_s=STEP_S))
    lease = ("--lease", str(SHORT_LEASE_S))
    processes.agent(sqlite_url, "deco-steps", "--concurrency", "2", *lease, queue="default")
    services = processes.agent(sqlite_url, "deco-services-1", *lease, queue="services")
    submit(processes, script, sqlite_url)
    controller = the_controller(store, project)
    processes.wait_until(lambda: step_is(store, controller.id, "work_1", TaskStatus.in_progress), 50,
               "the second component running")
    killed_at = kill9(services)
    # Restarted with the same worker id (as systemd does): registering ends the dead run's
    # task (worker_restarted) unless its lease expired first; either resumes it.
    processes.agent(sqlite_url, "deco-services-1", *lease, queue="services")
    processes.wait_until(lambda: store.get_task(controller.id).status.is_terminal
               and store.get_task(controller.id).status_reason not in ("worker_restarted", "lease_expired"), 60,
               "the resumed pipeline to end")
    done = store.get_task(controller.id)
    log = log_of(store, controller.id)
    assert done.status == TaskStatus.completed, f"{done.status_message}\n{log}"
    assert "total is 4" in log, log
    assert_resumed_automatically(done, "worker_restarted", "lease_expired")
    assert "resuming pipeline" in log, log
    assert_each_step_ran_once(store, controller.id, runs_dir, ["work", "work_1", "work_2"], ["c0", "c1", "c2"])
    from controller import Task

    monkeypatch.setenv("CONVEYOR_API", sqlite_url)
    assert Task.get_task(task_id=controller.id).artifacts["total"].get() == 4
    resumed_at = next(h.time for h in done.status_history if h.reason == "resume")
    first_launch = step_task(store, controller.id, "work_2").created_at
    print(f"PipelineDecorator: lost controller resumed {resumed_at - killed_at:.1f} s after the kill; "
          f"its first launch (work_2, after work_1 ended) {first_launch - killed_at:.1f} s after the kill")


def test_a_pipeline_process_killed_is_found_lost_and_resumed_by_hand(
    store: Backend, sqlite_url: str, processes: Processes, runs_dir: Path, tmp_path: Path
) -> None:
    """start_locally(): the process holds a lease on its task; killed, its task fails
    (lease_expired) like a lost agent's; `controller pipelines resume` carries it on."""
    project = f"resume-local-{uuid.uuid4().hex[:6]}"
    base = store.create_task({"name": "step", "project": project,
                              "script": {"code": STEP, "entry_point": "step.py"},
                              "hyperparams": {"General": {"runs_dir": str(runs_dir), "sleep_s": 0}}}).id
    script = tmp_path / "chain_local.py"
    script.write_text(CHAIN_PIPELINE.format(project=project, base=base, steps=3, sleep_s=STEP_S, cue="",
                                            launch="start_locally()"))
    processes.agent(sqlite_url, "local-steps", "--lease", str(SHORT_LEASE_S), queue="default")
    pipeline = processes.start("pipeline", [sys.executable, str(script)], api_url=sqlite_url)
    processes.wait_until(lambda: store.query_tasks(project=project, type="controller", status=["in_progress"]), 30,
               "the pipeline task")
    controller = the_controller(store, project)
    assert controller.runtime.worker.startswith("pipeline:"), controller.runtime.worker
    processes.wait_until(lambda: step_is(store, controller.id, "s1", TaskStatus.in_progress), 45, "s1 running")
    killed_at = kill9(pipeline)
    processes.wait_until(lambda: store.get_task(controller.id).status == TaskStatus.failed, 10 + 5,
               "the lost pipeline task to fail")
    lost = store.get_task(controller.id)
    detected_s = lost.finished_at - killed_at
    assert lost.status_reason == "lease_expired" and "was lost" in lost.status_message, lost.status_message
    assert "resume" not in [h.reason for h in lost.status_history], "no automatic resume without a queue"
    print(f"a killed local pipeline process was found lost {detected_s:.1f} s after the kill")
    # Resume it by hand on an agent of "services".
    processes.agent(sqlite_url, "local-services", "--lease", str(SHORT_LEASE_S), queue="services")
    resumed = subprocess.run(
        [sys.executable, "-m", "controller.cli", "--api", sqlite_url, "pipelines", "resume", controller.id],
        capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert resumed.returncode == 0, resumed.stderr
    assert f"Pipeline {controller.id} queued on services to resume" in resumed.stdout
    processes.wait_until(lambda: store.get_task(controller.id).status.is_terminal, 60, "the resumed pipeline to end")
    done = store.get_task(controller.id)
    log = log_of(store, controller.id)
    assert done.status == TaskStatus.completed, f"{done.status_message}\n{log}"
    assert "resume requested (manual)" in log, log
    assert_each_step_ran_once(store, controller.id, runs_dir, ["s0", "s1", "s2"], ["s0", "s1", "s2"])
    # A completed pipeline has nothing to resume: the CLI says how to run it from scratch.
    again = subprocess.run(
        [sys.executable, "-m", "controller.cli", "--api", sqlite_url, "pipelines", "resume", controller.id],
        capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert again.returncode != 0 and "nothing to resume" in again.stderr and "tasks reset" in again.stderr


def test_the_server_killed_during_a_step_launch_and_restarted_10_s_later(
    store: Backend, sqlite_url: str, processes: Processes, runs_dir: Path, tmp_path: Path
) -> None:
    """The pipeline waits through the outage (a log line every few seconds), its launch
    goes on when the server is back; no step fails, no orphan clone is left."""
    project = f"outage-{uuid.uuid4().hex[:6]}"
    port = free_port()
    server = processes.server(sqlite_url, port)
    api_url = f"http://127.0.0.1:{port}"
    base = store.create_task({"name": "step", "project": project,
                              "script": {"code": STEP, "entry_point": "step.py"},
                              "hyperparams": {"General": {"runs_dir": str(runs_dir), "sleep_s": 0}}}).id
    cue = tmp_path / "launching"
    script = tmp_path / "chain_outage.py"
    script.write_text(CHAIN_PIPELINE.format(project=project, base=base, steps=3, sleep_s=1, cue=str(cue),
                                            launch='start(queue="services")'))
    # Leases longer than the outage: this case is about the pipeline's calls, not leases.
    processes.agent(api_url, "outage-steps", "--lease", "60", queue="default")
    processes.agent(api_url, "outage-services", "--lease", "60", queue="services")
    submit(processes, script, api_url)
    controller = the_controller(store, project)
    processes.wait_until(cue.exists, 45, "the launch of s1")
    killed_at = kill9(server)
    time.sleep(10)
    assert store.get_task(controller.id).status == TaskStatus.in_progress
    s1 = step_task(store, controller.id, "s1")
    assert s1 is not None and s1.status == TaskStatus.created  # its enqueue waits for the server
    processes.server(sqlite_url, port)
    processes.wait_until(lambda: store.get_task(controller.id).status.is_terminal, 45, "the pipeline to end")
    done = store.get_task(controller.id)
    log = log_of(store, controller.id)
    assert done.status == TaskStatus.completed, f"{done.status_message}\n{log}"
    assert_each_step_ran_once(store, controller.id, runs_dir, ["s0", "s1", "s2"], ["s0", "s1", "s2"])
    assert "the control plane is unreachable" in log and "enqueue step 's1'" in log, log
    outage_s = step_task(store, controller.id, "s1").queued_at - killed_at
    print(f"a pipeline survived a server outage of {outage_s:.1f} s during a step launch")


class AnswersLostOnce:
    """A Backend (a real one inside) whose first answer to each call of `calls` is lost:
    the call is done, then BackendUnavailableError is raised, as when the server dies
    between doing a request and answering it."""

    def __init__(self, backend: Backend, calls: tuple[str, ...]) -> None:
        self._backend = backend
        self._pending = list(calls)
        self.lost: list[str] = []

    def __getattr__(self, name: str) -> object:
        method = getattr(self._backend, name)
        if name not in self._pending:
            return method

        def done_then_lost(*args: object, **kwargs: object) -> object:
            method(*args, **kwargs)
            self._pending.remove(name)
            self.lost.append(name)
            raise BackendUnavailableError(f"injected: the answer to {name} was lost")

        return done_then_lost


def test_a_launch_whose_answers_are_lost_creates_one_task_and_enqueues_it_once(
    store: Backend, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The clone was made and the enqueue done, but neither answer came back: the retry
    takes the clone it made (no orphan draft) and finds the enqueue done (no failure)."""
    monkeypatch.setenv("CONVEYOR_API", sqlite_url)
    from controller.automation import PipelineController

    project = f"lost-{uuid.uuid4().hex[:6]}"
    base = store.create_task({"name": "step", "project": project, "script": {"code": "print(1)"}}).id
    pipe = PipelineController(name="lost answers", project=project, version="1.0.0")
    pipe.set_default_execution_queue("default")  # no agent: the step stays queued
    pipe.add_step("only", base_task_id=base)
    flaky = AnswersLostOnce(pipe._backend, ("clone_task", "enqueue"))
    pipe._backend = flaky  # type: ignore[assignment]
    runner = threading.Thread(target=pipe.start_locally, name="pipeline-under-test", daemon=True)
    runner.start()
    deadline = time.monotonic() + 30
    while not (pipe.id and store.query_tasks(parent=pipe.id, status=["queued"])):
        assert time.monotonic() < deadline, "the step was never enqueued"
        time.sleep(0.05)
    assert flaky.lost == ["clone_task", "enqueue"]
    (step,) = store.query_tasks(parent=pipe.id)
    assert step.name == "only" and step.status == TaskStatus.queued
    assert pipe.get_pipeline_dag()["only"].executed == step.id
    pipe.stop()
    runner.join(30)
    assert not runner.is_alive()
    (step,) = store.query_tasks(parent=pipe.id)
    assert step.status == TaskStatus.stopped


def test_lease_expiry_puts_a_lost_controller_back_on_its_queue_while_its_budget_lasts(
    backend: Backend,
) -> None:
    """On every transport: the expiry fails the task, then re-enqueues it with reason
    "resume" and a pending automatic resume, until `auto_max` is used up."""
    if "services" not in {q.name for q in backend.list_queues()}:
        backend.create_queue("services")
    task = backend.create_task({"name": "pipe", "type": "controller", "execution": {"queue": "services"}})
    backend.edit_task(task.id, {"runtime": {"resume": {"auto_max": 1, "auto_count": 0, "pending": ""}}},
                      force=True)
    backend.register_worker("lost-worker", queues=["services"])
    backend.enqueue(task.id)
    for attempt in (1, 2):  # the second claim takes the task the expiry put back
        claimed = backend.claim(["services"], "lost-worker", lease_s=1)
        assert claimed is not None and claimed.id == task.id
        time.sleep(1.2)
        backend.expire_leases()  # (a server's own sweep may have been first)
        record = backend.get_task(task.id)
        if attempt == 1:
            assert record.status == TaskStatus.queued and record.status_reason == "resume"
            assert "automatic resume 1 of 1" in record.status_message
            assert record.runtime.resume == {"auto_max": 1, "auto_count": 1, "pending": "auto"}
            history = [(h.status.value, h.reason) for h in record.status_history]
            assert history[-2:] == [("failed", "lease_expired"), ("queued", "resume")]
        else:  # the budget is used up: the lost controller stays failed
            assert record.status == TaskStatus.failed and record.status_reason == "lease_expired"
