// One pipeline run: header, actions, why-pending hints, the live DAG, step details and
// the run's timeline (its step tasks are read again whenever a step changes state).

import { api, poll, serverNow } from "./api.js";
import { DagView, nodeDuration } from "./dag.js";
import {
  badge, elapsed, errorBox, fill, fmtDuration, fmtTime, fmtValue, h, kvList, section, setText,
  taskLink,
} from "./dom.js";
import { actionButton } from "./actions.js";
import { idleQueueProblems } from "./queues.js";
import { isTerminal } from "./statuses.js";
import { TimelineView } from "./timeline.js";

const POLL_ACTIVE_MS = 1000;
const POLL_DONE_MS = 5000;
const QUEUES_POLL_MS = 3000;
/** Most step tasks read for the timeline (the store's largest page). */
const MAX_STEP_TASKS = 10000;
const ACTIVE_NODE = new Set(["launching", "queued", "running"]);
const NODE_STATUSES = ["pending", "launching", "queued", "running", "completed", "failed",
  "aborted", "cached", "skipped"];

export async function mount(root, { id, query, signal }) {
  const page = new PipelinePage(root, id, signal);
  page.selected = query.get("step");
  await page.start();
}

class PipelinePage {
  constructor(root, id, signal) {
    this.root = root;
    this.id = id;
    this.signal = signal;
    this.run = null;
    this.nodeSig = new Map(); // step → JSON of its last drawn state
    this.selected = null;
    this.hovered = null;
    this.baseTasks = new Map(); // base task id → Promise of its record
    this.queueProblems = [];
    this.stepTasks = new Map(); // step task id → its record (for the timeline's times)
    this.stepTasksKey = null; // the node states the step tasks were last read for
  }

  async start() {
    this.run = await api.get(`pipelines/${encodeURIComponent(this.id)}`, null, this.signal);
    await this.loadStepTasks(this.run).catch(() => {}); // the timeline falls back to the DAG's times
    this.build();
    this.apply(this.run, true);
    poll(() => this.refresh(), POLL_ACTIVE_MS, this.signal, (err) => this.showError(err));
    poll(() => this.refreshQueues(), QUEUES_POLL_MS, this.signal, () => {});
    // Durations of running steps tick between polls without any request.
    const ticker = setInterval(() => this.tick(), 1000);
    this.signal.addEventListener("abort", () => clearInterval(ticker));
  }

