"""Real processes for the fault-injection tests: agents, `controller serve` and pipeline
scripts started as subprocesses that a test may kill -9, each with its output in a log
file that failures show. None outlives the test (`processes` fixture)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import requests

from tests.helpers_server import REPO_ROOT, STARTUP_TIMEOUT_S

#: Characters of each process's log shown in a failure message.
LOG_TAIL_CHARS = 4000


class Processes:
    """Agents, servers and pipeline processes a test starts; none outlives it."""

    def __init__(self, home: Path, log_dir: Path) -> None:
        self.home = home
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, argv: list[str], api_url: str | None = None) -> subprocess.Popen[bytes]:
        """Start `argv` from the repository root with this test's CONVEYOR_HOME (and
        CONVEYOR_API = `api_url` if given); its output goes to `<log_dir>/NN-<name>.log`."""
        env = {**os.environ, "CONVEYOR_HOME": str(self.home)}
        env.pop("CONVEYOR_API_TOKEN", None)
        if api_url:
            env["CONVEYOR_API"] = api_url
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        log_file = open(self.log_dir / f"{len(self.procs):02d}-{name}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(argv, env=env, stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
        self.procs.append(proc)
        return proc

    def agent(self, api_url: str, worker_id: str, *args: str, queue: str = "default") -> subprocess.Popen[bytes]:
        """An `agent daemon` on one queue with an explicit worker id."""
        return self.start(f"agent-{worker_id}", [
            sys.executable, "-m", "agent.cli", "daemon", "--queue", queue, "--foreground",
            "--api", api_url, "--worker-id", worker_id, "--stop-grace", "2", *args])

    def server(self, db_url: str, port: int) -> subprocess.Popen[bytes]:
        """`controller serve` on a fixed loopback port (so clients reconnect to it), once healthy."""
        proc = self.start("server", [
            sys.executable, "-m", "controller.cli", "serve", "--host", "127.0.0.1",
            "--port", str(port), "--db", db_url])
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            assert proc.poll() is None, f"the server exited:\n{self.output()}"
            try:
                if requests.get(f"http://127.0.0.1:{port}/api/v1/health", timeout=1).ok:
                    return proc
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, f"the server did not come up:\n{self.output()}"
            time.sleep(0.05)

    def output(self) -> str:
        """The tail of every process's log, for failure messages."""
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-LOG_TAIL_CHARS:]}"
                         for p in sorted(self.log_dir.glob("*.log")))

    def stop_all(self) -> None:
        """SIGKILL and reap every process still running."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)

    def wait_until(self, condition: Callable[[], object], timeout_s: float, what: str) -> None:
        """Poll `condition` until it is true; fail after `timeout_s` showing the logs."""
        wait_until(condition, timeout_s, what, shown=self.output)


def wait_until(
    condition: Callable[[], object], timeout_s: float, what: str, shown: Callable[[], str] = str
) -> None:
    """Poll `condition` every 50 ms until it is true; fail after `timeout_s` naming `what`
    (and showing `shown()`, e.g. the processes' logs)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{shown()}"
        time.sleep(0.05)


def kill9(proc: subprocess.Popen[bytes]) -> float:
    """SIGKILL and reap; returns when (time.time()) it was killed."""
    proc.send_signal(signal.SIGKILL)
    killed_at = time.time()
    proc.wait(10)
    return killed_at


def started_processes(home: Path, tmp_path: Path) -> Iterator[Processes]:
    """For a test module's `processes` fixture: the test's processes, with `home` as
    CONVEYOR_HOME and logs under `tmp_path/logs`; all killed when the test ends."""
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    started = Processes(home, log_dir)
    yield started
    started.stop_all()
