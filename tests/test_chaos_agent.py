"""Fault injection on the agent side, with real processes: kill -9 of agents and of
`controller serve`, restarts on the same database and CONVEYOR_HOME.

Each case asserts what an operator sees: the task's final status and reason, every log
line the step printed, and no step process left behind.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from agent import daemon as daemon_module
from agent.daemon import AgentDaemon, DaemonThreadDiedError
from agent.executor import ExecutionSettings
from agent.outbox import Outbox, form_chunks, make_report
from controller.backend import Backend
from controller.connect import backend_from_url
from controller.models import DEFAULT_LEASE_S, TaskStatus
from tests.helpers_processes import Processes, kill9, started_processes, wait_until
from tests.helpers_server import free_port
from tests.test_agent_e2e import (
    assert_all_gone,
    code_task,
    read_pids,
    wait_for,
    wait_for_line,
)

pytestmark = pytest.mark.chaos

#: A step whose child starts a grandchild that calls setsid (leaves the step's session
#: and process group); all three record their pids, then sleep.
SETSID_STEP = """
import os, subprocess, sys, time
grandchild = (
    "import os, time\\n"
    "os.setsid()\\n"
    "open(os.environ['PIDS_FILE'], 'a').write(f'{os.getpid()}\\\\n')\\n"
    "time.sleep(300)\\n"
)
child = (
    "import os, subprocess, sys, time\\n"
    f"subprocess.Popen([sys.executable, '-c', {grandchild!r}])\\n"
    "open(os.environ['PIDS_FILE'], 'a').write(f'{os.getpid()}\\\\n')\\n"
    "time.sleep(300)\\n"
)
subprocess.Popen([sys.executable, "-c", child])
open(os.environ["PIDS_FILE"], "a").write(f"{os.getpid()}\\n")
print("tree started", flush=True)
time.sleep(300)
"""

#: A step that prints numbered lines, waits for a file (the test's cue), prints more
#: numbered lines and exits 0.
CUED_STEP = """
import os, sys, time
for i in range(20):
    print(f"line {i}", flush=True)
while not os.path.exists(os.environ["GO_FILE"]):
    time.sleep(0.05)
for i in range(20, 60):
    print(f"line {i}", flush=True)
print("to stderr", file=sys.stderr, flush=True)
"""
ALL_LINES = [f"line {i}" for i in range(60)] + ["to stderr"]


# ------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def agent_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One CONVEYOR_HOME (venv and git caches) for the agents of this module."""
    return tmp_path_factory.mktemp("chaos-home")


@pytest.fixture
def processes(agent_home: Path, tmp_path: Path) -> Iterator[Processes]:
    yield from started_processes(agent_home, tmp_path)


@pytest.fixture
def store(sqlite_url: str) -> Iterator[Backend]:
    """A client of the test's SQLite store file (read directly, whatever the server does)."""
    client = backend_from_url(sqlite_url)
    yield client
    client.close()


def assert_every_line_once(backend: Backend, task_id: str) -> None:
    lines = [line.line for line in backend.get_log(task_id)]
    missing = [text for text in ALL_LINES if text not in lines]
    assert not missing, f"lost log lines: {missing}"
    doubled = sorted({text for text in ALL_LINES if lines.count(text) > 1})
    assert not doubled, f"log lines delivered twice: {doubled}"


def outbox_files(home: Path, worker_id: str) -> list[Path]:
    return sorted((home / "outbox" / quote(worker_id, safe="")).glob("*.json"))



