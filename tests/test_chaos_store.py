"""Fault injection on the store side, with real processes: a restarted server's first
lease sweep, a SQLite write lock held past the busy timeout while an agent runs a step,
`pg_terminate_backend` of every PostgreSQL connection mid-pipeline, and kill -9 of an
agent restarted with the same id on PostgreSQL.

Each case asserts what an operator sees: every task ends in a terminal status with a
true reason within lease + 5 s of the fault's end, no step process is left, and no log
line is lost.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from controller.backend import Backend
from controller.client import HttpBackend
from controller.connect import backend_from_url
from controller.models import DEFAULT_LEASE_S, TaskStatus
from tests.conftest import POSTGRES_URL, _need
from tests.helpers_server import REPO_ROOT, free_port
from tests.test_agent_e2e import assert_all_gone, code_task, read_pids, wait_for, wait_for_line
from tests.test_chaos_agent import Processes, kill9, wait_until

pytestmark = pytest.mark.chaos

#: How long the SQLite case holds the write lock: six busy timeouts of its URL (1 s).
LOCK_HELD_S = 6.0


@pytest.fixture(scope="module")
def agent_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One CONVEYOR_HOME (venv and git caches) for the agents of this module."""
    return tmp_path_factory.mktemp("chaos-store-home")


@pytest.fixture
def processes(agent_home: Path, tmp_path: Path) -> Iterator[Processes]:
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    started = Processes(agent_home, log_dir)
    yield started
    started.stop_all()


def _claimed(store: Backend, worker_id: str, lease_s: float) -> str:
    store.register_worker(worker_id)
    task = store.create_task({"name": f"held by {worker_id}"})
    store.enqueue(task.id)
    claimed = store.claim(["default"], worker_id, lease_s=lease_s)
    assert claimed is not None and claimed.id == task.id
    return task.id


def test_a_restarted_server_sweeps_leases_only_one_lease_after_its_start(
    sqlite_url: str, processes: Processes
) -> None:
    """Both leases lapsed while the server was down. The agent that is alive reconnects
    and heartbeats within the first lease after the restart: its task keeps running;
    the task of the agent that never comes back fails at the first sweep."""
    store = backend_from_url(sqlite_url)
    try:
        alive_task = _claimed(store, "alive", lease_s=0.5)
        lost_task = _claimed(store, "gone", lease_s=0.5)
        time.sleep(1.0)  # an outage longer than both leases
        port = free_port()
        processes.server(sqlite_url, port)
        healthy_at = time.monotonic()
        api = HttpBackend(f"http://127.0.0.1:{port}")
        try:
            time.sleep(2.5)  # the live agent takes a while to reconnect
            while store.get_task(lost_task).status == TaskStatus.in_progress:
                api.heartbeat("alive", current_tasks=[alive_task])
                assert time.monotonic() - healthy_at < DEFAULT_LEASE_S + 5, "no sweep"
                time.sleep(0.5)
            swept_after_s = time.monotonic() - healthy_at
        finally:
            api.close()
        lost = store.get_task(lost_task)
        assert lost.status == TaskStatus.failed and lost.status_reason == "lease_expired"
        assert "worker gone was lost" in lost.status_message
        # The server became healthy a moment after it started (its clock starts first).
        assert DEFAULT_LEASE_S - 2 <= swept_after_s <= DEFAULT_LEASE_S + 3, swept_after_s
        assert store.get_task(alive_task).status == TaskStatus.in_progress
    finally:
        store.close()


#: A step that records its pid, says "ready", waits for the test's cue that the store is
#: locked, tries a write through the SDK (the error's class is printed), then prints
#: numbered lines until it is stopped. Every line also goes to a side file, so the test
#: knows what the step printed.
LOCKED_STORE_STEP = """
import os, time
from pathlib import Path
from controller import Task
task = Task.init()
side = Path(os.environ["SIDE_FILE"])
Path(os.environ["PIDS_FILE"]).write_text(f"{os.getpid()}\\n")
def say(text):
    print(text, flush=True)
    with side.open("a") as f:
        f.write(text + "\\n")
say("ready")
while not os.path.exists(os.environ["LOCKED_FILE"]):
    time.sleep(0.05)
try:
    task.set_parameter("Args/written_during_the_lock", 1)
    say("sdk: no error")
except Exception as exc:
    say(f"sdk error: {type(exc).__module__}.{type(exc).__name__}")
i = 0
while True:
    say(f"line {i}")
    i += 1
    time.sleep(0.1)
"""

#: A step that prints numbered lines (also to a side file), records its pid, then sleeps.
SLEEPING_STEP = """
import os, time
from pathlib import Path
side = Path(os.environ["SIDE_FILE"])
for i in range(20):
    print(f"line {i}", flush=True)
    with side.open("a") as f:
        f.write(f"line {i}\\n")
Path(os.environ["PIDS_FILE"]).write_text(f"{os.getpid()}\\n")
time.sleep(300)
"""


def _last_seen(store: Backend, worker_id: str) -> float:
    return next(w.last_seen for w in store.list_workers() if w.id == worker_id)