  build() {
    this.title = h("h1", {});
    this.headerInfo = h("div", { class: "header-info" });
    this.actions = h("div", { class: "actions" });
    this.hints = h("div", { class: "hints", "aria-live": "polite" });
    this.error = h("div", { "aria-live": "assertive" });
    this.params = h("div", { class: "params" });
    this.zoomLabel = h("span", { class: "muted zoom-label", "aria-live": "polite" });
    const zoom = (f) => () => {
      this.dag.setScale(f === null ? null : Math.min(2, Math.max(0.2, this.dag.currentScale() * f)));
      this.showZoom();
    };
    const toolbar = h("div", { class: "toolbar", role: "toolbar", "aria-label": "Zoom" },
      h("button", { type: "button", on: { click: zoom(1 / 1.25) }, "aria-label": "Zoom out", text: "−" }),
      h("button", { type: "button", on: { click: zoom(null) }, text: "Fit" }),
      h("button", { type: "button", on: { click: zoom(1.25) }, "aria-label": "Zoom in", text: "+" }),
      this.zoomLabel, legend());
    this.dagBox = h("div", { class: "dag-box", id: "dag" });
    this.timelineBox = h("div", { class: "timeline-box", id: "timeline" });
    this.details = h("aside", { class: "step-details card", id: "step-details", "aria-live": "polite",
      "aria-label": "Step details" });
    this.stepsTable = h("tbody", {});
    this.stepsCount = h("span", {});
    fill(this.root,
      h("nav", { class: "crumbs", "aria-label": "Breadcrumb" }, h("a", { href: "#/pipelines", text: "Pipelines" }), " / ",
        h("span", { text: this.id })),
      h("div", { class: "page-head" }, this.title, this.actions),
      this.headerInfo, this.hints, this.error,
      h("div", { class: "dag-layout" },
        section("Steps", "dag-section", toolbar, this.dagBox),
        this.details),
      section("Timeline", "timeline-section",
        h("p", { class: "muted small", text: "Each step over time: queued (dashed), running (its status colour), " +
          "served from the cache or skipped (a mark). Hover over a row for its times." }),
        this.timelineBox),
      section("Pipeline parameters", "pipeline-params", this.params),
      h("details", { class: "card steps-list" },
        h("summary", {}, "All steps as a table (", this.stepsCount, ")"),
        h("table", { class: "steps-table" },
          h("thead", {}, h("tr", {}, ["Step", "Status", "Queue", "Worker", "Started", "Duration", "Task"]
            .map((c) => h("th", { scope: "col", text: c })))),
          this.stepsTable)));
    this.dag = new DagView(this.dagBox, {
      onHover: (name) => {
        if (name === this.hovered) return; // pointerover fires for every part of a node
        this.hovered = name;
        this.renderDetails();
      },
      onSelect: (name) => this.select(name),
    });
    this.timeline = new TimelineView(this.timelineBox);
    this.resizeObserver = new ResizeObserver(() => {
      this.dag.applyScale();
      this.showZoom();
      if (this.run) this.timeline.place(this.run.nodes, this.stepTasks, serverNow());
    });
    this.resizeObserver.observe(this.dagBox);
    this.resizeObserver.observe(this.timelineBox);
    this.signal.addEventListener("abort", () => this.resizeObserver.disconnect());
  }

  showZoom() {
    setText(this.zoomLabel, `${Math.round(this.dag.currentScale() * 100)} %${this.dag.scale === null ? " (fit)" : ""}`);
  }

  async refresh() {
    const run = await api.get(`pipelines/${encodeURIComponent(this.id)}`, null, this.signal);
    const tasksChanged = await this.loadStepTasks(run);
    this.error.replaceChildren();
    this.apply(run, false, tasksChanged);
    return isTerminal(run.status) ? POLL_DONE_MS : POLL_ACTIVE_MS;
  }

  /**
   * Read the run's step tasks (queued_at, started_at, finished_at) when a step's task or
   * state changed since the last read; true when they were read.
   */
  async loadStepTasks(run) {
    const launched = Object.values(run.nodes).filter((n) => n.task_id);
    const key = JSON.stringify(launched.map((n) => [n.name, n.task_id, n.status, n.retries]));
    if (key === this.stepTasksKey) return false;
    let records = [];
    if (launched.length) {
      records = await api.get("tasks", { parent: this.id, limit: MAX_STEP_TASKS }, this.signal);
    }
    this.stepTasks = new Map(records.map((r) => [r.id, r]));
    this.stepTasksKey = key;
    return true;
  }

  showError(err) {
    fill(this.error, errorBox(err));
  }

