"""What a user of `HttpBackend` (and of the `controller` CLI over HTTP) sees when the
API cannot be used: an unreachable server, a missing or wrong token, a malformed
`CONVEYOR_API`; and how the client waits: long polls outlast `timeout_s`, a request the
server received is never sent twice. Real server processes, real sockets on loopback.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.client import HttpBackend
from controller.errors import AuthError, BackendUnavailableError, ConveyorError
from tests.helpers_server import free_port, start_server, stop_server

TOKEN = "s3cret-token"
CLI_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server that requires TOKEN."""
    proc, url = start_server(f"sqlite:///{tmp_path_factory.mktemp('tok')}/c.db", token=TOKEN)
    yield url
    stop_server(proc)


def cli_error(home: Path, *args: str, **env_vars: str) -> str:
    """Run `controller ARGS`, which must fail with one `error:` line; return that line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env.update(CONVEYOR_HOME=str(home), **env_vars)
    proc = subprocess.run(
        [sys.executable, "-m", "controller.cli", *args],
        capture_output=True, text=True, env=env, timeout=CLI_TIMEOUT_S,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


# --------------------------------------------------------------- unreachable
def test_unreachable_server_names_the_url_and_conveyor_api(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(BackendUnavailableError) as err:
        HttpBackend(url, retries=1, backoff_s=0.01).list_queues()
    message = str(err.value)
    assert message.startswith(f"cannot reach the Conveyor API at {url}: Connection refused")
    assert "tried 2 times" in message and "CONVEYOR_API" in message and "\n" not in message
    line = cli_error(tmp_path, "queues", CONVEYOR_API=url)
    assert url in line and "CONVEYOR_API" in line and "refused" in line


def test_unknown_host_says_the_name_was_not_found() -> None:
    with pytest.raises(BackendUnavailableError) as err:
        HttpBackend("http://no-such-host.invalid:8008", retries=0).list_queues()
    assert "http://no-such-host.invalid:8008" in str(err.value)
    assert "host name not found" in str(err.value)


# --------------------------------------------------------------------- token
def test_missing_token_names_conveyor_api_token(token_server: str, tmp_path: Path) -> None:
    with pytest.raises(AuthError) as err:
        HttpBackend(token_server).list_queues()
    message = str(err.value)
    assert token_server in message and "needs an API token" in message
    assert "CONVEYOR_API_TOKEN" in message and "Authorization" not in message
    line = cli_error(tmp_path, "queues", CONVEYOR_API=token_server)
    assert "CONVEYOR_API_TOKEN" in line and "Authorization" not in line


def test_wrong_token_names_conveyor_api_token(token_server: str, tmp_path: Path) -> None:
    with pytest.raises(AuthError) as err:
        HttpBackend(token_server, token="wrong").create_task({"name": "x"})
    message = str(err.value)
    assert "refused the API token" in message and "CONVEYOR_API_TOKEN" in message
    assert "Authorization" not in message
    line = cli_error(tmp_path, "queues", CONVEYOR_API=token_server, CONVEYOR_API_TOKEN="wrong")
    assert "refused the API token" in line and "CONVEYOR_API_TOKEN" in line
    assert HttpBackend(token_server, token=TOKEN).list_queues() is not None


# ------------------------------------------------------------- malformed URL
MALFORMED_URLS = [
    "http://127.0.0.1:abc", "http://127.0.0.1:99999", "http://[::1", "http://", "http://exa mple:80",
]


@pytest.mark.parametrize("bad_url", MALFORMED_URLS)
def test_malformed_api_url_is_refused_naming_it(bad_url: str) -> None:
    with pytest.raises(ConveyorError) as err:
        HttpBackend(bad_url)
    assert repr(bad_url) in str(err.value) and "CONVEYOR_API" in str(err.value)
    if bad_url.endswith(":abc"):
        assert "the port 'abc' is not a number" in str(err.value)


@pytest.mark.parametrize(
    "bad_url", MALFORMED_URLS)
def test_malformed_conveyor_api_is_one_cli_error_naming_it(bad_url: str, tmp_path: Path) -> None:
    line = cli_error(tmp_path, "queues", CONVEYOR_API=bad_url)
    assert repr(bad_url) in line


# ---------------------------------------------------------------- timeouts
def test_long_poll_outlasts_the_ordinary_timeout(tmp_path: Path) -> None:
    proc, url = start_server(f"sqlite:///{tmp_path}/c.db")
    try:
        backend = HttpBackend(url, timeout_s=1.0)
        started = time.monotonic()
        assert backend.claim(["default"], "w-long", wait_s=2.0) is None
        assert time.monotonic() - started >= 1.9
        task = backend.create_task({"name": "waited"})
        assert backend.wait_for_status_change({task.id: "created"}, wait_s=1.5) == []
        backend.close()
    finally:
        stop_server(proc)


def test_a_request_that_got_no_answer_is_not_sent_again() -> None:
    """A server that reads requests and never answers: one request, one timeout error."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    received: list[bytes] = []
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        held = []
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            held.append(conn)
            conn.settimeout(2)
            try:
                received.append(conn.recv(65536))
            except TimeoutError:
                pass
        for conn in held:
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        backend = HttpBackend(f"http://127.0.0.1:{port}", timeout_s=0.5, retries=3)
        with pytest.raises(BackendUnavailableError, match=r"no answer within 0\.5s"):
            backend.set_status("t1", "completed", worker_id="w")
        time.sleep(0.3)
        assert len(received) == 1 and received[0].startswith(b"POST /api/v1/tasks/t1/status ")
    finally:
        stop.set()
        thread.join(5)
        listener.close()
