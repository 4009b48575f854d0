"""The dashboard over HTTP (no browser): pages, assets, the token cookie, pipeline endpoints.

The browser tests (tests/test_dashboard_browser.py) drive the pages themselves.
"""

from __future__ import annotations

import re
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

with warnings.catch_warnings():  # starlette nudges towards httpx2; httpx works the same here
    warnings.filterwarnings("ignore", message="Using `httpx`")
    from fastapi.testclient import TestClient

from controller.backend import Backend
from controller.models import STATUS_GROUPS, TaskStatus
from controller.server import create_app
from controller.server.dashboard import STATIC_DIR
from controller.server.routes_pipelines import run_numbers, split_run_name
from controller.store import SqlBackend
from controller.transitions import LEGAL_TRANSITIONS
from tests.helpers_server import start_server, stop_server

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = None

TOKEN = "dash-s3cret"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def backend(sqlite_url: str) -> Iterator[Backend]:
    store = SqlBackend(sqlite_url)
    yield store
    store.close()


@pytest.fixture
def open_client(backend: Backend) -> Iterator[TestClient]:
    """A server without a token."""
    with TestClient(create_app(backend, None, lease_sweep_s=0)) as client:
        yield client


@pytest.fixture
def client(backend: Backend) -> Iterator[TestClient]:
    """A server with a token; the client sends nothing by itself."""
    with TestClient(create_app(backend, TOKEN, lease_sweep_s=0)) as client:
        yield client


def controller_task(backend: Backend, name: str, project: str = "p", status: str | None = None,
                    nodes: dict | None = None, version: str = "1.0.0") -> str:
    task = backend.create_task({
        "name": name, "project": project, "type": "controller", "tags": ["pipeline"],
        "configuration": {"Pipeline": {"name": name.split(" #")[0], "version": version, "steps": {
            "a": {"name": "a", "status": "pending", "parents": []},
            "b": {"name": "b", "status": "pending", "parents": ["a"]},
        }}},
    })
    if status in ("in_progress", "completed", "failed"):
        backend.set_status(task.id, "in_progress", reason="started")
    if status in ("completed", "failed"):
        backend.set_status(task.id, status, reason=status)
    if nodes is not None:
        backend.edit_task(task.id, {"runtime": {"pipeline": {
            "name": name.split(" #")[0], "version": version, "status": "running", "nodes": nodes,
            "parameters": {"size": 3}, "updated": time.time()}}}, force=True)
    return task.id


# ------------------------------------------------------------------ the page
def test_the_page_and_every_script_it_imports_are_served(open_client: TestClient) -> None:
    page = open_client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY"
    assert '<script type="module" src="ui/app.js">' in page.text
    assert "__VERSION__" not in page.text
    # every module reachable from app.js is served as JavaScript
    seen: set[str] = set()
    todo = ["app.js"]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        asset = open_client.get(f"/ui/{name}")
        assert asset.status_code == 200, name
        assert asset.headers["content-type"].startswith("text/javascript")
        todo += re.findall(r'from "\./([\w.]+\.js)"', asset.text)
    assert {"api.js", "dag.js", "pipeline.js", "task.js", "queues.js", "plot.js"} <= seen
    css = open_client.get("/ui/style.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")


def test_assets_are_revalidated_with_etags(open_client: TestClient) -> None:
    first = open_client.get("/ui/dag.js")
    assert first.headers["cache-control"] == "no-cache"
    again = open_client.get("/ui/dag.js", headers={"if-none-match": first.headers["etag"]})
    assert again.status_code == 304 and not again.content


@pytest.mark.parametrize("name", ["nope.js", "index.html", "unauthorized.html", "..%2Fapp.js"])
def test_only_known_assets_are_served(open_client: TestClient, name: str) -> None:
    assert open_client.get(f"/ui/{name}").status_code == 404