def assert_printed_lines_logged_once(store: Backend, task_id: str, side_file: Path) -> int:
    """Every line the step printed (its side file) is in the task log exactly once;
    returns how many."""
    printed = side_file.read_text().splitlines()
    logged = [line.line for line in store.get_log(task_id)]
    lost = [text for text in printed if text not in logged]
    assert not lost, f"{len(lost)} log line(s) lost: {lost[:10]}"
    doubled = sorted({text for text in printed if logged.count(text) > 1})
    assert not doubled, f"log lines delivered twice: {doubled[:10]}"
    return len(printed)


def test_a_sqlite_write_lock_past_the_busy_timeout_while_a_step_runs(
    tmp_path: Path, processes: Processes
) -> None:
    """Another process holds the write lock 6 times the busy timeout (1 s here, from the
    URL) while the agent runs a step: the heartbeat thread logs and retries, the task is
    not failed as lost, the step's SDK sees BackendUnavailableError (not sqlite3's
    OperationalError), an abort issued after the lock is released is delivered, and no
    log line is lost."""
    db_path = tmp_path / "conveyor.db"
    url = f"sqlite:///{db_path}?timeout=1"
    store = backend_from_url(url)
    side_file, pids_file, locked_file = tmp_path / "side", tmp_path / "pids", tmp_path / "locked"
    try:
        task = code_task(store, LOCKED_STORE_STEP, hyperparams={"Environment": {
            "SIDE_FILE": str(side_file), "PIDS_FILE": str(pids_file), "LOCKED_FILE": str(locked_file)}})
        agent = processes.agent(url, "chaos-locked")
        wait_for_line(store, task.id, "ready")
        [step_pid] = read_pids(pids_file, 1)
        holder = sqlite3.connect(db_path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            locked_file.touch()
            time.sleep(LOCK_HELD_S)
        finally:
            holder.rollback()
            holder.close()
        released_at = time.time()
        assert agent.poll() is None, processes.output()
        # heartbeats resume (the thread survived) and the task is still running
        wait_until(lambda: _last_seen(store, "chaos-locked") > released_at, DEFAULT_LEASE_S,
                   "a heartbeat after the lock was released")
        assert store.get_task(task.id).status == TaskStatus.in_progress
        store.abort_task(task.id, message="abort after the lock")
        aborted_at = time.monotonic()
        stopped = wait_for(store, task.id, "stopped", "failed", "completed", timeout=DEFAULT_LEASE_S + 5)
        abort_s = time.monotonic() - aborted_at
        assert stopped.status == TaskStatus.stopped and stopped.status_reason == "aborted", stopped.status_message
        assert_all_gone([step_pid])
        lines = assert_printed_lines_logged_once(store, task.id, side_file)
        logged = [line.line for line in store.get_log(task.id)]
        assert "sdk error: controller.errors.BackendUnavailableError" in logged, [
            text for text in logged if "sdk" in text]
        assert not any("OperationalError" in text for text in logged)
        output = processes.output()
        assert "heartbeat failed: BackendUnavailableError" in output, output
        assert "sqlite3.OperationalError" not in output
        print(f"abort delivered after {abort_s:.1f} s; {lines} lines, 0 lost")
    finally:
        store.close()


def test_kill_9_of_an_agent_restarted_with_the_same_id_on_postgresql(
    postgres_url: str, tmp_path: Path, processes: Processes
) -> None:
    """The new run of the worker ends the dead run's task at once when it registers
    (failed, worker_restarted); the watchdog left no step process; no line lost."""
    store = backend_from_url(postgres_url)
    side_file, pids_file = tmp_path / "side", tmp_path / "pids"
    try:
        task = code_task(store, SLEEPING_STEP, hyperparams={"Environment": {
            "SIDE_FILE": str(side_file), "PIDS_FILE": str(pids_file)}})
        victim = processes.agent(postgres_url, "chaos-pg-restart")
        [step_pid] = read_pids(pids_file, 1)
        wait_for_line(store, task.id, "line 19")
        kill9(victim)
        assert_all_gone([step_pid])
        processes.agent(postgres_url, "chaos-pg-restart")
        restarted_at = time.monotonic()
        failed = wait_for(store, task.id, "failed", "stopped", "completed", timeout=DEFAULT_LEASE_S + 5)
        ended_s = time.monotonic() - restarted_at
        assert failed.status == TaskStatus.failed and failed.status_reason == "worker_restarted", failed.status_message
        assert "chaos-pg-restart" in failed.status_message
        lines = assert_printed_lines_logged_once(store, task.id, side_file)
        assert lines == 20
        print(f"dead run's task ended {ended_s:.1f} s after the restart")
    finally:
        store.close()


STEP_RUN_S = 3.0
#: A pipeline step: prints 30 numbered lines over about 3 s (each also to its own side
#: file), after recording its pid.
PIPELINE_STEP = """
import os, time
from pathlib import Path
name = os.environ["CONVEYOR_TASK_ID"]
side = Path(os.environ["SIDE_DIR"]) / name
with (Path(os.environ["SIDE_DIR"]) / "pids").open("a") as f:
    f.write(f"{os.getpid()}\\n")
for i in range(30):
    print(f"{name} line {i}", flush=True)
    with side.open("a") as f:
        f.write(f"{name} line {i}\\n")
    time.sleep(0.1)
"""

#: The pipeline: a -> b -> c of the base task "step", run in this process.
CHAIN_PIPELINE = """
from controller.automation import PipelineController
pipe = PipelineController(name="chain", project="{project}", version="1.0.0")
pipe.set_default_execution_queue("default")
pipe.add_step("a", base_task_project="{project}", base_task_name="step")
pipe.add_step("b", base_task_project="{project}", base_task_name="step", parents=["a"])
pipe.add_step("c", base_task_project="{project}", base_task_name="step", parents=["b"])
pipe.start_locally()
print("pipeline finished, successful:", pipe.is_successful(), flush=True)
"""


@pytest.fixture
def own_database_url() -> Iterator[tuple[str, str]]:
    """A PostgreSQL database of the test's own, so that every connection to it can be
    terminated without touching anyone else's: (url, database name)."""
    try:
        admin = psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=3)
    except Exception as exc:  # noqa: BLE001
        _need(f"PostgreSQL not reachable at {POSTGRES_URL}: {exc}")
    name = f"conveyor_chaos_{uuid.uuid4().hex[:8]}"
    admin.execute(f"CREATE DATABASE {name}")
    base = POSTGRES_URL.split("?")[0].rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}", name
    finally:
        admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
        admin.close()


