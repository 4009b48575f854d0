"""The dashboard in a real browser: headless Chromium (Playwright) against a real
`controller serve` with a token, and a real agent running a real pipeline.

Needs Debian's chromium (/usr/bin/chromium, or CONVEYOR_CHROMIUM) and the playwright
package; without them these tests skip, except under CI=true where they fail.
Screenshots are saved under tests/artifacts/ (printed at the end of each test).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from controller.models import TaskRecord, TaskStatus
from tests.conftest import _need
from tests.helpers_dashboard import (
    Stack,
    node_state,
    pipeline_with_nodes,
    set_nodes,
    start_live_pipeline,
    start_stack,
    stop_stack,
    synthetic_pipeline,
)

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("CONVEYOR_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
TOKEN = "browser-s3cret"
#: Most seconds a 200-step pipeline page may take from navigation to every step drawn.
RENDER_BUDGET_S = 2.0


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium for the module."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _need("playwright is not installed (pip install -e '.[test]')")
    if not os.access(CHROMIUM, os.X_OK):
        _need(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def stack(browser: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Server (with a token) and an agent on services and default, for the module."""
    started = start_stack(tmp_path_factory.mktemp("dashboard") / "home", TOKEN)
    yield started
    stop_stack(started)


@pytest.fixture(scope="module")
def live(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> TaskRecord:
    """The live pipeline, enqueued on 'services' (prepare → features, train → ...)."""
    return start_live_pipeline(stack, f"live-{uuid.uuid4().hex[:6]}", tmp_path_factory.mktemp("live"))


class Page:
    """A browser tab logged in with the token (the cookie), collecting script errors."""

    def __init__(self, browser: Any, stack: Stack) -> None:
        self.context = browser.new_context(viewport={"width": 1400, "height": 900})
        self.context.set_default_timeout(15_000)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("pageerror", lambda exc: self.errors.append(f"page error: {exc}"))
        self.page.on("console", lambda msg: msg.type == "error" and self.errors.append(f"console: {msg.text}"))
        self.url = stack.url
        answer = self.page.goto(f"{stack.url}/?token={TOKEN}")
        assert answer is not None and answer.ok

    def open(self, route: str) -> None:
        self.page.goto(f"{self.url}/#{route}")

    def wait_until(self, what: str, check: Callable[[], Any], timeout_s: float = 15) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            got = check()
            if got:
                return got
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.1)

    def step_statuses(self) -> dict[str, str]:
        return self.page.eval_on_selector_all(
            "svg.dag g.node", "els => Object.fromEntries(els.map(e => [e.dataset.step, e.dataset.status]))")

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / name
        self.page.screenshot(path=str(path), full_page=True)
        print(f"screenshot: {path}")
        return path


@pytest.fixture
def tab(browser: Any, stack: Stack) -> Iterator[Page]:
    page = Page(browser, stack)
    yield page
    page.context.close()
    assert not page.errors, page.errors


def recorded_nodes(stack: Stack, task_id: str) -> dict[str, str]:
    state = getattr(stack.backend.get_task(task_id).runtime, "pipeline", None) or {}
    return {name: node["status"] for name, node in state.get("nodes", {}).items()}


#: For each edge, the nodes (other than its two ends) its drawn path passes through:
#: points every pixel along the path, tested against every node's box.
EDGES_THROUGH_NODES_JS = """() => {
  const boxes = [...document.querySelectorAll('svg.dag g.node')].map((g) => {
    const [x, y] = g.getAttribute('transform').match(/-?[\\d.]+/g).map(Number);
    const r = g.querySelector('rect');
    return {name: g.dataset.step, x, y, w: Number(r.getAttribute('width')), h: Number(r.getAttribute('height'))};
  });
  const hits = [];
  for (const path of document.querySelectorAll('svg.dag path.edge')) {
    const {from, to} = path.dataset;
    const length = path.getTotalLength();
    for (let at = 0; at <= length; at += 1) {
      const p = path.getPointAtLength(at);
      for (const b of boxes) {
        if (b.name === from || b.name === to) continue;
        if (p.x > b.x && p.x < b.x + b.w && p.y > b.y && p.y < b.y + b.h) {
          hits.push(`${from}>${to} behind ${b.name} at (${p.x.toFixed(0)}, ${p.y.toFixed(0)})`);
          break;
        }
      }
    }
  }
  return [...new Set(hits.map((h) => h.split(' at ')[0]))];
}"""

