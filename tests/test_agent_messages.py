"""What a user reads about a task an agent ran: the failure message and the worker id.

Real `agent daemon` processes on the embedded store (and a `controller serve` process
on it), real steps; the fixtures are test_agent_e2e's.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from agent.daemon import default_worker_id
from agent.supervisor import LastExceptionLine
from controller.backend import Backend
from controller.connect import backend_from_url
from controller.models import TaskStatus
from tests import test_agent_e2e as e2e
from tests.test_agent_e2e import ROOT, Daemons, code_task, wait_for

# test_agent_e2e's fixtures: one CONVEYOR_HOME per module, daemons, the store or its server
agent_home, wheelhouse, api_url = e2e.agent_home, e2e.wheelhouse, e2e.api_url
backend, daemons = e2e.backend, e2e.daemons

FAILING_STEP = """
def parse(text):
    raise ValueError(f"bad input: {text!r}")

print("about to fail")
try:
    parse("x")
except ValueError as exc:
    raise RuntimeError("the step could not parse its input") from exc
"""


def test_a_failed_step_names_its_exception_in_the_status_message(
    backend: Backend, api_url: str, daemons: Daemons
) -> None:
    failing = code_task(backend, FAILING_STEP)
    plain = code_task(backend, "import sys\nprint('Traceback (most recent call last): on stdout')\nsys.exit(2)\n")
    daemons.start(api_url)
    failed = wait_for(backend, failing.id, "completed", "failed")
    assert (failed.status, failed.status_reason) == (TaskStatus.failed, "exit_code")
    assert failed.status_message == "exited with code 1: RuntimeError: the step could not parse its input"
    quiet = wait_for(backend, plain.id, "completed", "failed")
    assert quiet.status_message == "exited with code 2"  # no traceback on stderr: nothing added


def test_the_exception_line_is_the_last_one_of_the_last_traceback() -> None:
    seen = LastExceptionLine()
    lines = [
        ("stderr", "Traceback (most recent call last):"),
        ("stderr", '  File "step.py", line 3, in <module>'),
        ("stderr", "    parse('x')"),
        ("stderr", "KeyError: 'x'"),
        ("stdout", "Traceback (most recent call last):"),
        ("stdout", "NotThis: printed"),
        ("stderr", "warning: retrying"),
    ]
    seen.feed([{"stream": stream, "line": line} for stream, line in lines])
    assert seen.line == "KeyError: 'x'"
    seen.feed([{"stream": "stderr", "line": "Traceback (most recent call last):"},
               {"stream": "stderr", "line": "    ^^^^"},
               {"stream": "stderr", "line": "mypkg.errors.BadInput: row 7"}])
    assert seen.line == "mypkg.errors.BadInput: row 7"


# ------------------------------------------------------------------- worker ids
def _start_daemon(api_url: str, home: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "daemon", "--queue", "default", "--foreground",
         "--api", api_url, "--create-queue"],
        env={**os.environ, "CONVEYOR_HOME": str(home)}, cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=open(log, "ab"),  # noqa: SIM115
    )


def _worker_ids(backend: Backend, count: int, timeout_s: float = 30) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while True:
        ids = sorted(w.id for w in backend.list_workers())
        if len(ids) == count:
            return ids
        assert time.monotonic() < deadline, f"expected {count} workers, see {ids}"
        time.sleep(0.1)


def test_agents_of_two_homes_on_one_host_get_distinct_ids_kept_across_restarts(
    backend: Backend, api_url: str, tmp_path: Path
) -> None:
    homes = [tmp_path / "home-a", tmp_path / "home-b"]
    procs = [_start_daemon(api_url, home, tmp_path / "agents.log") for home in homes]
    try:
        first, second = _worker_ids(backend, 2)
        host = socket.gethostname()
        assert first != second and first.startswith(f"{host}:") and second.startswith(f"{host}:")
        numbers = [(home / "worker-number").read_text().strip() for home in homes]
        assert {f"{host}:{n}" for n in numbers} == {first, second}
        procs[0].send_signal(signal.SIGTERM)
        procs[0].wait(60)
        assert _worker_ids(backend, 1) == [f"{host}:{numbers[1]}"]
        procs[0] = _start_daemon(api_url, homes[0], tmp_path / "agents.log")
        assert _worker_ids(backend, 2) == sorted([first, second])  # the restarted one kept its id
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


# ------------------------------------------------------------------- venv builds
def test_a_venv_build_reports_what_it_installs_in_the_task_log_and_the_agent_log(
    backend: Backend, sqlite_url: str, wheelhouse: Path, tmp_path: Path
) -> None:
    (tmp_path / "logs").mkdir()
    fresh = Daemons(tmp_path / "fresh-home", wheelhouse, tmp_path / "logs")  # nothing cached yet
    store = backend_from_url(sqlite_url)
    try:
        code = "import tinypkg\nprint(tinypkg.VALUE)\n"
        first = code_task(store, code, packages=["tinypkg==1.0"])
        fresh.start(sqlite_url)
        assert wait_for(store, first.id, "completed", "failed").status == TaskStatus.completed
        assert "building venv: tinypkg==1.0 (uv)" in e2e.log_text(store, first.id)
        second = code_task(store, code, packages=["tinypkg==1.0"])
        assert wait_for(store, second.id, "completed", "failed").status == TaskStatus.completed
        assert "building venv" not in e2e.log_text(store, second.id)  # a cache hit builds nothing
        assert fresh.output().count("building venv: tinypkg==1.0 (uv)") == 1
    finally:
        fresh.stop_all()
        store.close()


def test_two_daemons_of_one_home_starting_together_get_different_ids(tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    first = default_worker_id(tmp_path / "home", registry)
    second = default_worker_id(tmp_path / "home", registry)  # the first has not registered yet
    assert second == f"{first}.1"
    assert default_worker_id(tmp_path / "other-home", registry) != first.split(".")[0]
