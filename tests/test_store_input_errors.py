"""The store's own answers, without the HTTP server in front (the SDK on an embedded
store): text a database cannot store is InvalidInputError naming the field on SQLite
and PostgreSQL alike; a raw database error never leaves the store; a damaged row is a
server-side error, not the caller's fault."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import requests
import sqlalchemy as sa

from controller.errors import BackendUnavailableError, ConveyorError, InvalidInputError
from controller.store import SqlBackend
from tests.helpers_server import start_server, stop_server


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'conveyor.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def store(store_url: str) -> Iterator[SqlBackend]:
    backend = SqlBackend(store_url)
    yield backend
    backend.close()


def _running_task(store: SqlBackend) -> str:
    store.register_worker("w1")
    task = store.create_task({"name": "t"})
    store.enqueue(task.id)
    assert store.claim(["default"], "w1") is not None
    return task.id


#: (call with a running task `t`, the field the error names)
UNSTORABLE: list[tuple[str, Callable[[SqlBackend, str], object], str]] = [
    ("name with NUL", lambda s, t: s.create_task({"name": "a\x00b"}), "name"),
    ("project with NUL", lambda s, t: s.create_task({"name": "n", "project": "p\x00"}), "project"),
    ("lone surrogate", lambda s, t: s.create_task({"name": "a\ud800b"}), "name"),
    ("task id with NUL", lambda s, t: s.get_task("abc\x00"), "id"),
    ("status message", lambda s, t: s.set_status(t, "failed", message="m\x00", worker_id="w1"), "status_message"),
    ("log line", lambda s, t: s.append_log(t, ["fine", "bad\x00line"]), "line"),
    ("scalar title", lambda s, t: s.report_scalars(t, [{"title": "a\x00", "series": "s", "value": 1}]), "title"),
    ("edited name", lambda s, t: s.edit_task(t, {"name": "x\x00"}, force=True), "name"),
    ("abort message", lambda s, t: s.abort_task(t, message="why\x00"), "status_message"),
    ("query filter", lambda s, t: s.query_tasks(name="a\x00"), "name"),
]


@pytest.mark.parametrize("label", [label for label, _, _ in UNSTORABLE])
def test_text_a_database_cannot_store_is_refused_naming_the_field(store: SqlBackend, label: str) -> None:
    task_id = _running_task(store)
    _, call, field = next(case for case in UNSTORABLE if case[0] == label)
    with pytest.raises(InvalidInputError) as caught:
        call(store, task_id)
    assert caught.value.field == field, caught.value.message
    assert caught.value.message.startswith(f"{field}: ")
    # nothing was written, and the store goes on working
    task = store.get_task(task_id)
    assert task.status.value == "in_progress" and task.name == "t"
    assert [line.line for line in store.get_log(task_id)] == []
    assert len(store.query_tasks()) == 1


def test_nul_inside_the_task_body_is_kept_on_both_databases(store: SqlBackend) -> None:
    # The body is JSON text (NUL escaped as \u0000): both databases store it.
    task = store.create_task({"name": "n", "comment": "a\x00b", "hyperparams": {"s": {"k": "v\x00"}}})
    again = store.get_task(task.id)
    assert again.comment == "a\x00b"
    assert again.hyperparams["s"]["k"] == "v\x00"


def _drop_log_table(store_url: str) -> None:
    if store_url.startswith("sqlite"):
        with sqlite3.connect(store_url.removeprefix("sqlite:///")) as conn:
            conn.execute("DROP TABLE log_lines")
    else:
        engine = sa.create_engine(store_url.replace("postgresql://", "postgresql+psycopg://"))
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP TABLE log_lines")
        engine.dispose()


def test_a_missing_table_is_a_conveyor_error_not_a_raw_database_error(store: SqlBackend, store_url: str) -> None:
    task_id = _running_task(store)
    _drop_log_table(store_url)
    for call in (lambda: store.append_log(task_id, ["x"]), lambda: store.get_log(task_id)):
        with pytest.raises(ConveyorError) as caught:
            call()
        error = caught.value
        assert type(error) is ConveyorError, repr(error)  # server-side: not "unavailable", not input
        assert error.http_status == 500
        assert "log_lines" in error.message
        assert not isinstance(error, (sa.exc.SQLAlchemyError, sqlite3.Error, psycopg.Error))
    assert store.get_task(task_id).status.value == "in_progress"


def _damage_body(store_url: str, task_id: str) -> None:
    statement = f"UPDATE tasks SET body = '{{not json' WHERE id = '{task_id}'"
    if store_url.startswith("sqlite"):
        with sqlite3.connect(store_url.removeprefix("sqlite:///")) as conn:
            conn.execute(statement)
    else:
        engine = sa.create_engine(store_url.replace("postgresql://", "postgresql+psycopg://"))
        with engine.begin() as conn:
            conn.exec_driver_sql(statement)
        engine.dispose()


def test_a_damaged_row_is_a_server_side_error(store: SqlBackend, store_url: str) -> None:
    task = store.create_task({"name": "n"})
    _damage_body(store_url, task.id)
    for call in (lambda: store.get_task(task.id), lambda: store.query_tasks()):
        with pytest.raises(ConveyorError) as caught:
            call()
        assert type(caught.value) is ConveyorError and caught.value.http_status == 500
        assert f"task {task.id}" in caught.value.message and "damaged" in caught.value.message


def test_a_damaged_row_is_a_500_with_an_error_id_over_http(sqlite_url: str) -> None:
    store = SqlBackend(sqlite_url)
    task = store.create_task({"name": "n"})
    store.close()
    _damage_body(sqlite_url, task.id)
    proc, base_url = start_server(sqlite_url)
    try:
        reply = requests.get(f"{base_url}/api/v1/tasks/{task.id}", timeout=10)
    finally:
        output = stop_server(proc)
    assert reply.status_code == 500, reply.text
    body = reply.json()
    assert body["error"] == "error" and body["error_id"]
    assert "json" not in reply.text.lower() and "damaged" not in reply.text
    assert "damaged" in output  # the server logs the details (the output kept is its tail)


def test_an_outage_is_still_backend_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "conveyor.db"
    store = SqlBackend(f"sqlite:///{path}?timeout=0.1")
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(BackendUnavailableError, match="locked"):
            store.create_task({"name": "x"})
    finally:
        holder.rollback()
        holder.close()
        store.close()