#: The timeline's bars: step → [{phase, start, end, left, right}] (times in s, pixels).
TIMELINE_JS = """() => Object.fromEntries([...document.querySelectorAll('#timeline g.tl-row')].map((g) => [
  g.dataset.step, [...g.querySelectorAll('rect.tl-bar')].map((r) => {
    const box = r.getBoundingClientRect();
    return {phase: r.dataset.phase, start: Number(r.dataset.start), end: Number(r.dataset.end),
            left: box.left, right: box.right};
  })]))"""


def timeline(tab: Page) -> dict[str, list[dict[str, Any]]]:
    """What the run's timeline shows, per step."""
    return tab.page.evaluate(TIMELINE_JS)


# ----------------------------------------------------------- a live pipeline
def test_the_dag_shows_every_step_and_follows_the_run_live(tab: Page, stack: Stack, live: TaskRecord) -> None:
    tab.open(f"/pipelines/{live.id}")
    tab.page.wait_for_selector("svg.dag g.node")
    tab.page.evaluate("window.__sameDocument = true")
    assert set(tab.step_statuses()) == {"prepare", "features", "train", "evaluate", "report"}
    first_seen = tab.step_statuses()["prepare"]
    # every step shows the status the controller recorded (the page polls every second)
    tab.wait_until("page statuses = recorded statuses",
                   lambda: recorded_nodes(stack, live.id) and tab.step_statuses() == recorded_nodes(stack, live.id))
    # ... and follows the run without a reload: prepare finishes, train runs
    tab.wait_until("prepare completed on the page", lambda: tab.step_statuses()["prepare"] == "completed", 60)
    tab.wait_until("train running on the page", lambda: tab.step_statuses()["train"] == "running", 60)
    tab.wait_until("features completed on the page", lambda: tab.step_statuses()["features"] == "completed", 60)
    assert tab.page.evaluate("window.__sameDocument") is True, "the page was reloaded"
    print(f"prepare was {first_seen!r} when the page opened")
    # the edges come from the parents
    edges = tab.page.eval_on_selector_all("svg.dag path.edge", "els => els.map(e => e.dataset.from + '>' + e.dataset.to)")
    assert sorted(edges) == sorted(["prepare>features", "prepare>train", "train>evaluate", "features>evaluate",
                                    "evaluate>report"])
    # hovering a step shows its parameters, overrides highlighted against the base task
    tab.page.hover('g.node[data-step="train"]')
    details = tab.page.locator("#step-details")
    details.locator('tr[data-param="General/epochs"]').wait_for()
    assert details.locator("h2").inner_text().startswith("train")
    epochs = details.locator('tr[data-param="General/epochs"]')
    assert "overridden" in epochs.get_attribute("class") and "base: 1" in epochs.inner_text()
    assert "${pipeline.epochs}" in epochs.inner_text()
    assert "vm" in details.inner_text() or "Worker" in details.inner_text()
    assert "Queue" in details.inner_text() and "Started" in details.inner_text()
    tab.screenshot("dashboard-pipeline.png")


