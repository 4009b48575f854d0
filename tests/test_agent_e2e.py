"""The agent daemon end to end: real daemons, real git repos, real venvs, real signals.

Each test runs against the embedded store and (where marked) a `controller serve`
process. Daemons share one CONVEYOR_HOME per module so the venv cache is built once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from controller.backend import Backend
from controller.connect import backend_from_url
from controller.models import TaskRecord, TaskStatus
from tests.test_agent_venv import make_wheel

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def agent_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One CONVEYOR_HOME (venv and git caches) for every daemon of this module."""
    return tmp_path_factory.mktemp("agent-home")


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("wheels")
    make_wheel(path, "tinypkg", "1.0", "VALUE = 'tiny 1.0'\n")
    return path


@pytest.fixture(params=["sqlite", "http"])
def api_url(request: pytest.FixtureRequest) -> str:
    """The embedded store, or a `controller serve` process on it."""
    return request.getfixturevalue(f"{request.param}_url")


@pytest.fixture
def backend(api_url: str) -> Iterator[Backend]:
    client = backend_from_url(api_url)
    yield client
    client.close()


class Daemons:
    """Starts `agent daemon` processes and makes sure none outlives the test."""

    def __init__(self, home: Path, wheelhouse: Path, log_dir: Path) -> None:
        self.home = home
        self.wheelhouse = wheelhouse
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, api_url: str, *args: str, queue: str = "default") -> subprocess.Popen[bytes]:
        env = {
            **os.environ,
            "CONVEYOR_HOME": str(self.home),
            "CONVEYOR_PIP_ARGS": f"--no-index --find-links {self.wheelhouse}",
        }
        log_file = open(self.log_dir / f"agent-{len(self.procs)}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "daemon", "--queue", queue, "--foreground",
             "--api", api_url, "--stop-grace", "2", *args],
            env=env, stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT,
        )
        self.procs.append(proc)
        return proc

    def output(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.log_dir.glob("agent-*.log")))

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


@pytest.fixture
def daemons(agent_home: Path, wheelhouse: Path, tmp_path: Path) -> Iterator[Daemons]:
    log_dir = tmp_path / "daemon-logs"
    log_dir.mkdir()
    started = Daemons(agent_home, wheelhouse, log_dir)
    yield started
    started.stop_all()


def wait_for(backend: Backend, task_id: str, *statuses: str, timeout: float = 60) -> TaskRecord:
    """Poll until the task reaches one of `statuses`."""
    deadline = time.monotonic() + timeout
    while True:
        task = backend.get_task(task_id)
        if task.status.value in statuses:
            return task
        if time.monotonic() > deadline:
            log = "\n".join(line.line for line in backend.get_log(task_id))
            raise AssertionError(f"task still {task.status.value} after {timeout} s; log:\n{log}")
        time.sleep(0.05)


def wait_for_line(backend: Backend, task_id: str, text: str, timeout: float = 60) -> None:
    """Poll the task log until a line contains `text`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(text in line.line for line in backend.get_log(task_id)):
            return
        time.sleep(0.05)
    raise AssertionError(f"no log line with {text!r} after {timeout} s")


def log_text(backend: Backend, task_id: str) -> str:
    return "\n".join(line.line for line in backend.get_log(task_id))


def code_task(backend: Backend, code: str, **spec: object) -> TaskRecord:
    task = backend.create_task({"name": "step", "script": {"code": code, "entry_point": "step.py"}, **spec})
    backend.enqueue(task.id)
    return task


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True,
        env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e",
             "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@e"},
    ).stdout.strip()


TREE_STEP = """
import os, subprocess, sys, time
pids = os.environ["PIDS_FILE"]
child = subprocess.Popen([sys.executable, "-c",
    "import subprocess, sys, time, os\\n"
    "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\\n"
    "open(os.environ['PIDS_FILE'], 'a').write(f'{os.getpid()}\\\\n{g.pid}\\\\n')\\n"
    "time.sleep(300)"])