def terminate_connections(database: str) -> int:
    """pg_terminate_backend of every connection to `database`; returns how many."""
    with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
        rows = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (database,),
        ).fetchall()
    return sum(1 for (done,) in rows if done)


@pytest.mark.postgres
def test_pg_terminate_backend_of_every_connection_mid_pipeline(
    own_database_url: tuple[str, str], tmp_path: Path, processes: Processes
) -> None:
    """A 3-step chain run by a pipeline over `controller serve` on PostgreSQL, with an
    agent on the same database; every connection to the database (the server's pool
    and LISTEN connection, the agent's, its step's) is terminated twice while step b
    runs. The pipeline completes, every task ends completed, no line is lost, no step
    process is left."""
    db_url, db_name = own_database_url
    store = backend_from_url(db_url)
    side_dir = tmp_path / "side"
    side_dir.mkdir()
    project = f"chaos-{uuid.uuid4().hex[:6]}"
    try:
        store.create_task({
            "name": "step", "project": project, "script": {"code": PIPELINE_STEP, "entry_point": "step.py"},
            "hyperparams": {"Environment": {"SIDE_DIR": str(side_dir)}},
        })
        port = free_port()
        processes.server(db_url, port)
        api_url = f"http://127.0.0.1:{port}"
        processes.agent(db_url, "chaos-pg-terminate")
        script = tmp_path / "chain.py"
        script.write_text(CHAIN_PIPELINE.format(project=project))
        env = {**os.environ, "CONVEYOR_API": api_url,
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
        pipeline_log = (tmp_path / "pipeline.log").open("wb")
        pipeline = subprocess.Popen([sys.executable, str(script)], env=env, cwd=tmp_path,
                                    stdout=pipeline_log, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: _running_step(store, project, "b") is not None, 60, "step b to run")
            b_id = _running_step(store, project, "b")
            assert b_id is not None
            wait_for_line(store, b_id, f"{b_id} line 5")
            terminated = terminate_connections(db_name)
            time.sleep(0.5)
            terminated += terminate_connections(db_name)
            fault_over_at = time.monotonic()
            assert pipeline.wait(60) == 0, (tmp_path / "pipeline.log").read_text() + processes.output()
            finished_s = time.monotonic() - fault_over_at
        finally:
            if pipeline.poll() is None:
                pipeline.kill()
                pipeline.wait(10)
            pipeline_log.close()
        output = (tmp_path / "pipeline.log").read_text()
        assert "pipeline finished, successful: True" in output, output
        tasks = [t for t in store.query_tasks(project=project) if t.name != "step"]
        assert sorted(t.name for t in tasks) == ["a", "b", "c", "chain"]
        for task in tasks:  # every task terminal, with a true reason
            assert task.status == TaskStatus.completed and task.status_reason == "completed", (
                task.name, task.status, task.status_reason, task.status_message)
        # what was left of b, then c (3 s each), within lease + 5 s of the fault
        assert finished_s <= DEFAULT_LEASE_S + 5 + STEP_RUN_S, finished_s
        lines = 0
        for task in tasks:
            if task.name != "chain":
                lines += assert_printed_lines_logged_once(store, task.id, side_dir / task.id)
        assert lines == 90
        assert_all_gone([int(p) for p in (side_dir / "pids").read_text().split()])
        print(f"terminated {terminated} connection(s) mid-pipeline; pipeline done {finished_s:.1f} s later; "
              f"{lines} lines, 0 lost")
    finally:
        store.close()


def _running_step(store: Backend, project: str, name: str) -> str | None:
    """The id of the pipeline step `name` of `project` once it runs (or ran)."""
    for task in store.query_tasks(project=project, name=name):
        if task.status != TaskStatus.created and task.status != TaskStatus.queued:
            return task.id
    return None