def test_the_timeline_shows_each_step_queued_then_running_and_grows_live(
    tab: Page, stack: Stack, live: TaskRecord
) -> None:
    tab.open(f"/pipelines/{live.id}")
    tab.wait_until("train running on the page", lambda: tab.step_statuses().get("train") == "running", 60)
    tab.wait_until("train's running bar", lambda: any(b["phase"] == "running" for b in timeline(tab).get("train", [])))
    bars = timeline(tab)
    assert set(bars) == {"prepare", "features", "train", "evaluate", "report"}
    assert list(bars)[0] == "prepare" and list(bars)[-2:] == ["evaluate", "report"]  # the DAG's layer order
    # the times are the step tasks' own: queued_at, started_at, finished_at
    tasks = {t.name: t for t in stack.backend.query_tasks(parent=live.id)}
    prepare = {b["phase"]: b for b in bars["prepare"]}
    assert set(prepare) == {"queued", "running"}
    assert prepare["queued"]["start"] == pytest.approx(tasks["prepare"].queued_at, abs=0.01)
    assert prepare["running"]["start"] == pytest.approx(tasks["prepare"].started_at, abs=0.01)
    assert prepare["running"]["end"] == pytest.approx(tasks["prepare"].finished_at, abs=0.01)
    assert prepare["queued"]["end"] == prepare["running"]["start"]
    train = {b["phase"]: b for b in bars["train"]}
    assert train["queued"]["start"] == pytest.approx(tasks["train"].queued_at, abs=0.01)
    assert train["running"]["start"] == pytest.approx(tasks["train"].started_at, abs=0.01)
    # drawn in time order: prepare ran before train was queued, left of it
    assert prepare["running"]["end"] <= train["queued"]["start"]
    # (+3 px: a bar is at least 2 px wide, even for a step queued for a few milliseconds)
    assert prepare["running"]["right"] <= train["queued"]["left"] + 3
    assert train["queued"]["right"] <= train["running"]["left"] + 3
    assert train["queued"]["left"] < train["running"]["left"]
    assert bars["evaluate"] == [] and bars["report"] == []  # not queued yet: no bar
    # the running bar grows without a reload (its end is "now")
    end = train["running"]["end"]
    tab.wait_until("train's bar grows", lambda: {b["phase"]: b for b in timeline(tab)["train"]}["running"]["end"] > end + 1.5)
    assert tab.page.get_attribute("#timeline g.tl-row[data-step='train']", "data-status") == "running"
    tab.page.locator("#timeline-section").screenshot(path=str(ARTIFACTS / "dashboard-timeline.png"))


def test_the_log_of_a_running_step_shows_new_lines(tab: Page, stack: Stack, live: TaskRecord) -> None:
    train = next(t for t in stack.backend.query_tasks(parent=live.id, name="train"))
    assert train.status == TaskStatus.in_progress, "train should still be running"
    tab.open(f"/tasks/{train.id}")
    log = tab.page.locator("#log")
    tab.wait_until("the first ticks", lambda: "tick" in log.inner_text())
    before = int(log.get_attribute("data-lines"))
    tab.wait_until("new lines", lambda: int(log.get_attribute("data-lines")) >= before + 3)
    newest = stack.backend.get_log(train.id, tail=1)[0]
    tab.wait_until("the newest line", lambda: newest.line in log.inner_text())
    assert "params" in log.inner_text()  # the first line is still there
    assert tab.page.locator("#task-summary").inner_text().count("running") >= 1
    tab.screenshot("dashboard-task-log.png")


def test_abort_from_the_page_stops_the_pipeline_and_its_running_step(
    tab: Page, stack: Stack, live: TaskRecord
) -> None:
    tab.open(f"/pipelines/{live.id}")
    tab.page.wait_for_selector("#abort-pipeline")
    tab.page.once("dialog", lambda dialog: dialog.accept())
    tab.page.click("#abort-pipeline")
    tab.wait_until("the controller stopped",
                   lambda: stack.backend.get_task(live.id).status == TaskStatus.stopped, 30)
    tab.wait_until("the page says stopped",
                   lambda: tab.page.get_attribute("#dag", "data-run-status") == "stopped", 10)
    tab.wait_until("train aborted on the page", lambda: tab.step_statuses()["train"] == "aborted", 10)
    (train,) = stack.backend.query_tasks(parent=live.id, name="train")
    tab.wait_until("the train task stopped",  # the agent kills it after its next heartbeat
                   lambda: stack.backend.get_task(train.id).status == TaskStatus.stopped, 15)
    assert "stopped" in tab.page.locator("h1").inner_text()
    assert tab.page.locator("#enqueue-pipeline").is_visible()  # finished: it can be run again
    tab.screenshot("dashboard-pipeline-aborted.png")