with open(pids, "a") as f:
    f.write(f"{os.getpid()}\\n")
print("tree started", flush=True)
time.sleep(300)
"""


def read_pids(path: Path, count: int, timeout: float = 20) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            pids = [int(x) for x in path.read_text().split()]
            if len(pids) >= count:
                return pids
        time.sleep(0.05)
    raise AssertionError(f"the step did not record {count} pids")


def assert_all_gone(pids: list[int], timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    alive = pids
    while time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return
        time.sleep(0.1)
    raise AssertionError(f"processes still running: {alive}")


# -------------------------------------------------------------------------- tests
def test_a_task_pinned_to_a_commit_runs_that_commit(
    backend: Backend, api_url: str, daemons: Daemons, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "main.py").write_text("print('version one')\n")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "one")
    first = git(repo, "rev-parse", "HEAD")
    git(repo, "checkout", "-qb", "dev")
    (repo / "main.py").write_text("print('dev version')\n")
    git(repo, "commit", "-qam", "dev")
    git(repo, "checkout", "-q", "main")
    (repo / "main.py").write_text("print('version two')\n")
    git(repo, "commit", "-qam", "two")

    pinned = backend.create_task({"name": "pinned", "script": {
        "repository": str(repo), "branch": "main", "commit": first, "entry_point": "main.py"}})
    tip = backend.create_task({"name": "tip", "script": {
        "repository": str(repo), "branch": "dev", "entry_point": "main.py"}})
    backend.enqueue(pinned.id)
    backend.enqueue(tip.id)
    daemons.start(api_url)
    done = wait_for(backend, pinned.id, "completed", "failed")
    assert done.status == TaskStatus.completed, log_text(backend, pinned.id)
    assert "version one" in log_text(backend, pinned.id)
    assert done.runtime.commit_used == first
    assert wait_for(backend, tip.id, "completed", "failed").status == TaskStatus.completed
    assert "dev version" in log_text(backend, tip.id)


def test_a_bad_ref_fails_the_task_naming_repo_and_ref(
    backend: Backend, api_url: str, daemons: Daemons, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "main.py").write_text("print(1)\n")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "one")
    task = backend.create_task({"name": "bad", "script": {
        "repository": str(repo), "branch": "no-such-branch", "entry_point": "main.py"}})
    backend.enqueue(task.id)
    daemons.start(api_url)
    failed = wait_for(backend, task.id, "completed", "failed")
    assert failed.status == TaskStatus.failed and failed.status_reason == "setup_failed"
    assert "no-such-branch" in failed.status_message and str(repo) in failed.status_message


def test_task_packages_are_installed_and_the_venv_is_reused(
    backend: Backend, api_url: str, daemons: Daemons
) -> None:
    code = "import tinypkg\nfrom controller import models\nprint('value:', tinypkg.VALUE)\n"
    first = code_task(backend, code, packages=["tinypkg==1.0"])
    daemons.start(api_url)
    assert wait_for(backend, first.id, "completed", "failed").status == TaskStatus.completed, log_text(backend, first.id)
    assert "value: tiny 1.0" in log_text(backend, first.id)
    second = code_task(backend, code, packages=["tinypkg==1.0"])
    assert wait_for(backend, second.id, "completed", "failed").status == TaskStatus.completed
    assert "(cached:" in log_text(backend, second.id)


def test_outcomes_map_to_statuses_with_precise_reasons(
    backend: Backend, api_url: str, daemons: Daemons
) -> None:
    exits = code_task(backend, "import sys\nprint('bye')\nsys.exit(3)\n")
    killed = code_task(backend, "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    daemons.start(api_url)
    failed = wait_for(backend, exits.id, "completed", "failed")
    assert (failed.status, failed.status_reason, failed.runtime.exit_code) == (TaskStatus.failed, "exit_code", 3)
    assert "3" in failed.status_message
    signalled = wait_for(backend, killed.id, "completed", "failed")
    assert signalled.status == TaskStatus.failed and signalled.status_reason == "signal"
    assert "SIGKILL" in signalled.status_message


def test_output_streams_while_the_step_runs(backend: Backend, api_url: str, daemons: Daemons) -> None:
    task = code_task(backend, "import time\nprint('early line')\ntime.sleep(30)\n")
    daemons.start(api_url)
    wait_for(backend, task.id, "in_progress")
    wait_for_line(backend, task.id, "early line", timeout=30)
    assert backend.get_task(task.id).status == TaskStatus.in_progress
    backend.abort_task(task.id)
    wait_for(backend, task.id, "stopped")


def test_time_limit_stops_the_whole_process_tree(
    backend: Backend, api_url: str, daemons: Daemons, tmp_path: Path
) -> None:
    pids_file = tmp_path / "pids"
    task = code_task(
        backend, TREE_STEP,
        execution={"time_limit_s": 2},
        hyperparams={"Environment": {"PIDS_FILE": str(pids_file)}},
    )
    daemons.start(api_url)
    wait_for_line(backend, task.id, "tree started")
    started = time.monotonic()
    pids = read_pids(pids_file, 3)
    stopped = wait_for(backend, task.id, "stopped", "failed", "completed", timeout=30)
    assert time.monotonic() - started <= 2 + 2 + 1 + 1  # limit + grace + 1 s (+ polling slack)
    assert stopped.status == TaskStatus.stopped and stopped.status_reason == "time_limit"
    assert "time limit" in stopped.status_message and "2" in stopped.status_message
    assert_all_gone(pids)


def test_abort_from_the_api_is_noticed_within_a_second(
    backend: Backend, api_url: str, daemons: Daemons, tmp_path: Path
) -> None:
    pids_file = tmp_path / "pids"
    task = code_task(backend, TREE_STEP, hyperparams={"Environment": {"PIDS_FILE": str(pids_file)}})
    daemons.start(api_url)
    wait_for_line(backend, task.id, "tree started")
    pids = read_pids(pids_file, 3)
    backend.abort_task(task.id)
    aborted_at = time.monotonic()
    stopped = wait_for(backend, task.id, "stopped", "failed", "completed", timeout=30)
    assert stopped.status == TaskStatus.stopped and stopped.status_reason == "aborted"
    assert time.monotonic() - aborted_at < 1 + 2 + 1  # noticed ≤ 1 s, + SIGTERM grace
    assert_all_gone(pids)


def test_sigterm_lets_the_step_finish_then_the_daemon_exits(
    backend: Backend, api_url: str, daemons: Daemons
) -> None:
    task = code_task(backend, "import time\nprint('working', flush=True)\ntime.sleep(2)\nprint('finished')\n")
    daemon = daemons.start(api_url, "--shutdown-grace", "20")
    wait_for_line(backend, task.id, "working")
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(30) == 0
    done = backend.get_task(task.id)
    assert done.status == TaskStatus.completed and "finished" in log_text(backend, task.id)
    assert backend.list_workers() == []


def test_sigterm_stops_a_step_after_the_shutdown_grace(
    backend: Backend, api_url: str, daemons: Daemons, tmp_path: Path
) -> None:
    pids_file = tmp_path / "pids"
    task = code_task(backend, TREE_STEP, hyperparams={"Environment": {"PIDS_FILE": str(pids_file)}})
    daemon = daemons.start(api_url, "--shutdown-grace", "1")
    wait_for_line(backend, task.id, "tree started")
    pids = read_pids(pids_file, 3)
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(30) == 0
    stopped = backend.get_task(task.id)
    assert stopped.status == TaskStatus.stopped and stopped.status_reason == "agent_shutdown"
    assert_all_gone(pids)


def test_sigkill_of_the_daemon_kills_the_step_and_the_lease_fails_the_task(
    backend: Backend, api_url: str, daemons: Daemons, tmp_path: Path
) -> None:
    pids_file = tmp_path / "pids"
    task = code_task(backend, TREE_STEP, hyperparams={"Environment": {"PIDS_FILE": str(pids_file)}})
    daemon = daemons.start(api_url, "--lease", "2")
    wait_for_line(backend, task.id, "tree started")
    pids = read_pids(pids_file, 3)
    worker = backend.get_task(task.id).runtime.worker
    daemon.kill()
    daemon.wait(10)
    assert_all_gone(pids)
    time.sleep(2.5)
    backend.expire_leases()  # the server sweeps on its own; the embedded store on claims
    failed = wait_for(backend, task.id, "failed", timeout=10)
    assert failed.status_reason == "lease_expired" and worker in failed.status_message


def test_two_daemons_run_each_of_100_tasks_exactly_once(
    backend: Backend, api_url: str, daemons: Daemons
) -> None:
    code = "import os, time\nprint('ran', os.environ['CONVEYOR_TASK_ID'])\ntime.sleep(0.05)\n"
    daemons.start(api_url, "--concurrency", "2")
    daemons.start(api_url, "--concurrency", "2")
    deadline = time.monotonic() + 60
    while len(backend.list_workers()) < 2:  # both wait for work before any arrives
        assert time.monotonic() < deadline, "the daemons did not register"
        time.sleep(0.1)
    tasks = [code_task(backend, code) for _ in range(100)]
    workers = set()
    for task in tasks:
        done = wait_for(backend, task.id, "completed", "failed", timeout=120)
        assert done.status == TaskStatus.completed, log_text(backend, task.id)
        assert done.runtime.attempt == 1
        assert log_text(backend, task.id).count(f"ran {task.id}") == 1
        workers.add(done.runtime.worker)
    assert len(workers) == 2


def test_agent_execute_runs_one_task_in_the_foreground(
    backend: Backend, api_url: str, agent_home: Path, wheelhouse: Path
) -> None:
    code = "import sys\nprint('executed')\nprint('a warning', file=sys.stderr)\n"
    task = backend.create_task({"name": "one", "script": {"code": code, "entry_point": "one.py"}})
    result = subprocess.run(
        [sys.executable, "-m", "agent.cli", "execute", "--id", task.id, "--api", api_url],
        env={**os.environ, "CONVEYOR_HOME": str(agent_home)}, capture_output=True, text=True,
        timeout=120, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    # The step's output on the terminal as it runs (stdout, then the final line), its
    # stderr and the agent's own lines on stderr; all of it in the task log too.
    assert result.stdout.splitlines() == ["executed", f"task {task.id}: completed (exited with code 0)"]
    assert "a warning" in result.stderr.splitlines()
    assert "[agent] worker" in result.stderr and "[agent] running: " in result.stderr
    assert "executed" in log_text(backend, task.id) and "a warning" in log_text(backend, task.id)

    quiet = backend.clone_task(task.id)
    result = subprocess.run(
        [sys.executable, "-m", "agent.cli", "execute", "--id", quiet.id, "--api", api_url, "--no-output"],
        env={**os.environ, "CONVEYOR_HOME": str(agent_home)}, capture_output=True, text=True,
        timeout=120, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"task {quiet.id}: completed (exited with code 0)"]
    assert "executed" in log_text(backend, quiet.id)


def test_daemon_refuses_an_unknown_queue_with_a_clear_error(api_url: str, agent_home: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "agent.cli", "daemon", "--queue", "nosuch", "--api", api_url],
        env={**os.environ, "CONVEYOR_HOME": str(agent_home)}, capture_output=True, text=True,
        timeout=60, cwd=ROOT,
    )
    assert result.returncode == 1
    assert "nosuch" in result.stderr and "Traceback" not in result.stderr


def test_a_module_entry_point_with_the_repo_requirements(
    backend: Backend, api_url: str, daemons: Daemons, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    (repo / "app").mkdir(parents=True)
    git(repo, "init", "-q", "-b", "main")
    (repo / "requirements.txt").write_text("tinypkg==1.0\n")
    (repo / "app" / "__init__.py").write_text("")
    (repo / "app" / "main.py").write_text(
        "import sys, tinypkg\nprint('module run with', sys.argv[1:], tinypkg.VALUE)\n"
    )
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "app")
    task = backend.create_task({"name": "module", "script": {
        "repository": str(repo), "branch": "main", "entry_point": "-m app.main --epochs 2"}})
    backend.enqueue(task.id)
    daemons.start(api_url)
    done = wait_for(backend, task.id, "completed", "failed")
    assert done.status == TaskStatus.completed, log_text(backend, task.id)
    assert "module run with ['--epochs', '2'] tiny 1.0" in log_text(backend, task.id)


def test_a_second_sigterm_stops_running_steps_at_once(
    backend: Backend, api_url: str, daemons: Daemons, tmp_path: Path
) -> None:
    pids_file = tmp_path / "pids"
    task = code_task(backend, TREE_STEP, hyperparams={"Environment": {"PIDS_FILE": str(pids_file)}})
    daemon = daemons.start(api_url, "--shutdown-grace", "300")
    wait_for_line(backend, task.id, "tree started")
    pids = read_pids(pids_file, 3)
    daemon.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(30) == 0  # far less than the 300 s grace
    stopped = backend.get_task(task.id)
    assert stopped.status == TaskStatus.stopped and stopped.status_reason == "agent_shutdown"
    assert_all_gone(pids)


def test_agent_stop_says_which_tasks_it_waits_for_and_the_grace_left(
    backend: Backend, api_url: str, tmp_path: Path
) -> None:
    home = tmp_path / "home-stop"
    env = {**os.environ, "CONVEYOR_HOME": str(home)}

    def agent(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "agent.cli", *args], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=120)

    started = agent("daemon", "--queue", "default", "--detached", "--api", api_url,
                    "--worker-id", "box:8", "--shutdown-grace", "8")
    assert started.returncode == 0, started.stderr
    try:
        task = code_task(backend, "import time\nprint('long step', flush=True)\ntime.sleep(120)\n")
        wait_for_line(backend, task.id, "long step")
        stopped = agent("stop", "box:8")
        assert stopped.returncode == 0, stopped.stderr
        assert stopped.stdout.strip() == "agent box:8 stopped"
        lines = stopped.stderr.splitlines()
        assert lines[0].startswith("stopping agent box:8 (pid ")
        assert f"waiting for 1 running task(s): {task.id} (step); " in lines[1]
        assert lines[1].endswith("s of shutdown grace left, then they are stopped"), lines
        ended = backend.get_task(task.id)
        assert (ended.status, ended.status_reason) == (TaskStatus.stopped, "agent_shutdown")
    finally:
        agent("stop", "box:8", "--now", "--timeout", "10")


def test_a_detached_daemon_is_listed_and_stopped_with_agent_stop(
    backend: Backend, api_url: str, tmp_path: Path
) -> None:
    home = tmp_path / "home-detached"
    env = {**os.environ, "CONVEYOR_HOME": str(home)}

    def agent(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "agent.cli", *args], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=120)

    started = agent("daemon", "--queue", "default", "--detached", "--api", api_url, "--worker-id", "box:7")
    assert started.returncode == 0, started.stderr
    try:
        deadline = time.monotonic() + 20
        while not any(w.id == "box:7" for w in backend.list_workers()):
            assert time.monotonic() < deadline, "the detached daemon never registered"
            time.sleep(0.1)
        listed = agent("list")
        assert "box:7" in listed.stdout
        task = code_task(backend, "print('from the detached agent')\n")
        assert wait_for(backend, task.id, "completed", "failed").status == TaskStatus.completed
        stopped = agent("stop", "box:7")
        assert stopped.returncode == 0, stopped.stderr
        assert "stopped" in stopped.stdout
        assert backend.list_workers() == []
        assert "no agent daemons running" in agent("list").stdout
    finally:
        agent("stop", "box:7", "--now", "--timeout", "10")
