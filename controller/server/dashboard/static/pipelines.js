// Pipeline runs: name, version, run number, status, started, duration; filters in the URL.

import { api, poll } from "./api.js";
import { badge, elapsed, errorBox, fill, fmtDuration, fmtTime, h, keepFocus, pipelineLink } from "./dom.js";
import { statusNames } from "./statuses.js";

const POLL_MS = 3000;
const PAGE = 100;

export async function mount(root, { query, signal }) {
  document.title = "Pipelines · Conveyor";
  const project = query.get("project") || "";
  const status = query.get("status") || "";
  let limit = PAGE;

  const projectSelect = h("select", { id: "filter-project", name: "project" });
  const statusSelect = h("select", { id: "filter-status", name: "status" },
    h("option", { value: "", text: "any status" }),
    statusNames().map((st) => h("option", { value: st, text: st.replace("_", " "), selected: st === status })));
  const applyFilters = () => {
    const q = new URLSearchParams();
    if (projectSelect.value) q.set("project", projectSelect.value);
    if (statusSelect.value) q.set("status", statusSelect.value);
    location.hash = `#/pipelines${q.toString() ? `?${q}` : ""}`;
  };
  projectSelect.addEventListener("change", applyFilters);
  statusSelect.addEventListener("change", applyFilters);

  const count = h("p", { class: "muted", role: "status" });
  const body = h("tbody", {});
  const more = h("button", { type: "button", hidden: true, text: "Show more",
    on: { click: () => { limit += PAGE; refresh(); } } });
  const error = h("div", {});
  fill(root,
    h("h1", { text: "Pipelines" }),
    h("form", { class: "filters", role: "search", "aria-label": "Filter pipeline runs", on: { submit: (e) => e.preventDefault() } },
      h("label", { for: "filter-project" }, "Project "), projectSelect,
      h("label", { for: "filter-status" }, "Status "), statusSelect),
    error, count,
    h("table", { class: "runs-table", id: "pipeline-runs" },
      h("thead", {}, h("tr", {}, ["Pipeline", "Version", "Run", "Status", "Steps", "Project", "Started", "Duration"]
        .map((c) => h("th", { scope: "col", text: c })))),
      body),
    more);

  const rowSig = new Map();
  const refresh = async () => {
    const data = await api.get("pipelines",
      { project, status, limit, with_projects: projectSelect.options.length ? "false" : "true" }, signal);
    error.replaceChildren();
    if (data.projects) keepFocus(() => {
      const projects = ["", ...data.projects];
      if (project && !projects.includes(project)) projects.push(project);
      const options = projects.map((p) => h("option", { value: p, text: p || "any project", selected: p === project }));
      if (projectSelect.options.length !== options.length) projectSelect.replaceChildren(...options);
    });
    count.textContent = data.total
      ? `${data.total} run${data.total === 1 ? "" : "s"}${data.total > data.runs.length ? `, ${data.runs.length} shown` : ""}`
      : "";
    if (!data.runs.length) {
      fill(body, h("tr", {}, h("td", { colspan: 8, class: "muted" },
        project || status ? "No pipeline run matches these filters."
          : "No pipeline runs yet. Run one with PipelineController(...).start() or start_locally().")));
      rowSig.clear();
    } else {
      // Keep unchanged rows (and their focus); replace the others.
      const rows = data.runs.map((run) => {
        const sig = JSON.stringify(run) + (run.finished_at ? "" : Math.floor(Date.now() / 1000));
        const old = rowSig.get(run.id);
        if (old && old.sig === sig) return old.tr;
        const tr = runRow(run);
        rowSig.set(run.id, { sig, tr });
        return tr;
      });
      if (rows.length !== body.children.length || rows.some((tr, i) => body.children[i] !== tr)) {
        body.replaceChildren(...rows);
      }
    }
    more.hidden = data.total <= data.runs.length;
  };
  await new Promise((resolve) => {
    poll(async () => { await refresh(); resolve(); }, POLL_MS, signal, (err) => { fill(error, errorBox(err)); resolve(); });
  });
}

function stepSummary(run) {
  const done = (run.steps.completed || 0) + (run.steps.cached || 0) + (run.steps.skipped || 0);
  const bad = (run.steps.failed || 0) + (run.steps.aborted || 0);
  const active = (run.steps.running || 0) + (run.steps.queued || 0) + (run.steps.launching || 0);
  const parts = [`${done}/${run.step_count} done`];
  if (active) parts.push(`${active} active`);
  if (bad) parts.push(`${bad} failed`);
  return h("span", {}, h("progress", { max: run.step_count || 1, value: done, "aria-hidden": "true" }), " ", parts.join(", "));
}

function runRow(run) {
  const end = run.finished_at;
  return h("tr", { dataset: { id: run.id, status: run.status } },
    h("td", {}, pipelineLink(run.id, run.name)),
    h("td", { text: run.version || "–" }),
    h("td", { class: "num", text: `#${run.run}` }),
    h("td", {}, badge(run.status), run.status_message && run.status !== "completed"
      ? h("div", { class: "muted small", text: run.status_message }) : null),
    h("td", {}, stepSummary(run)),
    h("td", { text: run.project || "–" }),
    h("td", { text: fmtTime(run.started_at) }),
    h("td", { text: fmtDuration(run.started_at ? elapsed(run.started_at, end) : null) }));
}