  /** Bring the page up to `run`; only the steps whose state changed are touched. */
  apply(run, first, tasksChanged = false) {
    const previous = this.run;
    this.run = run;
    const t0 = performance.now();
    const now = serverNow();
    const headerSig = JSON.stringify([run.status, run.pipeline_status, run.status_message, run.status_reason,
      run.worker, run.queue, run.started_at, run.finished_at, run.version]);
    if (first || headerSig !== this.headerSig) {
      this.headerSig = headerSig;
      this.renderHeader();
    }
    if (first || JSON.stringify(previous.parameters) !== JSON.stringify(run.parameters)) {
      this.renderParameters();
    }
    let changed = 0;
    if (first || this.dag.structureChanged(run.nodes)) {
      this.dag.draw(run.nodes, now);
      this.timeline.draw(this.dag.order);
      this.renderStepsTable();
      this.nodeSig.clear();
      for (const node of Object.values(run.nodes)) this.nodeSig.set(node.name, JSON.stringify(node));
      changed = Object.keys(run.nodes).length;
      this.showZoom();
      this.dagBox.dataset.drawMs = (performance.now() - t0).toFixed(1);
    } else {
      for (const node of Object.values(run.nodes)) {
        const sig = JSON.stringify(node);
        if (this.nodeSig.get(node.name) === sig) continue;
        this.nodeSig.set(node.name, sig);
        this.dag.update(node, now);
        this.updateStepRow(node);
        changed++;
        if (node.name === this.shownStep()) this.renderDetails();
      }
    }
    if (first) {
      if (this.selected && run.nodes[this.selected]) this.select(this.selected, false);
      else this.renderDetails();
    }
    if (changed || tasksChanged) this.timeline.place(run.nodes, this.stepTasks, now);
    this.renderDurations();
    this.renderHints();
    const ms = performance.now() - t0;
    // For tests and the curious: how long the last update took and how much it touched.
    this.dagBox.dataset.renderMs = ms.toFixed(1);
    this.dagBox.dataset.changed = String(changed);
    this.dagBox.dataset.runStatus = run.status;
  }

  renderHeader() {
    const run = this.run;
    fill(this.title, `${run.name} `, h("span", { class: "run-no", text: `#${run.run}` }), " ", badge(run.status));
    document.title = `${run.name} #${run.run} · Conveyor`;
    this.durationEl = h("span", {});
    fill(this.headerInfo, kvList([
      ["Project", run.project || "–"],
      ["Version", run.version || "–"],
      ["Pipeline status", run.pipeline_status || "not started"],
      ["Started", fmtTime(run.started_at)],
      ["Duration", this.durationEl],
      ["Status message", run.status_message || run.status_reason || "–"],
      ["Controller task", taskLink(run.id, run.task_name)],
      ["Queue", run.queue || "–"],
      ["Worker", run.worker || "–"],
    ]));
    const buttons = [];
    if (!isTerminal(run.status)) {
      buttons.push(actionButton("Abort pipeline", `tasks/${encodeURIComponent(run.id)}/abort`, {
        confirm: `Abort pipeline "${run.name}" #${run.run}? Its running steps are aborted too.`,
        danger: true, id: "abort-pipeline", onDone: () => this.refresh(),
      }));
    } else {
      buttons.push(actionButton("Run again", `tasks/${encodeURIComponent(run.id)}/enqueue`, {
        confirm: `Enqueue pipeline "${run.name}" again${run.queue ? ` on '${run.queue}'` : ""}?`,
        id: "enqueue-pipeline", onDone: () => this.refresh(),
      }));
    }
    fill(this.actions, buttons);
    this.renderDurations();
  }

  renderParameters() {
    const entries = Object.entries(this.run.parameters || {});
    if (!entries.length) fill(this.params, h("p", { class: "muted", text: "No pipeline parameters." }));
    else fill(this.params, kvList(entries.map(([k, v]) => [k, fmtValue(v)])));
  }

  renderDurations() {
    if (this.durationEl) {
      const run = this.run;
      setText(this.durationEl, fmtDuration(run.started_at ? elapsed(run.started_at, isTerminal(run.status) ? run.finished_at : null) : null));
    }
  }

  tick() {
    const now = serverNow();
    this.renderDurations();
    let active = false;
    for (const node of Object.values(this.run.nodes)) {
      if (node.status === "running") this.dag.update(node, now);
      if (ACTIVE_NODE.has(node.status)) active = true;
    }
    if (active) this.timeline.place(this.run.nodes, this.stepTasks, now); // running bars grow
  }

  // ------------------------------------------------------------ steps table
  renderStepsTable() {
    this.rows = new Map();
    const rows = Object.values(this.run.nodes).map((node) => {
      const tr = h("tr", { dataset: { step: node.name } });
      this.rows.set(node.name, tr);
      this.fillStepRow(tr, node);
      return tr;
    });
    this.stepsTable.replaceChildren(...rows);
    setText(this.stepsCount, `${rows.length}`);
  }

