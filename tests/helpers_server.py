"""Start a real `python -m controller.server` process for tests, and stop it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

#: Seconds a server gets to answer /api/v1/health after it starts.
STARTUP_TIMEOUT_S = 30.0
REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _output_of(proc: subprocess.Popen) -> str:
    log = getattr(proc, "conveyor_log", None)
    if log is None:
        return ""
    log.flush()
    log.seek(0)
    return log.read().decode(errors="replace")[-4000:]


def start_server(
    db_url: str, token: str | None = None, *, extra_args: list[str] | None = None
) -> tuple[subprocess.Popen, str]:
    """Run the API server on a free loopback port over `db_url`; wait until it is healthy.

    Returns the process and its base URL (`http://127.0.0.1:<port>`). The server's output
    goes to a temporary file, shown in the error if it does not come up.
    """
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "controller.server",
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
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
    proc.conveyor_log = log  # type: ignore[attr-defined]
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


def stop_server(proc: subprocess.Popen) -> str:
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
    return output
