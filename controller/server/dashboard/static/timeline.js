// The timeline of a pipeline run: one row per step, its bars over time (queued, then
// running until it ended; a mark where a step was served from the cache or skipped).
//
// Times come from the step tasks (queued_at, started_at, finished_at), falling back to
// the DAG's node state (started, ended) before the task record is known. A cached step's
// task is an earlier run's, so it shows a mark at the time the cache answered (node.ended).
// Rows are drawn once per structure; place() only moves bars (a few attribute writes per
// row), so the 1 s tick of a running step is cheap.

import { fmtDuration, fmtTime, s } from "./dom.js";

const ROW_H = 22;
const BAR_H = 12;
const AXIS_H = 22;
const LABEL_W = 170;
const PAD_RIGHT = 32;
const MIN_WIDTH_PX = 420;
const MARK_W_PX = 6;
const MIN_BAR_PX = 2;
const NAME_CHARS = 22;
const TICKS = 5;
/** Node statuses whose time is not the (earlier) task's: nothing ran in this run. */
const NOT_RUN = new Set(["cached", "skipped"]);

/**
 * The phases of one step as [{phase, start, end, status}] (seconds since the epoch):
 * "queued" (queued → started, or → now while it waits), "running" (started → ended, or
 * → now while it runs) and, for a step that did not run, a "cached"/"skipped" mark.
 * `task` is the step's task record or undefined; `now` the server's time.
 */
export function stepPhases(node, task, now) {
  const status = node.status || "pending";
  if (NOT_RUN.has(status)) {
    const at = node.ended ?? node.started;
    return at === null || at === undefined ? [] : [{ phase: status, start: at, end: at, status }];
  }
  const own = task && task.id === node.task_id ? task : null;
  const queued = own ? own.queued_at : null;
  const started = (own && own.started_at) ?? node.started ?? null;
  const ended = (own && own.finished_at) ?? node.ended ?? null;
  const active = ["launching", "queued", "running"].includes(status);
  const phases = [];
  if (queued !== null && queued !== undefined) {
    const end = started ?? ended ?? (active ? now : null);
    if (end !== null) phases.push({ phase: "queued", start: queued, end: Math.max(queued, end), status: "queued" });
  }
  if (started !== null) {
    const end = ended ?? (status === "running" ? now : null);
    if (end !== null) phases.push({ phase: "running", start: started, end: Math.max(started, end), status });
  } else if (ended !== null && !active) {
    // ended without running (aborted while queued, failed to launch): a mark
    phases.push({ phase: status, start: ended, end: ended, status });
  }
  return phases;
}

function shortName(name) {
  return name.length > NAME_CHARS ? name.slice(0, NAME_CHARS - 1) + "…" : name;
}

function phaseText(p) {
  if (p.start === p.end) return `${p.phase} at ${fmtTime(p.start)}`;
  return `${p.phase} ${fmtTime(p.start)} for ${fmtDuration(p.end - p.start)}`;
}

/**
 * The SVG timeline. Rows: <g class="tl-row" data-step data-status>, bars:
 * <rect class="tl-bar tl-PHASE st-STATUS" data-phase data-start data-end>.
 */
export class TimelineView {
  constructor(container) {
    this.container = container;
    this.svg = s("svg", { class: "timeline", role: "img", "aria-label": "Timeline of the steps" });
    this.container.append(this.svg);
    this.rows = new Map(); // name → {g, bars: [rect], title}
    this.order = [];
    this.widthPx = MIN_WIDTH_PX;
  }

  /** Draw one row per step, in `order` (the DAG's layer order). */
  draw(order) {
    this.order = order;
    this.rows.clear();
    this.axis = s("g", { class: "tl-axis" });
    this.nowLine = s("line", { class: "tl-now", y1: AXIS_H - 4, y2: AXIS_H + order.length * ROW_H });
    const rows = order.map((name, i) => {
      const title = s("title", { text: name });
      const g = s("g", { class: "tl-row", transform: `translate(0,${AXIS_H + i * ROW_H})`, dataset: { step: name } },
        title, s("rect", { class: "tl-stripe", x: 0, y: 0, height: ROW_H, width: 0 }),
        s("text", { class: "tl-name", x: 4, y: ROW_H / 2 + 4, text: shortName(name) }));
      const note = s("text", { class: "tl-note", x: LABEL_W + 4, y: ROW_H / 2 + 4 });
      g.append(note);
      this.rows.set(name, { g, bars: [], title, note, stripe: g.children[1] });
      return g;
    });
    this.svg.replaceChildren(this.axis, ...rows, this.nowLine);
    this.svg.dataset.steps = String(order.length);
  }

