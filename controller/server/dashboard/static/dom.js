// Small DOM and formatting helpers shared by every page (no framework).

import { serverNow } from "./api.js";
import { statusGroup } from "./statuses.js";

/**
 * Create an element: h("a", {href: "#/x", class: "link"}, "text", child).
 * Attributes: `class`, `text`, `dataset` (object), `on` (event → handler),
 * boolean `true` sets an empty attribute, `false`/null/undefined skip it.
 */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  setAttrs(el, attrs);
  append(el, children);
  return el;
}

const SVG_NS = "http://www.w3.org/2000/svg";

/** Like h() for SVG elements. */
export function s(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  setAttrs(el, attrs);
  append(el, children);
  return el;
}

function setAttrs(el, attrs) {
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === false || value === null || value === undefined) continue;
    if (key === "text") el.textContent = String(value);
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key === "on") for (const [ev, fn] of Object.entries(value)) el.addEventListener(ev, fn);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** Replace the children of `el`. */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

/** Set textContent only when it differs (no needless layout work). */
export function setText(el, text) {
  const value = String(text ?? "");
  if (el.textContent !== value) el.textContent = value;
}

// ------------------------------------------------------------------ formatting
export function fmtTime(ts) {
  if (ts === null || ts === undefined) return "–";
  const d = new Date(ts * 1000);
  const pad = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
    `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

export function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return "–";
  const sec = Math.max(0, seconds);
  if (sec < 10) return `${sec.toFixed(1)} s`;
  if (sec < 60) return `${Math.round(sec)} s`;
  const m = Math.floor(sec / 60), rest = Math.round(sec % 60);
  if (m < 60) return `${m} min ${String(rest).padStart(2, "0")} s`;
  const hours = Math.floor(m / 60);
  return `${hours} h ${String(m % 60).padStart(2, "0")} min`;
}

/** "3 min ago" for a past timestamp (server clock). */
export function fmtAge(ts) {
  if (ts === null || ts === undefined) return "–";
  return `${fmtDuration(serverNow() - ts)} ago`;
}

export function fmtBytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let v = n, i = 0;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return i === 0 ? `${v} B` : `${v.toFixed(1)} ${units[i]}`;
}

/** A value as text: strings as they are, the rest as JSON. */
export function fmtValue(v) {
  if (v === null || v === undefined) return String(v);
  return typeof v === "string" ? v : JSON.stringify(v);
}

/** Duration of something that started at `start` and ended at `end` (or runs still). */
export function elapsed(start, end) {
  if (start === null || start === undefined) return null;
  return (end ?? serverNow()) - start;
}

// ---------------------------------------------------------------- components
const STATUS_LABELS = { in_progress: "running" };

/** A status badge; the text says the status, the colour (its group) only repeats it. */
export function badge(status) {
  const label = STATUS_LABELS[status] || status || "unknown";
  return h("span", { class: `badge st-${status ? statusGroup(status) : "unknown"}`, text: label });
}

/** A key/value list: rows = [[label, value-or-node], ...]; empty values show "–". */
export function kvList(rows) {
  const dl = h("dl", { class: "kv" });
  for (const [label, value] of rows) {
    if (value === undefined) continue;
    dl.append(h("dt", { text: label }),
      h("dd", {}, value === null || value === "" ? "–" : value));
  }
  return dl;
}

/** A table: columns = [label...], rows = arrays of cells (text or nodes). */
export function table(columns, rows, attrs = {}) {
  return h("table", attrs,
    h("thead", {}, h("tr", {}, columns.map((c) => h("th", { scope: "col", text: c })))),
    h("tbody", {}, rows.map((cells) => h("tr", {}, cells.map((c) => h("td", {}, c))))));
}

/** A section with a heading; `id` names it for the tests and for links. */
export function section(title, id, ...children) {
  const headingId = `${id}-h`;
  return h("section", { class: "card", id, "aria-labelledby": headingId },
    h("h2", { id: headingId, text: title }), ...children);
}

/** A one-line error message block for a failed load. */
export function errorBox(err) {
  return h("p", { class: "error", role: "alert", text: errorText(err) });
}

export function errorText(err) {
  if (!err) return "";
  return err.message || String(err);
}

/** A link to a task page. */
export function taskLink(id, text) {
  return h("a", { href: `#/tasks/${encodeURIComponent(id)}`, text: text || id });
}

/** A link to a pipeline run page. */
export function pipelineLink(id, text) {
  return h("a", { href: `#/pipelines/${encodeURIComponent(id)}`, text: text || id });
}

/**
 * Run `render` (which rebuilds part of the page) and give the focus back to the element
 * with the same data-focus-key, so a periodic refresh does not throw keyboard users out.
 */
export function keepFocus(render) {
  const key = document.activeElement && document.activeElement.dataset
    ? document.activeElement.dataset.focusKey : null;
  render();
  if (key) {
    const again = document.querySelector(`[data-focus-key="${CSS.escape(key)}"]`);
    if (again) again.focus();
  }
}