# ---------------------------------------------------------------- 200 steps
def test_a_200_step_pipeline_renders_fast_and_updates_only_what_changed(tab: Page, stack: Stack) -> None:
    task = synthetic_pipeline(stack.backend, f"big-{uuid.uuid4().hex[:6]}", steps=200)
    nodes = task.runtime.pipeline["nodes"]
    started = time.perf_counter()
    tab.open(f"/pipelines/{task.id}")
    tab.page.wait_for_function("() => document.querySelectorAll('svg.dag g.node').length === 200")
    elapsed_s = time.perf_counter() - started
    draw_ms = float(tab.page.get_attribute("#dag", "data-draw-ms"))
    print(f"200 steps: page ready in {elapsed_s * 1000:.0f} ms (layout + draw {draw_ms:.0f} ms)")
    assert elapsed_s < RENDER_BUDGET_S
    assert tab.step_statuses() == {name: node["status"] for name, node in nodes.items()}
    assert tab.page.locator("svg.dag path.edge").count() == sum(len(n["parents"]) for n in nodes.values())
    # nodes do not overlap
    boxes = tab.page.eval_on_selector_all("svg.dag g.node", "els => els.map(e => e.getAttribute('transform'))")
    assert len(set(boxes)) == 200
    # a poll where nothing changed touches nothing and costs little
    tab.wait_until("an idle poll", lambda: tab.page.get_attribute("#dag", "data-changed") == "0", 5)
    idle_ms = float(tab.page.get_attribute("#dag", "data-render-ms"))
    # three steps move on: only those three are redrawn, within a poll or two
    changed = ["step_000", "step_100", "step_199"]
    for name in changed:
        nodes[name] = {**nodes[name], "status": "completed" if nodes[name]["status"] != "completed" else "failed"}
    set_nodes(stack.backend, task.id, nodes)
    tab.wait_until("the page shows the changes",
                   lambda: all(tab.step_statuses()[n] == nodes[n]["status"] for n in changed), 5)
    assert tab.page.get_attribute("#dag", "data-changed") == "3"
    update_ms = float(tab.page.get_attribute("#dag", "data-render-ms"))
    print(f"200 steps: idle poll {idle_ms:.1f} ms, update of 3 steps {update_ms:.1f} ms")
    assert idle_ms < 100 and update_ms < 100
    # hovering a step answers at once, with its overridden parameter
    t0 = time.perf_counter()
    tab.page.hover('g.node[data-step="step_150"]')
    tab.page.locator('#step-details[data-step="step_150"] tr.overridden[data-param="General/lr"]').wait_for()
    hover_ms = (time.perf_counter() - t0) * 1000
    print(f"200 steps: hover → details in {hover_ms:.0f} ms")
    assert hover_ms < 1000
    assert "base: 0.1" in tab.page.locator('#step-details tr[data-param="General/lr"]').inner_text()
    assert not tab.page.locator('#step-details tr[data-param="General/epochs"]').get_attribute("class")
    # the step table lists all of them; selecting from it selects in the graph
    assert tab.page.locator(".steps-table tbody tr").count() == 200
    tab.screenshot("dashboard-pipeline-200.png")
    # the list of runs shows it with its step counts
    tab.open("/pipelines")
    row = tab.page.locator(f'#pipeline-runs tr[data-id="{task.id}"]')
    row.wait_for()
    assert "/200 done" in row.inner_text() and "2.0.0" in row.inner_text()


# ------------------------------------------------------- layer-skipping edges
def test_an_edge_that_skips_a_layer_goes_around_the_step_in_between_and_cached_steps_show_a_mark(
    tab: Page, stack: Stack
) -> None:
    now = time.time()
    nodes = {
        "a": node_state("a", [], "completed", now - 100, now - 80),
        "b": node_state("b", ["a"], "cached", None, now - 79),
        "c": node_state("c", ["a", "b"], "completed", now - 78, now - 50),
        "d": node_state("d", ["a", "c"], "skipped", None, now - 49),
        "e": node_state("e", ["a", "b", "c", "d"], "running", now - 40, None),
    }
    task = pipeline_with_nodes(stack.backend, f"skip-{uuid.uuid4().hex[:6]}", nodes)
    tab.open(f"/pipelines/{task.id}")
    tab.page.wait_for_function("() => document.querySelectorAll('svg.dag g.node').length === 5")
    edges = tab.page.eval_on_selector_all("svg.dag path.edge", "els => els.map(e => e.dataset.from + '>' + e.dataset.to)")
    assert sorted(edges) == sorted(["a>b", "a>c", "b>c", "a>d", "c>d", "a>e", "b>e", "c>e", "d>e"])
    # one step per layer: a straight line a → c would run right through b
    columns = tab.page.eval_on_selector_all("svg.dag g.node", "els => els.map(e => e.getAttribute('transform'))")
    assert len({c.split(",")[0] for c in columns}) == 5
    assert tab.page.evaluate(EDGES_THROUGH_NODES_JS) == []
    tab.screenshot("dashboard-skipping-edges.png")
    # the timeline: bars from the recorded times, marks for cached and skipped steps
    bars = timeline(tab)
    assert [b["phase"] for b in bars["a"]] == ["running"] and bars["a"][0]["start"] == pytest.approx(now - 100, abs=0.01)
    assert [b["phase"] for b in bars["b"]] == ["cached"] and bars["b"][0]["start"] == pytest.approx(now - 79, abs=0.01)
    assert [b["phase"] for b in bars["d"]] == ["skipped"]
    assert bars["a"][0]["right"] <= bars["b"][0]["left"] + 4 <= bars["c"][0]["left"] + 4
    assert bars["e"][0]["phase"] == "running" and bars["e"][0]["end"] >= now


