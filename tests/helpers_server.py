"""Start a real `python -m controller.server` process for tests, and stop it.

`start_server(..., forked=True)` starts the same server by forking it from a process that
has imported it already (`multiprocessing`'s forkserver): about a tenth of the CPU of a
new interpreter, for fixtures that start one server per test (the contract suite).
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import requests

#: Seconds a server gets to answer /api/v1/health after it starts.
STARTUP_TIMEOUT_S = 30.0
REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


#: What the forkserver imports once, so that forked servers start without importing.
FORKSERVER_PRELOAD = ["controller.server.app", "controller.server.__main__", "controller.store"]


def _serve_forked(argv: list[str], env: dict[str, str], log_path: str) -> None:
    """The forked server process: the environment and output of a subprocess, then main."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(REPO_ROOT)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    from controller.server.__main__ import main

    sys.exit(main(argv))


class ForkedServer:
    """A server process forked by the forkserver, with the parts of `subprocess.Popen`
    that `stop_server` and `start_server` use."""

    def __init__(self, process: Any, log: IO[bytes], log_path: str) -> None:
        self.process = process
        self.conveyor_log = log
        self.log_path = log_path

    @property
    def returncode(self) -> int | None:
        """The exit code, or None while it runs."""
        return self.process.exitcode

    def poll(self) -> int | None:
        """The exit code, or None while it runs."""
        return None if self.process.is_alive() else self.process.exitcode

    def terminate(self) -> None:
        """SIGTERM."""
        self.process.terminate()

    def kill(self) -> None:
        """SIGKILL."""
        self.process.kill()

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the exit; subprocess.TimeoutExpired after `timeout` seconds."""
        self.process.join(timeout)
        if self.process.is_alive():
            raise subprocess.TimeoutExpired("forked controller.server", timeout or 0)
        return self.process.exitcode


def _fork_server(argv: list[str], env: dict[str, str]) -> ForkedServer:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(FORKSERVER_PRELOAD)
    fd, log_path = tempfile.mkstemp(prefix="conveyor-server-", suffix=".log")
    os.close(fd)
    log = open(log_path, "rb")  # noqa: SIM115 - closed by stop_server
    process = ctx.Process(target=_serve_forked, args=(argv, env, log_path), daemon=False)
    process.start()
    return ForkedServer(process, log, log_path)


def _output_of(proc: subprocess.Popen | ForkedServer) -> str:
    log = getattr(proc, "conveyor_log", None)
    if log is None:
        return ""
    log.flush()
    log.seek(0)
    return log.read().decode(errors="replace")[-4000:]


def start_server(
    db_url: str,
    token: str | None = None,
    *,
    extra_args: list[str] | None = None,
    forked: bool = False,
) -> tuple[Any, str]:
    """Run the API server on a free loopback port over `db_url`; wait until it is healthy.

    Returns the process (a `subprocess.Popen`, or with `forked` a `ForkedServer`) and its
    base URL (`http://127.0.0.1:<port>`). The server's output goes to a temporary file,
    shown in the error if it does not come up.
    """
    port = free_port()
    argv = [
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--db",
        db_url,
        *(["--token", token] if token else []),
        *(extra_args or []),
    ]
    env = dict(os.environ)
    env.pop("CONVEYOR_API_TOKEN", None)  # the token is only what the caller says
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    proc: Any
    if forked:
        proc = _fork_server(argv, env)
        log = proc.conveyor_log
    else:
        log = tempfile.TemporaryFile()
        cmd = [sys.executable, "-m", "controller.server", *argv]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
        proc.conveyor_log = log
    base_url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            output = _output_of(proc)
            log.close()
            raise RuntimeError(f"API server exited with code {proc.returncode}:\n{output}")
        try:
            if requests.get(f"{base_url}/api/v1/health", headers=headers, timeout=1).ok:
                return proc, base_url
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            stop_server(proc)
            raise RuntimeError(f"API server did not answer within {STARTUP_TIMEOUT_S:.0f}s")
        time.sleep(0.05)


def stop_server(proc: subprocess.Popen | ForkedServer) -> str:
    """Stop a server from `start_server` (SIGTERM, then SIGKILL); returns its output."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    output = _output_of(proc)
    log = getattr(proc, "conveyor_log", None)
    if log is not None:
        log.close()
    if isinstance(proc, ForkedServer):
        Path(proc.log_path).unlink(missing_ok=True)
    return output