# -------------------------------------------------------------------------- cases
def test_kill_9_of_an_agent_leaves_no_process_and_another_daemon_ends_the_task(
    store: Backend, sqlite_url: str, processes: Processes, tmp_path: Path
) -> None:
    """(a) Embedded store: the watchdog kills the setsid grandchild too; a second live
    daemon's heartbeat loop sweeps the lease, so the task fails within lease + 5 s."""
    pids_file = tmp_path / "pids"
    task = code_task(store, SETSID_STEP, hyperparams={"Environment": {"PIDS_FILE": str(pids_file)}})
    victim = processes.agent(sqlite_url, "chaos-victim")
    wait_for_line(store, task.id, "tree started")
    pids = read_pids(pids_file, 3)
    time.sleep(1.5)  # the supervisor re-scans the tree every 0.5 s
    processes.agent(sqlite_url, "chaos-sweeper")  # idle; it only heartbeats and sweeps
    kill9(victim)
    killed_at = time.monotonic()
    assert_all_gone(pids)
    failed = wait_for(store, task.id, "failed", timeout=DEFAULT_LEASE_S + 5)
    detected_s = time.monotonic() - killed_at
    assert failed.status_reason == "lease_expired", failed.status_message
    assert "chaos-victim" in failed.status_message
    assert detected_s <= DEFAULT_LEASE_S + 5, detected_s
    print(f"lost agent detected after {detected_s:.1f} s")


def test_kill_9_of_the_server_while_a_step_ends_loses_nothing(
    store: Backend, sqlite_url: str, processes: Processes, tmp_path: Path
) -> None:
    """(b) The step ends while `controller serve` is down; the server comes back on the
    same database 10 s later; the agent's outbox delivers status, exit code and lines."""
    port = free_port()
    server = processes.server(sqlite_url, port)
    api_url = f"http://127.0.0.1:{port}"
    go_file = tmp_path / "go"
    task = code_task(store, CUED_STEP, hyperparams={"Environment": {"GO_FILE": str(go_file)}})
    # A lease longer than the outage: this case is about the report, not about leases
    # (an outage longer than the lease races the restarted server's first sweep).
    processes.agent(api_url, "chaos-outage", "--lease", "60")
    wait_for_line(store, task.id, "line 19")
    kill9(server)
    go_file.touch()  # the step prints 41 more lines and ends while the server is down
    time.sleep(10)
    assert store.get_task(task.id).status == TaskStatus.in_progress
    processes.server(sqlite_url, port)
    done = wait_for(store, task.id, "completed", "failed", "stopped", timeout=20)
    assert done.status == TaskStatus.completed, processes.output()
    assert done.status_reason == "completed" and done.runtime.exit_code == 0
    assert done.runtime.duration_s is not None and done.runtime.duration_s > 0
    assert_every_line_once(store, task.id)
    processes.wait_until(lambda: not outbox_files(processes.home, "chaos-outage"), 5, "the outbox to empty")


def test_a_restarted_agent_replays_its_outbox(
    store: Backend, sqlite_url: str, processes: Processes, tmp_path: Path
) -> None:
    """(c) The report is pending in the outbox when the agent is killed; the same worker
    id on the same CONVEYOR_HOME delivers it when it starts again."""
    port = free_port()
    server = processes.server(sqlite_url, port)
    api_url = f"http://127.0.0.1:{port}"
    go_file = tmp_path / "go"
    task = code_task(store, CUED_STEP, hyperparams={"Environment": {"GO_FILE": str(go_file)}})
    agent = processes.agent(api_url, "chaos-replay", "--lease", "60")
    wait_for_line(store, task.id, "line 19")
    kill9(server)
    go_file.touch()
    processes.wait_until(lambda: outbox_files(processes.home, "chaos-replay"), 20, "the report in the outbox")
    kill9(agent)
    assert store.get_task(task.id).status == TaskStatus.in_progress
    processes.server(sqlite_url, port)
    processes.agent(api_url, "chaos-replay", "--lease", "60")
    done = wait_for(store, task.id, "completed", "failed", "stopped", timeout=20)
    assert done.status == TaskStatus.completed, processes.output()
    assert done.status_reason == "completed" and done.runtime.exit_code == 0
    assert_every_line_once(store, task.id)
    assert "replaying 1 pending final report" in processes.output()
    assert not outbox_files(processes.home, "chaos-replay")