  updateStepRow(node) {
    const tr = this.rows && this.rows.get(node.name);
    if (tr) this.fillStepRow(tr, node);
  }

  fillStepRow(tr, node) {
    const select = h("button", { type: "button", class: "linklike", text: node.name,
      on: { click: () => { this.select(node.name); this.dag.scrollTo(node.name); } } });
    fill(tr, ...[select, badge(node.status || "pending"), node.queue || "–", node.worker || "–",
      fmtTime(node.started), fmtDuration(nodeDuration(node, serverNow())),
      node.task_id ? taskLink(node.task_id) : "–"].map((c) => h("td", {}, c)));
  }

  // ---------------------------------------------------------------- details
  shownStep() {
    return this.hovered || this.selected;
  }

  select(name, updateUrl = true) {
    this.selected = this.selected === name && updateUrl ? null : name;
    this.dag.setSelected(this.selected);
    this.renderDetails();
    if (updateUrl) {
      const hash = `#/pipelines/${encodeURIComponent(this.id)}${this.selected ? `?step=${encodeURIComponent(this.selected)}` : ""}`;
      history.replaceState(null, "", hash);
    }
  }

  renderDetails() {
    const name = this.shownStep();
    const node = name && this.run.nodes[name];
    if (!node) {
      fill(this.details, h("h2", { text: "Step details" }),
        h("p", { class: "muted", text: "Hover over a step, or select it (click, or Tab and Enter), to see its parameters, queue, worker, timings and status." }));
      return;
    }
    this.details.dataset.step = node.name;
    const params = h("div", { class: "step-params" }, h("p", { class: "muted", text: "Loading parameters…" }));
    const buttons = [];
    if (node.task_id && ["queued", "running", "launching"].includes(node.status)) {
      buttons.push(actionButton("Abort step", `tasks/${encodeURIComponent(node.task_id)}/abort`, {
        confirm: `Abort step "${node.name}"?`, danger: true, onDone: () => this.refresh(),
      }));
    }
    fill(this.details,
      h("h2", {}, node.name, " ", badge(node.status || "pending"),
        this.selected === node.name ? h("span", { class: "muted small", text: " (selected)" }) : null),
      node.status_message ? h("p", { class: "status-msg", text: node.status_message }) : null,
      kvList([
        ["Task", node.task_id ? taskLink(node.task_id) : "not launched yet"],
        ["Base task", node.base_task_id ? taskLink(node.base_task_id) : (node.kind === "function" ? "function step" : "–")],
        ["Parents", (node.parents || []).join(", ") || "–"],
        ["Queue", node.queue || "default queue"],
        ["Worker", node.worker || "–"],
        ["Started", fmtTime(node.started)],
        ["Ended", fmtTime(node.ended)],
        ["Duration", fmtDuration(nodeDuration(node, serverNow()))],
        ["Retries", String(node.retries ?? 0)],
        ["Cache", node.cache ? "on" : "off"],
      ]),
      buttons.length ? h("div", { class: "actions" }, buttons) : null,
      h("h3", { text: "Parameters" }), params,
      Object.keys(node.overrides || {}).length
        ? [h("h3", { text: "Task overrides" }), kvList(Object.entries(node.overrides).map(([k, v]) => [k, fmtValue(v)]))]
        : null);
    this.fillParameters(params, node);
  }

  async fillParameters(box, node) {
    let base = {};
    if (node.base_task_id) {
      if (!this.baseTasks.has(node.base_task_id)) {
        this.baseTasks.set(node.base_task_id,
          api.get(`tasks/${encodeURIComponent(node.base_task_id)}`).catch((err) => ({ error: err })));
      }
      const record = await this.baseTasks.get(node.base_task_id);
      if (record.error) {
        fill(box, errorBox(record.error));
        return;
      }
      base = flattenHyperparams(record.hyperparams || {});
    }
    if (!box.isConnected) return;
    fill(box, parameterTable(base, node));
  }

