"""Shared fixtures: a fresh store per test on SQLite, PostgreSQL and over HTTP (a server
on SQLite, and one on PostgreSQL).

PostgreSQL tests use `CONVEYOR_TEST_POSTGRES` (default postgresql://postgres@127.0.0.1:5432/test),
each test in its own schema. Without a reachable server they skip, except under CI=true,
where they fail: CI must exercise every backend.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.backend import Backend

POSTGRES_URL = os.environ.get(
    "CONVEYOR_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _need(reason: str) -> None:
    """Skip on a laptop without the service; fail under CI."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: this must not be skipped)")
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own CONVEYOR_HOME and no inherited API settings."""
    monkeypatch.setenv("CONVEYOR_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CONVEYOR_API", raising=False)
    monkeypatch.delenv("CONVEYOR_API_TOKEN", raising=False)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A fresh SQLite store file."""
    return f"sqlite:///{tmp_path / 'conveyor.db'}"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty schema in the test PostgreSQL database, dropped afterwards."""
    try:
        import psycopg

        admin = psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=3)
    except Exception as exc:  # noqa: BLE001 - any failure means: no usable server
        _need(f"PostgreSQL not reachable at {POSTGRES_URL}: {exc}")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in POSTGRES_URL else "?"
    try:
        yield f"{POSTGRES_URL}{sep}options=-csearch_path%3D{schema}"
    finally:
        admin.execute(f"DROP SCHEMA {schema} CASCADE")
        admin.close()


@pytest.fixture
def http_url(sqlite_url: str) -> Iterator[str]:
    """A real `controller serve` process on a loopback port, over a fresh SQLite store
    (forked from a process that imported the server already: see helpers_server)."""
    from tests.helpers_server import start_server, stop_server

    proc, base_url = start_server(sqlite_url, forked=True)
    try:
        yield base_url
    finally:
        stop_server(proc)


@pytest.fixture
def http_postgres_url(postgres_url: str) -> Iterator[str]:
    """A real `controller serve` process over a fresh PostgreSQL schema."""
    from tests.helpers_server import start_server, stop_server

    proc, base_url = start_server(postgres_url, forked=True)
    try:
        yield base_url
    finally:
        stop_server(proc)


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("postgres", marks=pytest.mark.postgres),
        "http",
        pytest.param("http_postgres", marks=pytest.mark.postgres),
    ]
)
def backend_url(request: pytest.FixtureRequest) -> str:
    """The URL of a fresh store, once per transport: SQLite, PostgreSQL, and the HTTP
    API server over each."""
    return request.getfixturevalue(f"{request.param}_url")


@pytest.fixture
def backend(backend_url: str) -> Iterator[Backend]:
    """A Backend on a fresh store, once per transport (the contract-test fixture)."""
    from controller.connect import backend_from_url

    client = backend_from_url(backend_url)
    try:
        yield client
    finally:
        client.close()
