"""A PostgreSQL server that accepts TCP but never answers: opening the store fails
within the connect timeout (10 s by default, `?connect_timeout=` in the URL), with a
BackendUnavailableError naming the URL without its password."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from controller.errors import BackendUnavailableError
from controller.store import SqlBackend
from controller.store.engine import POSTGRES_CONNECT_TIMEOUT_S


@pytest.fixture
def silent_server_port() -> Iterator[int]:
    """A loopback TCP server that accepts every connection and never sends a byte."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept_forever() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            accepted.append(conn)  # kept open, never answered

    thread = threading.Thread(target=accept_forever, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(2)
        for conn in accepted:
            conn.close()
        listener.close()


def _open_and_time(url: str) -> tuple[BackendUnavailableError, float]:
    started = time.monotonic()
    with pytest.raises(BackendUnavailableError) as caught:
        SqlBackend(url)
    return caught.value, time.monotonic() - started


def test_a_silent_server_fails_within_the_default_connect_timeout(silent_server_port: int) -> None:
    assert POSTGRES_CONNECT_TIMEOUT_S == 10
    url = f"postgresql://conveyor:s3cret-pw@127.0.0.1:{silent_server_port}/conveyor"
    error, elapsed_s = _open_and_time(url)
    assert POSTGRES_CONNECT_TIMEOUT_S - 1 <= elapsed_s <= POSTGRES_CONNECT_TIMEOUT_S + 1.5, elapsed_s
    assert f"127.0.0.1:{silent_server_port}/conveyor" in error.message
    assert "conveyor:***@" in error.message
    assert "s3cret-pw" not in error.message and "s3cret-pw" not in str(error)
    assert "timeout" in error.message


def test_connect_timeout_in_the_url_overrides_the_default(silent_server_port: int) -> None:
    url = f"postgresql://conveyor:s3cret-pw@127.0.0.1:{silent_server_port}/conveyor?connect_timeout=2"
    error, elapsed_s = _open_and_time(url)
    assert 1.5 <= elapsed_s <= 3.5, elapsed_s
    assert f"127.0.0.1:{silent_server_port}/conveyor" in error.message
    assert "s3cret-pw" not in error.message