  // ------------------------------------------------------------------ hints
  async refreshQueues() {
    const waiting = Object.values(this.run.nodes).some((n) => n.status === "queued") ||
      this.run.status === "queued";
    if (!waiting) {
      if (this.queueProblems.length) { this.queueProblems = []; this.renderHints(); }
      return isTerminal(this.run.status) ? 10000 : QUEUES_POLL_MS;
    }
    const [queues, workers] = await Promise.all([
      api.get("queues", null, this.signal), api.get("workers", null, this.signal)]);
    this.queueProblems = idleQueueProblems(queues, workers);
    this.renderHints();
    return QUEUES_POLL_MS;
  }

  renderHints() {
    const run = this.run;
    const used = new Set(Object.values(run.nodes).filter((n) => n.status === "queued").map((n) => n.queue || "default"));
    if (run.status === "queued") used.add(run.queue || "default");
    const problems = this.queueProblems.filter((p) => used.has(p.queue));
    const key = problems.map((p) => p.text).join("|");
    if (key === this.hintKey) return;
    this.hintKey = key;
    fill(this.hints, problems.map((p) => h("p", { class: "hint warn", role: "status" },
      h("strong", { text: "Waiting: " }), p.text, " ", h("a", { href: "#/queues", text: "Queues and workers" }))));
  }
}

function legend() {
  return h("ul", { class: "legend", "aria-label": "Step status colours" },
    NODE_STATUSES.map((st) => h("li", {}, h("span", { class: `swatch st-${st}`, "aria-hidden": "true" }), st)));
}

/** {"Section/name": value} from {section: {name: value}}. */
export function flattenHyperparams(hyperparams) {
  const flat = {};
  for (const [section, values] of Object.entries(hyperparams)) {
    for (const [name, value] of Object.entries(values || {})) flat[`${section}/${name}`] = value;
  }
  return flat;
}

function same(a, b) {
  if (a === b) return true;
  if (typeof a === "object" || typeof b === "object") return JSON.stringify(a) === JSON.stringify(b);
  return String(a) === String(b); // "0.5" on one side and 0.5 on the other are the same value
}

/**
 * The step's parameters: the base task's values with the pipeline's overrides on top.
 * A row is highlighted (and says "overridden") when its value differs from the base's;
 * before launch the overrides as written (e.g. ${pipeline.x}) are shown as pending.
 */
export function parameterTable(base, node) {
  const resolved = node.resolved_parameters || {};
  const launched = Object.keys(resolved).length > 0 || !!node.task_id;
  const written = node.parameters || {};
  const overrides = launched ? resolved : written;
  const keys = [...new Set([...Object.keys(base), ...Object.keys(overrides)])].sort();
  if (!keys.length) return h("p", { class: "muted", text: "No parameters." });
  const rows = keys.map((key) => {
    const hasOverride = key in overrides;
    const value = hasOverride ? overrides[key] : base[key];
    const overridden = hasOverride && (!(key in base) || !same(value, base[key]));
    const reference = hasOverride && launched && typeof written[key] === "string" && written[key].includes("${");
    return h("tr", { class: overridden ? "overridden" : "", dataset: { param: key } },
      h("th", { scope: "row", text: key }),
      h("td", {},
        overridden ? h("mark", { text: fmtValue(value) }) : fmtValue(value),
        overridden ? h("span", { class: "tag", text: launched ? "overridden" : "override pending" }) : null,
        overridden ? h("div", { class: "muted small", text: key in base ? `base: ${fmtValue(base[key])}` : "not in the base task" }) : null,
        reference ? h("div", { class: "muted small", text: `from ${written[key]}` }) : null));
  });
  return h("table", { class: "param-table" },
    h("thead", {}, h("tr", {}, ["Parameter", "Value"].map((c) => h("th", { scope: "col", text: c })))),
    h("tbody", {}, rows));
}