  /** Put every bar where `nodes` (name → state) and `tasks` (id → record) say, at `now`. */
  place(nodes, tasks, now) {
    const phasesOf = new Map();
    let t0 = Infinity, t1 = -Infinity, active = false;
    for (const name of this.order) {
      const node = nodes[name];
      if (!node) continue;
      const phases = stepPhases(node, node.task_id ? tasks.get(node.task_id) : undefined, now);
      phasesOf.set(name, phases);
      for (const p of phases) {
        t0 = Math.min(t0, p.start);
        t1 = Math.max(t1, p.end);
      }
      if (["launching", "queued", "running"].includes(node.status)) active = true;
    }
    if (active) t1 = Math.max(t1, now);
    const empty = t0 === Infinity;
    if (empty) { t0 = now; t1 = now + 1; }
    const span = Math.max(1, t1 - t0);
    const width = Math.max(MIN_WIDTH_PX, this.container.clientWidth - 4);
    const plotW = width - LABEL_W - PAD_RIGHT;
    const x = (t) => LABEL_W + ((t - t0) / span) * plotW;
    const height = AXIS_H + this.order.length * ROW_H + 4;
    this.svg.setAttribute("width", String(width));
    this.svg.setAttribute("height", String(height));
    this.svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    this.svg.dataset.start = String(t0);
    this.svg.dataset.end = String(t1);
    this.drawAxis(t0, span, x, empty);
    if (active && !empty) {
      const nx = String(x(now));
      this.nowLine.setAttribute("x1", nx);
      this.nowLine.setAttribute("x2", nx);
      this.nowLine.removeAttribute("visibility");
    } else this.nowLine.setAttribute("visibility", "hidden");
    for (const name of this.order) {
      const row = this.rows.get(name);
      const node = nodes[name];
      const phases = phasesOf.get(name) || [];
      const status = (node && node.status) || "pending";
      row.g.dataset.status = status;
      row.stripe.setAttribute("width", String(width));
      while (row.bars.length < phases.length) {
        const rect = s("rect", { y: (ROW_H - BAR_H) / 2, height: BAR_H, rx: 2 });
        row.g.append(rect);
        row.bars.push(rect);
      }
      while (row.bars.length > phases.length) row.bars.pop().remove();
      phases.forEach((p, i) => {
        const rect = row.bars[i];
        const mark = p.start === p.end && p.phase !== "queued" && p.phase !== "running";
        const left = x(p.start);
        const w = mark ? MARK_W_PX : Math.max(MIN_BAR_PX, x(p.end) - left);
        rect.setAttribute("class", `tl-bar tl-${p.phase} st-${p.status}`);
        rect.setAttribute("x", String(mark ? left - MARK_W_PX / 2 : left));
        rect.setAttribute("width", String(w));
        rect.dataset.phase = p.phase;
        rect.dataset.start = String(p.start);
        rect.dataset.end = String(p.end);
      });
      const what = phases.length ? phases.map(phaseText).join("; ") : status;
      row.note.textContent = phases.length ? "" : status === "pending" ? "pending: not queued yet" : status;
      row.title.textContent = `${name}: ${what}`;
      row.g.setAttribute("aria-label", `step ${name}: ${what}`);
    }
  }

  drawAxis(t0, span, x, empty) {
    const parts = [];
    if (!empty) {
      const step = niceStep(span / TICKS);
      for (let t = 0; t <= span + 1e-9; t += step) {
        const tx = x(t0 + t);
        parts.push(s("line", { class: "tl-tick", x1: tx, x2: tx, y1: AXIS_H - 4, y2: AXIS_H + this.order.length * ROW_H }),
          t === 0
            ? s("text", { class: "tl-tick-label first", x: tx, y: AXIS_H - 8, text: fmtTime(t0).slice(11) })
            : s("text", { class: "tl-tick-label", x: tx, y: AXIS_H - 8, text: `+${fmtDuration(t)}` }));
      }
    } else {
      parts.push(s("text", { class: "tl-tick-label", x: LABEL_W, y: AXIS_H - 8, text: "no step has been queued yet" }));
    }
    this.axis.replaceChildren(...parts);
  }
}

/** 1, 2, 5 × 10^k seconds (or minutes/hours multiples) near `raw`. */
function niceStep(raw) {
  const candidates = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400];
  for (const c of candidates) if (c >= raw) return c;
  return Math.ceil(raw / 86400) * 86400;
}