def test_a_chunk_stored_before_the_answer_was_lost_is_not_appended_again(
    store: Backend, tmp_path: Path
) -> None:
    """The server stored a chunk of the report and died before answering: the outbox
    still holds that chunk, resends it with its batch id, and the log has it once."""
    task = store.create_task({"name": "t"})
    outbox = Outbox(tmp_path, "chaos-resend")
    chunks = form_chunks([{"line": f"line {i}", "stream": "stdout"} for i in range(3)])
    chunks += form_chunks([{"line": "last", "stream": "stderr"}])
    entry = make_report(task.id, "chaos-resend", TaskStatus.completed, "completed", "", {}, chunks)
    outbox.save(entry)
    store.append_log(task.id, chunks[0]["lines"], batch_id=chunks[0]["batch_id"])  # stored, answer lost
    store.enqueue(task.id)
    store.claim(["default"], "chaos-resend")
    (replayed,) = outbox.pending()
    assert [c["batch_id"] for c in replayed.log_chunks] == [c["batch_id"] for c in chunks]
    assert outbox.deliver(store, replayed) == TaskStatus.completed
    assert [line.line for line in store.get_log(task.id)] == ["line 0", "line 1", "line 2", "last"]
    assert outbox.pending() == []


@pytest.mark.parametrize("lines", [["a", "b"], []], ids=["with lines", "without lines"])
def test_a_final_report_stored_before_the_answer_was_lost_is_acknowledged_when_resent(
    store: Backend, tmp_path: Path, lines: list[str]
) -> None:
    """The server stored the whole final report (lines, runtime, status) and died before
    answering: the replayed entry is acknowledged, and nothing is written twice."""
    task = store.create_task({"name": "t"})
    store.enqueue(task.id)
    store.claim(["default"], "chaos-lost-answer")
    outbox = Outbox(tmp_path, "chaos-lost-answer")
    chunks = form_chunks([{"line": line, "stream": "stdout"} for line in lines])
    entry = make_report(task.id, "chaos-lost-answer", TaskStatus.completed, "completed", "exit 0",
                        {"exit_code": 0, "duration_s": 0.5}, chunks)
    outbox.save(entry)
    (sent,) = outbox.pending()
    (last,) = sent.log_chunks  # the call the first attempt made, stored, answer lost:
    store.finish_task(task.id, TaskStatus.completed, reason="completed", message="exit 0",
                      worker_id="chaos-lost-answer", runtime=sent.runtime,
                      log_lines=last["lines"], log_batch_id=last["batch_id"])
    (replayed,) = outbox.pending()
    assert outbox.deliver(store, replayed) == TaskStatus.completed
    done = store.get_task(task.id)
    assert done.status == TaskStatus.completed and done.runtime.exit_code == 0
    assert [h.status.value for h in done.status_history] == ["created", "queued", "in_progress", "completed"]
    assert [line.line for line in store.get_log(task.id)] == lines
    assert outbox.pending() == []


def test_a_late_report_refused_keeps_the_steps_last_lines(store: Backend, tmp_path: Path) -> None:
    """The task was failed as lost (lease expired) before the agent's report arrived:
    the report's status is refused, but the lines the step printed last are in the log."""
    task = store.create_task({"name": "t"})
    store.enqueue(task.id)
    store.claim(["default"], "chaos-late", lease_s=1)
    time.sleep(1.1)
    assert task.id in store.expire_leases()
    outbox = Outbox(tmp_path, "chaos-late")
    chunks = form_chunks([{"line": "the last words", "stream": "stdout"}])
    outbox.save(make_report(task.id, "chaos-late", TaskStatus.completed, "completed", "exit 0",
                            {"exit_code": 0}, chunks))
    (report,) = outbox.pending()
    assert outbox.deliver(store, report) is None
    done = store.get_task(task.id)
    assert done.status == TaskStatus.failed and done.status_reason == "lease_expired"
    assert "the last words" in [line.line for line in store.get_log(task.id)]
    assert outbox.pending() == []