# ------------------------------------------------------------------ the token
def test_a_browser_without_the_token_gets_a_page_saying_how_to_pass_it(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 401
    assert page.headers["content-type"].startswith("text/html")
    assert "?token=YOUR_TOKEN" in page.text and "controller serve --token" in page.text
    assert "requires its API token" in page.text
    wrong = client.get("/", params={"token": "nope"})
    assert wrong.status_code == 401 and "is not this server" in wrong.text


def test_the_token_in_the_address_becomes_a_strict_httponly_cookie(client: TestClient) -> None:
    answer = client.get("/", params={"token": TOKEN, "x": "1"}, follow_redirects=False)
    assert answer.status_code == 303
    assert answer.headers["location"] == "./?x=1"  # the token leaves the address
    cookie = answer.headers["set-cookie"]
    assert cookie.startswith(f"conveyor_token={TOKEN};")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    # the client now holds the cookie: the page and the API answer
    assert client.get("/").status_code == 200
    assert client.get("/api/v1/pipelines").status_code == 200


def test_api_paths_still_answer_401_in_json(client: TestClient) -> None:
    for path in ("/api/v1/pipelines", "/openapi.json"):
        answer = client.get(path)
        assert answer.status_code == 401 and answer.json()["error"] == "unauthorized"
    # a token in the query of an API call is refused (URLs end up in proxy logs)
    assert client.get("/api/v1/info", params={"token": TOKEN}, follow_redirects=False).status_code == 401


def test_the_dashboard_can_be_turned_off(backend: Backend) -> None:
    with TestClient(create_app(backend, TOKEN, lease_sweep_s=0, dashboard=False)) as client:
        assert client.get("/").status_code == 401
        assert client.get("/").headers["content-type"] == "application/json"
        # no dashboard, no entry page: a token in the URL is refused like on the API
        assert client.get("/", params={"token": TOKEN}).status_code == 401
        assert client.get("/", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 404


# ---------------------------------------------------------------- statuses
def test_statuses_come_from_the_server_with_groups_flags_and_transitions(
    open_client: TestClient,
) -> None:
    answer = open_client.get("/api/v1/statuses")
    assert answer.status_code == 200
    table = {s["name"]: s for s in answer.json()["statuses"]}
    assert list(table) == [s.value for s in TaskStatus]  # in life order
    for status in TaskStatus:
        entry = table[status.value]
        assert entry["group"] == STATUS_GROUPS[status]
        assert entry["terminal"] == status.is_terminal
        assert entry["active"] == status.is_active
        assert set(entry["transitions"]) == {s.value for s in LEGAL_TRANSITIONS[status]}
    assert table["in_progress"]["group"] == "running" and table["in_progress"]["active"]
    assert table["completed"]["terminal"] and "queued" in table["completed"]["transitions"]
    # every group has its colour in the stylesheet
    css = (STATIC_DIR / "style.css").read_text()
    for group in set(STATUS_GROUPS.values()):
        assert f".st-{group} " in css or f".st-{group}," in css, group


def test_the_scripts_keep_no_copy_of_the_status_list() -> None:
    for script in STATIC_DIR.glob("*.js"):
        text = script.read_text()
        for status in ('"in_progress"', '"stopping"', '"stopped"]'):
            assert status not in text, f"{script.name} lists task statuses: use statuses.js"


# --------------------------------------------------------------- pipelines
def test_run_numbers_come_from_the_suffix_or_the_order_of_same_named_runs(backend: Backend) -> None:
    first = controller_task(backend, "train")
    second = controller_task(backend, "train #2")
    plain_again = controller_task(backend, "train")  # add_run_number=False: counted by age
    other_project = controller_task(backend, "train", project="q")
    records = [backend.get_task(i) for i in (first, second, plain_again, other_project)]
    assert run_numbers(records) == {first: 1, second: 2, plain_again: 2, other_project: 1}
    assert split_run_name("a b #12") == ("a b", 12)
    assert split_run_name("#3") == ("#3", None)


def test_pipelines_lists_runs_with_versions_statuses_and_step_counts(
    backend: Backend, open_client: TestClient
) -> None:
    nodes = {"a": {"name": "a", "status": "completed", "parents": []},
             "b": {"name": "b", "status": "running", "parents": ["a"]}}
    done = controller_task(backend, "etl", status="completed", version="2.0.1")
    running = controller_task(backend, "etl #2", status="in_progress", nodes=nodes)
    controller_task(backend, "other", project="q")
    backend.create_task({"name": "not a pipeline", "project": "p"})
    body = open_client.get("/api/v1/pipelines").json()
    assert body["total"] == 3 and body["projects"] == ["p", "q"]
    by_id = {r["id"]: r for r in body["runs"]}
    assert by_id[running]["name"] == "etl" and by_id[running]["run"] == 2
    assert by_id[running]["steps"] == {"completed": 1, "running": 1}
    assert by_id[running]["pipeline_status"] == "running"
    assert by_id[running]["duration_s"] is not None and by_id[running]["finished_at"] is None
    assert by_id[done]["run"] == 1 and by_id[done]["version"] == "2.0.1"
    assert by_id[done]["steps"] == {"pending": 2} and by_id[done]["status"] == "completed"
    # filters: project in the store, status after numbering (numbers do not move)
    only_p = open_client.get("/api/v1/pipelines", params={"project": "p"}).json()
    assert {r["id"] for r in only_p["runs"]} == {done, running} and only_p["projects"] == ["p", "q"]
    params = {"project": "p", "with_projects": "false"}
    assert open_client.get("/api/v1/pipelines", params=params).json()["projects"] is None
    running_only = open_client.get("/api/v1/pipelines", params={"status": "in_progress"}).json()
    assert [(r["id"], r["run"]) for r in running_only["runs"]] == [(running, 2)]
    assert open_client.get("/api/v1/pipelines", params={"status": "nope"}).status_code == 422
    page = open_client.get("/api/v1/pipelines", params={"limit": 1, "offset": 1}).json()
    assert page["total"] == 3 and len(page["runs"]) == 1


def test_one_run_has_its_dag_or_its_definition_before_it_starts(
    backend: Backend, open_client: TestClient
) -> None:
    draft = controller_task(backend, "draft")
    body = open_client.get(f"/api/v1/pipelines/{draft}").json()
    assert body["run"] == 1 and body["pipeline_status"] == ""
    assert {n: s["status"] for n, s in body["nodes"].items()} == {"a": "pending", "b": "pending"}
    assert body["nodes"]["b"]["parents"] == ["a"]
    nodes = {"a": {"name": "a", "status": "failed", "parents": [], "status_message": "exit code 2"}}
    live = controller_task(backend, "live #4", status="in_progress", nodes=nodes)
    body = open_client.get(f"/api/v1/pipelines/{live}").json()
    assert body["run"] == 4 and body["nodes"] == nodes and body["parameters"] == {"size": 3}
    assert body["updated"] is not None


def test_a_task_that_is_not_a_pipeline_is_404(backend: Backend, open_client: TestClient) -> None:
    task = backend.create_task({"name": "plain"})
    answer = open_client.get(f"/api/v1/pipelines/{task.id}")
    assert answer.status_code == 404 and "not a pipeline" in answer.json()["message"]
    assert open_client.get("/api/v1/pipelines/nope").status_code == 404


def test_info_names_the_files_folder(sqlite_url: str, tmp_path: Path) -> None:
    store = SqlBackend(sqlite_url)
    with TestClient(create_app(store, None, lease_sweep_s=0, files_dir=tmp_path / "f")) as client:
        info = client.get("/api/v1/info").json()
    store.close()
    assert info["files_url"] == (tmp_path / "f").resolve().as_uri()
    assert info["files_path"] == "/api/v1/files/"


# --------------------------------------------------------------- packaging
@pytest.mark.skipif(tomllib is None, reason="tomllib needs Python 3.11")
def test_every_static_file_is_package_data() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["controller.server.dashboard"]
    package_dir = STATIC_DIR.parent
    covered = {p for pattern in patterns for p in package_dir.glob(pattern) if p.is_file()}
    shipped = {p for p in STATIC_DIR.iterdir() if p.is_file()}
    assert shipped and shipped <= covered


# ------------------------------------------------------------------ API docs
def test_opening_the_api_docs_logs_no_warning_and_every_operation_id_is_unique(
    sqlite_url: str, tmp_path: Path
) -> None:
    """The dashboard's "API docs" link: the real server, its log read back after /docs and
    /openapi.json (FastAPI warns there about duplicate operation ids)."""
    server, url = start_server(sqlite_url, TOKEN, extra_args=["--files-dir", str(tmp_path / "files")])
    try:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert requests.get(f"{url}/docs", headers=auth, timeout=10).status_code == 200
        spec = requests.get(f"{url}/openapi.json", headers=auth, timeout=10)
        assert spec.status_code == 200
        # files: GET and HEAD are separate operations, and HEAD still answers headers only
        put = requests.put(f"{url}/api/v1/files/docs/a.txt", data=b"hello", headers=auth, timeout=10)
        assert put.status_code == 201
        head = requests.head(f"{url}/api/v1/files/docs/a.txt", headers=auth, timeout=10)
        assert head.status_code == 200 and head.headers["content-length"] == "5" and not head.content
        assert requests.head(f"{url}/api/v1/files/docs/nope.txt", headers=auth, timeout=10).status_code == 404
    finally:
        log = stop_server(server)
    assert "Warning" not in log and "Duplicate Operation ID" not in log, log
    operations = [(path, method, op["operationId"])
                  for path, item in spec.json()["paths"].items() for method, op in item.items()]
    ids = [op_id for _, _, op_id in operations]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
    files = {method for path, method, _ in operations if path == "/api/v1/files/{path}"}
    assert files == {"get", "head", "put"}