def test_the_200_step_dag_draws_no_edge_behind_a_step(tab: Page, stack: Stack) -> None:
    rng_nodes = synthetic_pipeline(stack.backend, f"lanes-{uuid.uuid4().hex[:6]}", steps=60, seed=3)
    nodes = rng_nodes.runtime.pipeline["nodes"]
    # make some edges skip layers: later steps also depend on the first one
    for name in list(nodes)[-12:]:
        nodes[name] = {**nodes[name], "parents": sorted({*nodes[name]["parents"], "step_000", "step_010"})}
    set_nodes(stack.backend, rng_nodes.id, nodes)
    tab.open(f"/pipelines/{rng_nodes.id}")
    tab.page.wait_for_function("() => document.querySelectorAll('svg.dag g.node').length === 60")
    tab.wait_until("the skipping edges", lambda: tab.page.locator('svg.dag path.edge[data-from="step_000"]').count() >= 12)
    assert tab.page.evaluate(EDGES_THROUGH_NODES_JS) == []
    assert tab.page.locator("#timeline g.tl-row").count() == 60


# ------------------------------------------------------- queues and workers
def test_a_queue_with_work_and_no_agent_is_flagged_on_the_queues_and_pipeline_pages(
    tab: Page, stack: Stack
) -> None:
    stack.backend.create_queue("gpu")
    waiting = stack.backend.create_task({"name": "needs a gpu", "project": "q"})
    stack.backend.enqueue(waiting.id, "gpu")
    tab.open("/queues")
    banner = tab.page.locator('#queue-problems [data-queue="gpu"]')
    banner.wait_for()
    assert "no agent listens on 'gpu'" in banner.inner_text() and "1 task waiting" in banner.inner_text()
    assert not tab.page.locator('#queue-problems [data-queue="default"]').count()
    workers = tab.page.locator("#workers tbody tr")
    assert workers.count() == 1
    assert "services, default" in workers.inner_text() and "%" in workers.inner_text()
    gpu_row = tab.page.locator('#queues tr[data-queue="gpu"]')
    assert "no live agent" in gpu_row.inner_text()
    gpu_row.locator("button").click()
    tab.page.locator(f'a[href="#/tasks/{waiting.id}"]').first.wait_for()
    tab.screenshot("dashboard-queues.png")
    # a pipeline waiting on that queue says why it is pending
    task = synthetic_pipeline(stack.backend, f"gpu-{uuid.uuid4().hex[:6]}", steps=3)
    nodes = {n: {**v, "status": "queued", "queue": "gpu", "started": None, "ended": None}
             for n, v in task.runtime.pipeline["nodes"].items()}
    set_nodes(stack.backend, task.id, nodes)
    tab.open(f"/pipelines/{task.id}")
    tab.page.locator(".hints").get_by_text("no agent listens on 'gpu'").wait_for()
    stack.backend.abort_task(waiting.id)