def test_an_entry_written_by_the_previous_agent_version_replays(store: Backend, tmp_path: Path) -> None:
    """Entries of the previous version (no log chunk at all, or unchunked `log_lines` of
    an older one) are delivered: lines, runtime and status."""
    outbox = Outbox(tmp_path, "chaos-old-entry")
    ids = []
    for extra in ({"log_chunks": []}, {"log_lines": [{"line": "old line", "stream": "stderr"}]}):
        task = store.create_task({"name": "t"})
        store.enqueue(task.id)
        store.claim(["default"], "chaos-old-entry")
        ids.append(task.id)
        entry = {"task_id": task.id, "worker_id": "chaos-old-entry", "status": "failed",
                 "reason": "exit_code", "message": "exited with code 2",
                 "runtime": {"exit_code": 2, "duration_s": 0.1}, "written_at": time.time(), **extra}
        (outbox.path / f"{task.id}.json").parent.mkdir(parents=True, exist_ok=True)
        (outbox.path / f"{task.id}.json").write_text(json.dumps(entry))
    for report in outbox.pending():
        assert outbox.deliver(store, report) == TaskStatus.failed
    for task_id, lines in zip(ids, [[], ["old line"]], strict=True):
        done = store.get_task(task_id)
        assert done.status == TaskStatus.failed and done.status_reason == "exit_code"
        assert done.runtime.exit_code == 2 and done.runtime.duration_s == 0.1
        assert [line.line for line in store.get_log(task_id)] == lines
    assert outbox.pending() == []


# ------------------------------------------------------------- daemon threads
def _daemon_on(sqlite_url: str, home: Path, worker_id: str) -> tuple[AgentDaemon, Backend]:
    backend = backend_from_url(sqlite_url)
    settings = ExecutionSettings(worker_id=worker_id, api_url=sqlite_url, home=home)
    return AgentDaemon(backend, settings, ["default"]), backend


def test_a_heartbeat_error_is_logged_in_one_line_and_heartbeats_go_on(
    sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[float] = []
    real = daemon_module.read_resources

    def failing_twice(home: Path) -> dict[str, object]:
        calls.append(time.monotonic())
        if len(calls) <= 2:
            raise RuntimeError("cannot read /proc")
        return real(home)

    monkeypatch.setattr(daemon_module, "read_resources", failing_twice)
    daemon, backend = _daemon_on(sqlite_url, tmp_path / "home", "chaos-heartbeat")
    runner = threading.Thread(target=daemon.run, name="daemon-under-test")
    with caplog.at_level(logging.WARNING, logger="agent"):
        runner.start()
        try:
            wait_until(lambda: any(w.resources for w in backend.list_workers()), 30,
                       "a heartbeat after the errors")
            assert runner.is_alive()
            [worker] = backend.list_workers()
            assert worker.id == "chaos-heartbeat" and worker.resources["cpu_count"] >= 1
        finally:
            daemon.request_stop()
            runner.join(30)
            backend.close()
    failures = [r.getMessage() for r in caplog.records if "heartbeat failed" in r.getMessage()]
    assert failures == ["heartbeat failed: RuntimeError: cannot read /proc"] * 2
    assert not runner.is_alive()


def test_a_daemon_thread_that_dies_stops_the_daemon_with_an_error(
    sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def dies(home: Path) -> dict[str, object]:
        raise KeyboardInterrupt  # not an Exception: nothing in the loop catches it

    monkeypatch.setattr(daemon_module, "read_resources", dies)
    daemon, backend = _daemon_on(sqlite_url, tmp_path / "home", "chaos-dies")
    errors: list[BaseException] = []

    def run() -> None:
        try:
            daemon.run()
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            errors.append(exc)

    runner = threading.Thread(target=run, name="daemon-under-test")
    runner.start()
    runner.join(30)
    backend.close()
    assert not runner.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], DaemonThreadDiedError), errors
    assert "heartbeat" in str(errors[0])
