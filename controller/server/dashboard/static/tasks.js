// Tasks: the newest tasks with filters by project, status and type, and a jump-to-id box.

import { api, poll } from "./api.js";
import { badge, elapsed, errorBox, fill, fmtDuration, fmtTime, h, taskLink } from "./dom.js";
import { statusNames } from "./statuses.js";

const POLL_MS = 3000;
const LIMIT = 200;

export async function mount(root, { query, signal }) {
  document.title = "Tasks · Conveyor";
  const filters = { project: query.get("project") || "", status: query.get("status") || "", type: query.get("type") || "" };
  const projectInput = h("input", { id: "tasks-project", name: "project", value: filters.project, placeholder: "any project" });
  const statusSelect = h("select", { id: "tasks-status", name: "status" },
    h("option", { value: "", text: "any status" }),
    statusNames().map((st) => h("option", { value: st, text: st.replace("_", " "), selected: st === filters.status })));
  const idInput = h("input", { id: "tasks-goto", name: "id", placeholder: "task id" });
  const apply = (e) => {
    e.preventDefault();
    const q = new URLSearchParams();
    if (projectInput.value.trim()) q.set("project", projectInput.value.trim());
    if (statusSelect.value) q.set("status", statusSelect.value);
    if (filters.type) q.set("type", filters.type);
    location.hash = `#/tasks${q.toString() ? `?${q}` : ""}`;
  };
  const error = h("div", {});
  const body = h("tbody", {});
  fill(root, h("h1", { text: "Tasks" }),
    h("div", { class: "filters" },
      h("form", { role: "search", "aria-label": "Filter tasks", on: { submit: apply } },
        h("label", { for: "tasks-project" }, "Project "), projectInput,
        h("label", { for: "tasks-status" }, "Status "), statusSelect,
        h("button", { type: "submit", text: "Filter" })),
      h("form", { "aria-label": "Open a task by id", on: { submit: (e) => {
        e.preventDefault();
        if (idInput.value.trim()) location.hash = `#/tasks/${encodeURIComponent(idInput.value.trim())}`;
      } } }, h("label", { for: "tasks-goto" }, "Open "), idInput, h("button", { type: "submit", text: "Go" }))),
    error,
    h("table", { class: "tasks-table" },
      h("thead", {}, h("tr", {}, ["Task", "Project", "Type", "Status", "Queue", "Worker", "Started", "Duration"]
        .map((c) => h("th", { scope: "col", text: c })))),
      body));
  statusSelect.addEventListener("change", apply);

  await new Promise((resolve) => {
    poll(async () => {
      const found = await api.get("tasks", { ...filters, limit: LIMIT }, signal);
      error.replaceChildren();
      fill(body, found.length ? found.map((t) => h("tr", { dataset: { id: t.id } },
        h("td", {}, taskLink(t.id, t.name)),
        h("td", { text: t.project || "–" }),
        h("td", { text: t.type }),
        h("td", {}, badge(t.status)),
        h("td", { text: t.execution.queue || "–" }),
        h("td", { text: t.runtime.worker || "–" }),
        h("td", { text: fmtTime(t.started_at) }),
        h("td", { text: fmtDuration(t.started_at ? elapsed(t.started_at, t.finished_at) : null) })))
        : h("tr", {}, h("td", { colspan: 8, class: "muted", text: "No tasks match." })));
      resolve();
    }, POLL_MS, signal, (err) => { fill(error, errorBox(err)); resolve(); });
  });
}
