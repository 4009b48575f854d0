"""HTTP-specific behaviour of the API server and HttpBackend, on real server processes.

Contract behaviour shared with SqlBackend lives in the contract tests; here: auth, the
OpenAPI schema, error status codes and bodies, size limits, long-poll claims, the lease
sweep, shutdown, and what the client says when the server cannot be reached.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from controller.client import HttpBackend
from controller.errors import (
    AuthError,
    BackendUnavailableError,
    ConflictError,
    IllegalTransitionError,
    InvalidInputError,
    NotFoundError,
)
from controller.models import TaskStatus
from controller.server.app import open_access_warning
from controller.server.waker import CLOSED, ENQUEUED, MAYBE_MORE, ClaimWaker
from controller.store import SqlBackend
from tests.helpers_server import free_port, start_server, stop_server

TOKEN = "s3cret-token"
API = "/api/v1"


@pytest.fixture(scope="module")
def open_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A server without a token: (base_url, db_url)."""
    db_url = f"sqlite:///{tmp_path_factory.mktemp('open')}/c.db"
    proc, url = start_server(db_url)
    yield url, db_url
    stop_server(proc)


@pytest.fixture(scope="module")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server that requires TOKEN."""
    proc, url = start_server(f"sqlite:///{tmp_path_factory.mktemp('tok')}/c.db", token=TOKEN)
    yield url
    stop_server(proc)


@pytest.fixture
def server(open_server: tuple[str, str]) -> str:
    """The base URL of the open server."""
    return open_server[0]


@pytest.fixture
def client(open_server: tuple[str, str]) -> Iterator[HttpBackend]:
    backend = HttpBackend(open_server[0])
    yield backend
    backend.close()


def task_count(url: str) -> int:
    return len(requests.get(f"{url}{API}/tasks", params={"limit": 10_000}, timeout=10).json())


# ------------------------------------------------------------------------ auth
PROTECTED = [
    ("GET", f"{API}/health"),
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
    ("GET", f"{API}/tasks"),
    ("GET", f"{API}/tasks/whatever"),
    ("POST", f"{API}/claim"),
    ("POST", f"{API}/tasks/whatever/status"),
    ("GET", f"{API}/queues"),
]


@pytest.mark.parametrize(("method", "path"), PROTECTED)
def test_token_required_on_every_endpoint(token_server: str, method: str, path: str) -> None:
    url = token_server + path
    missing = requests.request(method, url, timeout=10)
    assert missing.status_code == 401
    assert missing.json()["error"] == "unauthorized"
    assert "token" in missing.json()["message"]
    wrong = requests.request(method, url, headers={"Authorization": "Bearer nope"}, timeout=10)
    assert wrong.status_code == 401
    right = requests.request(method, url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert right.status_code != 401


def test_token_accepted_as_bearer_or_cookie_not_in_api_urls(token_server: str) -> None:
    health = f"{token_server}{API}/health"
    assert (
        requests.get(health, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).status_code
        == 200
    )
    assert requests.get(health, cookies={"conveyor_token": TOKEN}, timeout=10).status_code == 200
    assert requests.get(health, cookies={"conveyor_token": "bad"}, timeout=10).status_code == 401
    # a token in the URL ends up in proxy logs: refused on the API and its schema
    in_url = requests.get(health, params={"token": TOKEN}, timeout=10)
    assert in_url.status_code == 401 and "not accepted" in in_url.json()["message"]
    docs = requests.get(f"{token_server}/openapi.json", params={"token": TOKEN}, timeout=10)
    assert docs.status_code == 401
    created = requests.post(f"{token_server}{API}/tasks", params={"token": TOKEN}, json={"name": "x"}, timeout=10)
    assert created.status_code == 401


def test_token_in_the_url_only_on_the_dashboard_entry_page(token_server: str) -> None:
    entry = requests.get(
        f"{token_server}/", params={"token": TOKEN, "x": "1"}, allow_redirects=False, timeout=10
    )
    assert entry.status_code == 303 and entry.headers["location"] == "./?x=1"
    assert entry.cookies["conveyor_token"] == TOKEN
    with requests.Session() as browser:
        page = browser.get(f"{token_server}/", params={"token": TOKEN}, timeout=10)
        assert page.status_code == 200 and page.url == f"{token_server}/"
        assert browser.get(f"{token_server}{API}/tasks", timeout=10).status_code == 200


def test_open_access_warning_only_off_loopback_without_token() -> None:
    assert open_access_warning("127.0.0.1", None) is None
    assert open_access_warning("::1", None) is None
    assert open_access_warning("localhost", None) is None
    assert open_access_warning("0.0.0.0", "s3cret") is None
    for host in ("0.0.0.0", "::", "192.168.1.10", "server.example.org"):
        warning = open_access_warning(host, None)
        assert warning and "without an API token" in warning and "--token" in warning


def test_serving_on_all_addresses_without_token_warns_at_start(tmp_path: Path) -> None:
    proc, _ = start_server(f"sqlite:///{tmp_path}/c.db", extra_args=["--host", "0.0.0.0"])
    output = stop_server(proc)
    assert "WARNING: serving on 0.0.0.0 (not a loopback address) without an API token" in output
    proc, _ = start_server(f"sqlite:///{tmp_path}/c.db")
    assert "WARNING" not in stop_server(proc)


def test_client_with_wrong_token_raises_auth_error(token_server: str) -> None:
    with pytest.raises(AuthError, match="token"):
        HttpBackend(token_server, token="wrong").list_queues()
    with pytest.raises(AuthError):
        HttpBackend(token_server).create_task({"name": "x"})
    good = HttpBackend(token_server, token=TOKEN)
    task = good.create_task({"name": "authorized"})
    assert good.get_task(task.id).name == "authorized"


# ------------------------------------------- one answer on both databases, no leaks
@pytest.fixture(params=["http", pytest.param("http_postgres", marks=pytest.mark.postgres)])
def any_db_server(request: pytest.FixtureRequest) -> str:
    """A fresh server over SQLite, then over PostgreSQL."""
    return request.getfixturevalue(f"{request.param}_url")


NUL_CASES = [
    ("GET", "/tasks/a%00b", None, "path.task_id"),
    ("DELETE", "/queues/q%00", None, "path.name"),
    ("POST", "/workers/w%00/heartbeat", {}, "path.worker_id"),
    ("GET", "/tasks?name=a%00b", None, "query.name"),
    ("GET", "/tasks?status=created&tags=ok&tags=b%00", None, "query.tags"),
    ("POST", "/tasks", {"name": "a\x00b"}, "body.name"),
    ("POST", "/tasks", {"name": "t", "hyperparams": {"lr": "0.1\x00"}}, "body.hyperparams.lr"),
    ("POST", "/tasks", {"name": "t", "tags": ["ok", "\x00"]}, "body.tags.1"),
    ("POST", "/tasks", {"name": "\ud800"}, "body.name"),
    ("POST", "/workers", {"worker_id": "w\x00"}, "body.worker_id"),
    ("POST", "/queues", {"name": "q\x00"}, "body.name"),
    ("POST", "/claim", {"queues": ["q\x00"], "worker_id": "w"}, "body.queues.0"),
]


@pytest.mark.parametrize(("method", "path", "body", "field"), NUL_CASES)
def test_text_no_database_can_store_is_422_naming_the_field(
    any_db_server: str, method: str, path: str, body: dict | None, field: str
) -> None:
    kwargs: dict = {}
    if body is not None:
        # json.dumps writes NUL as \u0000 and a lone surrogate as \ud800, as a client would
        kwargs = {"data": json.dumps(body), "headers": {"content-type": "application/json"}}
    answer = requests.request(method, f"{any_db_server}{API}{path}", timeout=10, **kwargs)
    assert answer.status_code == 422, answer.text
    error = answer.json()
    assert error["error"] == "invalid_input" and error["field"] == field
    assert field in error["message"]
    assert task_count(any_db_server) == 0  # nothing was stored


def test_an_escaped_backslash_u0000_is_ordinary_text(any_db_server: str) -> None:
    raw = '{"name": "C:\\\\u0000 is not a NUL"}'  # the JSON text holds \\u0000
    answer = requests.post(
        f"{any_db_server}{API}/tasks", data=raw, headers={"content-type": "application/json"}, timeout=10
    )
    assert answer.status_code == 201, answer.text
    assert answer.json()["name"] == "C:\\u0000 is not a NUL"


def test_long_file_names_are_422_without_server_paths(http_url: str, tmp_path: Path) -> None:
    files = f"{http_url}{API}/files/"
    home = str(tmp_path)
    for path in ("a" * 256, "ok/" + "é" * 128, "x\x00y"):
        for answer in (
            requests.put(files + path, data=b"data", timeout=10),
            requests.get(files + path, timeout=10),
        ):
            assert answer.status_code == 422, answer.text
            # "path" from the files endpoint, "path.path" (the route's parameter) for a NUL
            assert answer.json()["field"] in ("path", "path.path")
            assert home not in answer.text and "File name too long" not in answer.text
    # 255 bytes is the limit, not over it
    stored = requests.put(files + "b" * 255, data=b"data", timeout=10)
    assert stored.status_code == 201, stored.text
    assert requests.get(files + "b" * 255, timeout=10).content == b"data"
    deep = "/".join(["c" * 250] * 4)  # over 1000 characters, fine segment by segment
    assert requests.put(files + deep, data=b"deep", timeout=10).status_code == 201


def test_a_server_failure_is_500_with_an_error_id_the_log_explains(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    proc, url = start_server(f"sqlite:///{db}")
    try:
        task = requests.post(f"{url}{API}/tasks", json={"name": "x"}, timeout=10).json()["id"]
        with sqlite3.connect(db) as conn:  # break the store behind the server's back
            conn.execute("DROP TABLE scalars")
        answer = requests.get(f"{url}{API}/tasks/{task}/scalars", timeout=10)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        proc.conveyor_log.seek(0)
        log = proc.conveyor_log.read().decode()  # all of it (stop_server gives the tail)
        stop_server(proc)
    assert answer.status_code == 500
    body = answer.json()
    # the store turns the database's error into a server-side ConveyorError (code "error")
    assert body["error"] == "error" and body["error_id"] in body["message"]
    for secret in ("scalars", "sqlite", "OperationalError", "SELECT", str(tmp_path)):
        assert secret not in answer.text
    # the log has the details under that id
    assert f"error {body['error_id']} on GET {API}/tasks/{task}/scalars" in log
    assert "Traceback" in log and "no such table: scalars" in log
    assert "Exception in ASGI application" not in log  # logged once, with its id


# --------------------------------------------------------------------- openapi
def test_openapi_lists_every_endpoint(open_server: tuple[str, str]) -> None:
    schema = requests.get(f"{open_server[0]}/openapi.json", timeout=10).json()
    listed = {(m.upper(), p) for p, ops in schema["paths"].items() for m in ops}
    expected = {
        ("POST", f"{API}/tasks"),
        ("GET", f"{API}/tasks"),
        ("GET", f"{API}/tasks/{{task_id}}"),
        ("PATCH", f"{API}/tasks/{{task_id}}"),
        ("DELETE", f"{API}/tasks/{{task_id}}"),
        ("POST", f"{API}/tasks/{{task_id}}/clone"),
        ("POST", f"{API}/tasks/{{task_id}}/status"),
        ("POST", f"{API}/tasks/{{task_id}}/finish"),
        ("POST", f"{API}/tasks/{{task_id}}/log"),
        ("GET", f"{API}/tasks/{{task_id}}/log"),
        ("POST", f"{API}/tasks/{{task_id}}/scalars"),
        ("GET", f"{API}/tasks/{{task_id}}/scalars"),
        ("POST", f"{API}/tasks/{{task_id}}/enqueue"),
        ("POST", f"{API}/tasks/{{task_id}}/dequeue"),
        ("POST", f"{API}/tasks/{{task_id}}/abort"),
        ("POST", f"{API}/tasks/{{task_id}}/reset"),
        ("GET", f"{API}/queues"),
        ("POST", f"{API}/queues"),
        ("GET", f"{API}/queues/{{name}}"),
        ("DELETE", f"{API}/queues/{{name}}"),
        ("GET", f"{API}/queues/{{name}}/tasks"),
        ("POST", f"{API}/claim"),
        ("POST", f"{API}/workers"),
        ("GET", f"{API}/workers"),
        ("POST", f"{API}/workers/{{worker_id}}/heartbeat"),
        ("DELETE", f"{API}/workers/{{worker_id}}"),
        ("POST", f"{API}/leases/expire"),
        ("GET", f"{API}/health"),
    }
    assert expected <= listed, f"missing: {sorted(expected - listed)}"
    assert "TaskRecord" in schema["components"]["schemas"]


# ---------------------------------------------------------------- bad input
def test_malformed_json_is_422_and_creates_nothing(open_server: tuple[str, str]) -> None:
    url = open_server[0]
    before = task_count(url)
    resp = requests.post(
        f"{url}{API}/tasks",
        data=b'{"name": "x",',
        headers={"Content-Type": "application/json"},
        timeout=10,
    )
    assert resp.status_code == 422
    body = resp.json()
    assert body["error"] == "invalid_input"
    assert "malformed JSON" in body["message"] and "\n" not in body["message"]
    assert body["field"] == "body"
    assert task_count(url) == before


def test_malformed_json_on_agent_endpoints(server: str) -> None:
    for path in (f"{API}/claim", f"{API}/tasks/abc/status", f"{API}/tasks/abc/finish",
                 f"{API}/workers/w/heartbeat"):
        resp = requests.post(
            server + path,
            data=b"{nope",
            headers={"Content-Type": "application/json"},
            timeout=10,
        )
        assert resp.status_code == 422, path
        assert "malformed JSON" in resp.json()["message"]


def test_wrong_types_name_the_field(server: str) -> None:
    cases = [
        (f"{API}/tasks", {"name": 5}, "body.name"),
        (f"{API}/tasks", {"name": "x", "tags": "not-a-list"}, "body.tags"),
        (
            f"{API}/tasks",
            {"name": "x", "execution": {"priority": "high"}},
            "body.execution.priority",
        ),
        (
            f"{API}/claim",
            {"queues": ["default"], "worker_id": "w", "wait_s": "soon"},
            "body.wait_s",
        ),
        (f"{API}/claim", {"queues": ["default"], "worker_id": "w", "wait_s": 61}, "body.wait_s"),
        (f"{API}/claim", {"queues": ["default"], "worker_id": "has space"}, "body.worker_id"),
        (f"{API}/tasks/abc/status", {"status": "bogus"}, "body.status"),
        (f"{API}/tasks/abc/log", {"lines": [{"line": 1}]}, "body.lines.0.line"),
        (f"{API}/tasks/abc/finish", {"status": "bogus"}, "body.status"),
        (f"{API}/tasks/abc/finish", {"status": "completed", "log_lines": [{"line": 1}]}, "body.log_lines.0.line"),
        (f"{API}/tasks/abc/finish", {"status": "completed", "runtime": "fast"}, "body.runtime"),
        (f"{API}/tasks/abc/finish", {"status": "completed", "log_batch_id": "a/b"}, "body.log_batch_id"),
        (f"{API}/workers/w/heartbeat", {"lease_s": -1}, "body.lease_s"),
    ]
    before = task_count(server)
    for path, payload, field in cases:
        resp = requests.post(server + path, json=payload, timeout=10)
        assert resp.status_code == 422, (path, payload, resp.text)
        body = resp.json()
        assert body["error"] == "invalid_input"
        assert body["field"] == field, body
        assert body["message"].startswith(f"{field}: "), body["message"]
        assert isinstance(body["detail"], list) and body["detail"][0]["loc"]
    assert task_count(server) == before


def test_out_of_range_numbers_are_422_not_500(server: str) -> None:
    task = HttpBackend(server).create_task({"name": "numbers"})
    huge = str(10**30)
    resp = requests.get(
        f"{server}{API}/tasks/{task.id}/log", params={"offset": huge}, timeout=10
    )
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"] == "invalid_input"
    resp = requests.post(
        f"{server}{API}/tasks/{task.id}/enqueue", json={"priority": 10**30}, timeout=10
    )
    assert resp.status_code == 422, resp.text
    assert HttpBackend(server).get_task(task.id).status == TaskStatus.created


def test_client_maps_422_to_invalid_input(client: HttpBackend) -> None:
    with pytest.raises(InvalidInputError) as err:
        client.create_task({"name": "x" * 300})
    assert err.value.field == "name"
    assert "at most 256 characters" in str(err.value)
    with pytest.raises(InvalidInputError):
        client.claim(["default"], "worker with spaces")
    task = client.create_task({"name": "unchanged"})
    with pytest.raises(InvalidInputError):
        client.edit_task(task.id, {"not_a_field": 1})
    assert client.get_task(task.id).name == "unchanged"


def test_unknown_ids_are_404(server: str) -> None:
    backend = HttpBackend(server)
    for path, method in [
        (f"{API}/tasks/nope", "GET"),
        (f"{API}/tasks/nope/enqueue", "POST"),
        (f"{API}/tasks/nope/reset", "POST"),
        (f"{API}/queues/nope", "GET"),
        (f"{API}/no/such/endpoint", "GET"),
    ]:
        resp = requests.request(method, server + path, timeout=10)
        assert resp.status_code == 404, path
        assert resp.json()["error"] == "not_found"
    with pytest.raises(NotFoundError, match="nope"):
        backend.get_task("nope")
    with pytest.raises(NotFoundError):
        backend.heartbeat("never-registered")
    with pytest.raises(NotFoundError):
        backend.get_task("a/b")  # a slash in an id never reaches another route


def test_illegal_transition_is_409(server: str) -> None:
    backend = HttpBackend(server)
    task = backend.create_task({"name": "t"})
    resp = requests.post(
        f"{server}{API}/tasks/{task.id}/status", json={"status": "completed"}, timeout=10
    )
    assert resp.status_code == 409
    body = resp.json()
    assert body["error"] == "illegal_transition"
    assert body["detail"] == {"current": "created", "requested": "completed"}
    with pytest.raises(IllegalTransitionError) as err:
        backend.set_status(task.id, TaskStatus.completed)
    assert (err.value.current, err.value.requested) == ("created", "completed")
    assert backend.get_task(task.id).status == TaskStatus.created
    with pytest.raises(ConflictError):
        backend.create_queue("default")


def test_oversized_body_is_413(open_server: tuple[str, str]) -> None:
    url = open_server[0]
    port = int(url.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.putrequest("POST", f"{API}/tasks")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(64 * 1024 * 1024 + 1))
    conn.endheaders()
    conn.send(b" " * 65536)  # the server refuses before reading the rest
    resp = conn.getresponse()
    assert resp.status == 413
    body = json.loads(resp.read())
    assert body["error"] == "invalid_input" and "64 MiB" in body["message"]
    conn.close()

    def chunks() -> Iterator[bytes]:
        for _ in range(66):
            yield b" " * (1024 * 1024)

    chunked = requests.post(
        f"{url}{API}/tasks", data=chunks(), headers={"Content-Type": "application/json"}, timeout=60
    )
    assert chunked.status_code == 413
    assert requests.get(f"{url}{API}/health", timeout=10).ok


def test_oversized_field_is_422_and_client_refuses_huge_bodies(client: HttpBackend) -> None:
    with pytest.raises(InvalidInputError) as err:
        client.create_task({"name": "big", "comment": "x" * (16 * 1024 * 1024 + 1)})
    assert err.value.field == "comment"
    task = client.create_task({"name": "log"})
    with pytest.raises(InvalidInputError, match="lines.0.line"):
        client.append_log(task.id, ["y" * (1024 * 1024 + 1)])
    with pytest.raises(InvalidInputError, match="64 MiB"):
        client.append_log(task.id, ["z" * 1000] * 70_000)
    assert client.get_log(task.id) == []


# ---------------------------------------------------------------- long poll
def test_long_poll_claim_returns_when_another_client_enqueues(server: str) -> None:
    waiter, producer = HttpBackend(server), HttpBackend(server)
    waiter.create_queue("lp")
    task = producer.create_task({"name": "wake-me"})
    got: dict[str, object] = {}

    def wait() -> None:
        got["task"] = waiter.claim(["lp"], "waiter-1", wait_s=20)
        got["at"] = time.monotonic()

    thread = threading.Thread(target=wait)
    thread.start()
    time.sleep(0.5)  # the claim is waiting on the server now
    assert thread.is_alive()
    producer.enqueue(task.id, "lp")
    enqueued_at = time.monotonic()
    thread.join(10)
    assert not thread.is_alive()
    assert got["task"] is not None and got["task"].id == task.id
    assert got["at"] - enqueued_at < 0.5


def test_long_poll_sees_enqueues_by_other_processes(open_server: tuple[str, str]) -> None:
    url, db_url = open_server
    waiter = HttpBackend(url)
    waiter.create_queue("other-proc")
    store = SqlBackend(db_url)  # straight to the database, not through the server
    try:
        task = store.create_task({"name": "from-elsewhere"})
        got: dict[str, object] = {}
        thread = threading.Thread(
            target=lambda: got.update(task=waiter.claim(["other-proc"], "w2", wait_s=20))
        )
        thread.start()
        time.sleep(0.3)
        store.enqueue(task.id, "other-proc")
        started = time.monotonic()
        thread.join(10)
        assert got["task"] is not None and got["task"].id == task.id
        assert time.monotonic() - started < 1.0  # the fallback poll
    finally:
        store.close()


def test_long_poll_claim_returns_none_after_wait_s(server: str) -> None:
    backend = HttpBackend(server)
    backend.create_queue("empty")
    started = time.monotonic()
    assert backend.claim(["empty"], "w3", wait_s=0.6) is None
    assert 0.55 <= time.monotonic() - started < 2.0
    assert backend.claim(["empty"], "w3") is None  # wait_s=0 answers at once
    with pytest.raises(NotFoundError):
        backend.claim(["no-such-queue"], "w3", wait_s=5)


def test_lease_sweep_fails_tasks_without_heartbeat(client: HttpBackend) -> None:
    client.create_queue("lease")
    task = client.create_task({"name": "orphan"})
    client.enqueue(task.id, "lease")
    claimed = client.claim(["lease"], "ghost", lease_s=0.3)
    assert claimed is not None and claimed.status == TaskStatus.in_progress
    # The server's first sweep comes one default lease (10 s) after its start.
    deadline = time.monotonic() + 15
    while client.get_task(task.id).status == TaskStatus.in_progress and time.monotonic() < deadline:
        time.sleep(0.2)
    final = client.get_task(task.id)
    assert final.status == TaskStatus.failed
    assert final.status_reason == "lease_expired"


# ------------------------------------------------------------------ agent cycle
def test_agent_cycle(server: str) -> None:
    backend = HttpBackend(server)
    backend.register_worker("cycle-w", hostname="h", queues=["cycle"])
    backend.create_queue("cycle")
    task = backend.create_task({"name": "cycle", "tags": ["a", "b"]})
    assert backend.enqueue(task.id, "cycle", priority=5).status == TaskStatus.queued
    assert [t.id for t in backend.queue_tasks("cycle")] == [task.id]
    claimed = backend.claim(["cycle"], "cycle-w", wait_s=1)
    assert claimed is not None and claimed.runtime.worker == "cycle-w"
    reply = backend.heartbeat("cycle-w", current_tasks=[task.id], resources={"cpu": 1})
    assert reply.abort == []
    assert backend.append_log(task.id, ["one", {"line": "two", "stream": "stderr"}]) == 2
    assert [line.line for line in backend.get_log(task.id, tail=1)] == ["two"]
    backend.report_scalars(
        task.id, [{"title": "loss", "series": "train", "iteration": 1, "value": 0.5}]
    )
    assert backend.get_scalars(task.id, title="loss")[0].value == 0.5
    done = backend.set_status(task.id, "completed", worker_id="cycle-w")
    assert done.status == TaskStatus.completed
    clone = backend.clone_task(task.id, name="again", parent=None)
    assert clone.parent is None and clone.tags == ["a", "b"]
    assert backend.query_tasks(name="again")[0].id == clone.id
    assert [record.id for record in backend.delete_task(clone.id)] == [clone.id]
    assert backend.expire_leases() == []
    backend.unregister_worker("cycle-w")
    assert all(w.id != "cycle-w" for w in backend.list_workers())


# ------------------------------------------------------------- availability
def test_closed_port_raises_backend_unavailable_quickly() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    backend = HttpBackend(url, retries=2)
    started = time.monotonic()
    with pytest.raises(BackendUnavailableError) as err:
        backend.get_task("x")
    assert time.monotonic() - started < 5
    message = str(err.value)
    assert message.startswith(f"cannot reach the Conveyor API at {url}: ")
    assert "\n" not in message and "refused" in message.lower()


def test_shutdown_answers_waiting_claims(tmp_path: Path) -> None:
    proc, url = start_server(f"sqlite:///{tmp_path}/c.db")
    try:
        backend = HttpBackend(url, retries=0)
        outcome: dict[str, object] = {}

        def wait() -> None:
            try:
                outcome["task"] = backend.claim(["default"], "w-shutdown", wait_s=50)
            except BackendUnavailableError as exc:
                outcome["error"] = exc

        thread = threading.Thread(target=wait)
        thread.start()
        time.sleep(0.5)
        started = time.monotonic()
        proc.terminate()
        proc.wait(timeout=15)
        thread.join(15)
        assert not thread.is_alive()
        assert time.monotonic() - started < 8
        assert "error" not in outcome, outcome
        assert outcome["task"] is None
    finally:
        stop_server(proc)


def test_shutdown_answers_waiting_status_waits(tmp_path: Path) -> None:
    proc, url = start_server(f"sqlite:///{tmp_path}/c.db")
    try:
        backend = HttpBackend(url, retries=0)
        task = backend.create_task({"name": "never-changes"})
        outcome: dict[str, object] = {}
        thread = threading.Thread(
            target=lambda: outcome.update(changed=backend.wait_for_status_change({task.id: "created"}, wait_s=50))
        )
        thread.start()
        time.sleep(0.5)
        started = time.monotonic()
        proc.terminate()
        proc.wait(timeout=15)
        thread.join(15)
        assert not thread.is_alive()
        assert time.monotonic() - started < 8
        assert outcome["changed"] == []
    finally:
        stop_server(proc)


@pytest.mark.postgres
def test_two_servers_on_one_postgres_wake_each_others_claimers(postgres_url: str) -> None:
    first, first_url = start_server(postgres_url)
    second, second_url = start_server(postgres_url)
    try:
        claimer, producer = HttpBackend(first_url), HttpBackend(second_url)
        claimer.create_queue("shared")
        task = producer.create_task({"name": "across"})
        got: dict[str, object] = {}

        def wait() -> None:
            got["task"] = claimer.claim(["shared"], "w-first", wait_s=20)
            got["at"] = time.monotonic()

        thread = threading.Thread(target=wait)
        thread.start()
        time.sleep(0.5)  # the claim waits in the first server
        producer.enqueue(task.id, "shared")  # through the second one
        enqueued_at = time.monotonic()
        thread.join(10)
        assert got["task"] is not None and got["task"].id == task.id
        assert got["at"] - enqueued_at < 0.5  # at once: the second server NOTIFYs the first
        assert producer.get_task(task.id).runtime.worker == "w-first"
    finally:
        stop_server(first)
        stop_server(second)


def _claim_in_threads(
    url: str, queue: str, count: int, wait_s: float
) -> tuple[list[threading.Thread], list]:
    results: list = []
    lock = threading.Lock()

    def wait(n: int) -> None:
        rec = HttpBackend(url).claim([queue], f"{queue}-w{n}", wait_s=wait_s)
        with lock:
            results.append((rec, time.monotonic()))

    threads = [threading.Thread(target=wait, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    return threads, results


def test_many_waiters_each_get_one_task(server: str) -> None:
    producer = HttpBackend(server)
    producer.create_queue("many")
    tasks = [producer.create_task({"name": f"m{i}"}) for i in range(5)]
    threads, results = _claim_in_threads(server, "many", 5, wait_s=20)
    time.sleep(0.5)
    for task in tasks:
        producer.enqueue(task.id, "many")
    enqueued_at = time.monotonic()
    for thread in threads:
        thread.join(10)
    assert sorted(rec.id for rec, _ in results) == sorted(t.id for t in tasks)
    assert max(at for _, at in results) - enqueued_at < 1.0


def test_burst_from_another_process_is_drained(open_server: tuple[str, str]) -> None:
    url, db_url = open_server
    HttpBackend(url).create_queue("burst")
    threads, results = _claim_in_threads(url, "burst", 4, wait_s=20)
    time.sleep(0.5)
    store = SqlBackend(db_url)
    try:
        ids = [store.create_task({"name": f"b{i}"}).id for i in range(4)]
        for task_id in ids:
            store.enqueue(task_id, "burst")  # no wake-up reaches the server: only its poll
        enqueued_at = time.monotonic()
        for thread in threads:
            thread.join(10)
    finally:
        store.close()
    assert sorted(rec.id for rec, _ in results) == sorted(ids)
    assert max(at for _, at in results) - enqueued_at < 1.5


def test_waker_wakes_one_waiter_per_enqueue_and_one_per_queue_per_tick() -> None:
    async def scenario() -> None:
        waker = ClaimWaker()
        waker.attach(asyncio.get_running_loop())
        with waker.watch(["q"]) as first, waker.watch(["q"]) as second, waker.watch(["r"]) as other:
            waker.notify_threadsafe("q")  # as the Backend does, from any thread
            await asyncio.sleep(0.01)
            assert first.result() == ENQUEUED
            assert not second.done() and not other.done()
            waker.tick()
            assert second.result() == MAYBE_MORE and other.result() == MAYBE_MORE
        assert waker.waiting() == 0
        with waker.watch(["q", "r"]) as last:
            waker.close()
            assert last.result() == CLOSED

    asyncio.run(scenario())