# ----------------------------------------------------------------- a task
def test_a_task_page_shows_its_record_artifacts_scalars_and_re_enqueues(tab: Page, stack: Stack) -> None:
    b = stack.backend
    task = b.create_task({
        "name": "finished", "project": "t", "script": {"code": "print('again')", "entry_point": "again.py",
                                                        "repository": "https://example.com/repo.git", "commit": "abc123"},
        "packages": ["numpy>=1.24"], "container": {"image": "python:3.11", "arguments": "--shm-size 1g"},
        "hyperparams": {"General": {"lr": 0.5}}, "configuration": {"model": {"layers": [4, 2]}},
        "execution": {"queue": "default"},
    })
    b.set_status(task.id, TaskStatus.in_progress, reason="started")
    data = json.dumps({"rows": [[1, 2]]}).encode()
    path = f"t/{task.id}/artifacts/dataset/dataset.json"
    requests.put(f"{stack.url}/api/v1/files/{path}", data=data,
                 headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).raise_for_status()
    b.edit_task(task.id, {"artifacts": {
        "dataset": {"uri": f"{stack.url}/api/v1/files/{path}", "type": "json", "size": len(data)},
        "elsewhere": {"uri": "s3://bucket/x.txt", "type": "str", "size": 3, "preview": "abc"},
        "by_reference": {"uri": f"conveyor://files/{path}", "type": "json", "size": len(data)},
    }}, force=True)
    b.report_scalars(task.id, [{"title": "loss", "series": s, "iteration": i, "value": 1 / (i + 1) + k}
                               for k, s in enumerate(["train", "val"]) for i in range(20)]
                     + [{"title": "loss", "series": "train", "iteration": 20, "value": float("nan")}])
    b.set_status(task.id, TaskStatus.completed, reason="completed", message="exit code 0")

    tab.open(f"/tasks/{task.id}")
    tab.page.locator("#task-scalars svg.plot").wait_for()
    assert tab.page.locator("#task-scalars path.line").count() == 2
    assert "1 not finite" in tab.page.locator("#task-scalars").inner_text()
    text = tab.page.locator("main").inner_text()
    for expected in ("abc123", "https://example.com/repo.git", "numpy>=1.24", "python:3.11", "--shm-size 1g",
                     "lr", "0.5", "model"):
        assert expected in text, expected
    assert tab.page.locator("#task-history tbody tr").count() == 3
    link = tab.page.locator('[data-name="dataset"] a[download]')
    href = link.get_attribute("href")
    assert href.startswith("api/v1/files/")  # same origin: the token cookie goes along
    assert tab.page.request.get(f"{stack.url}/{href}").body() == data
    # a location-independent record links to the files endpoint of the server the page came from
    assert tab.page.locator('[data-name="by_reference"] a[download]').get_attribute("href") == href
    tab.page.locator('[data-name="dataset"] .preview').get_by_text('"rows"').wait_for()
    assert "abc" in tab.page.locator('[data-name="elsewhere"] .preview').inner_text()
    tab.screenshot("dashboard-task.png")
    # re-enqueue the finished task from the page: it runs again
    tab.page.once("dialog", lambda dialog: dialog.accept())
    tab.page.click("#enqueue-task")
    tab.wait_until("a second run", lambda: b.get_task(task.id).runtime.attempt >= 2
                   or b.get_task(task.id).status == TaskStatus.queued, 10)
    tab.wait_until("the page shows the re-run",
                   lambda: tab.page.locator("#task-history tbody tr").count() > 3, 10)


# ----------------------------------------------------------- error states
def test_without_the_token_the_page_says_how_to_pass_it_and_the_cookie_is_strict(
    browser: Any, stack: Stack
) -> None:
    context = browser.new_context()
    page = context.new_page()
    try:
        answer = page.goto(f"{stack.url}/")
        assert answer is not None and answer.status == 401
        assert "?token=YOUR_TOKEN" in page.content()
        page.goto(f"{stack.url}/?token={TOKEN}")
        assert page.url == f"{stack.url}/"  # the token left the address bar
        page.locator("h1", has_text="Pipelines").wait_for()
        (cookie,) = context.cookies()
        assert cookie["name"] == "conveyor_token" and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        # the cookie goes away (e.g. the browser session ended): the page says what to do
        context.clear_cookies()
        page.locator("#banner", has_text="Not authorized").wait_for(timeout=10_000)
        assert "?token=" in page.locator("#banner").inner_text()
    finally:
        context.close()


def test_an_unreachable_server_is_reported_and_the_page_recovers(tab: Page) -> None:
    tab.open("/queues")
    tab.page.locator("#queues").wait_for()
    tab.page.route("**/api/v1/**", lambda route: route.abort())
    banner = tab.page.locator("#banner", has_text="Server unreachable")
    banner.wait_for(timeout=10_000)
    tab.page.unroute("**/api/v1/**")
    banner.wait_for(state="hidden", timeout=10_000)
    tab.errors = [e for e in tab.errors if "Failed to load resource" not in e]
