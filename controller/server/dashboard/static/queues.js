// Queues and workers: what waits where, who serves which queue, and why work is pending.

import { api, poll, serverNow } from "./api.js";
import { badge, errorBox, fill, fmtAge, fmtDuration, fmtTime, h, keepFocus, section, taskLink } from "./dom.js";

const POLL_MS = 2000;
/** A worker not heard from for this long is shown as lost (leases are 30 s). */
export const WORKER_LOST_S = 30;

/** Workers heard from recently. */
export function liveWorkers(workers) {
  const now = serverNow();
  return workers.filter((w) => now - w.last_seen < WORKER_LOST_S);
}

/**
 * Queues that have waiting tasks and no live worker listening on them:
 * [{queue, text}], e.g. "no agent listens on 'services' (2 tasks waiting, oldest 3 min)".
 */
export function idleQueueProblems(queues, workers) {
  const served = new Set(liveWorkers(workers).flatMap((w) => w.queues));
  return queues
    .filter((q) => q.length > 0 && !served.has(q.name))
    .map((q) => ({
      queue: q.name,
      text: `no agent listens on '${q.name}' (${q.length} task${q.length === 1 ? "" : "s"} waiting` +
        `${q.oldest_queued_at ? `, oldest waiting ${fmtDuration(serverNow() - q.oldest_queued_at)}` : ""}). ` +
        `Start one: agent daemon --queue ${q.name}`,
    }));
}

export async function mount(root, { signal }) {
  document.title = "Queues and workers · Conveyor";
  const problems = h("div", { class: "hints", id: "queue-problems", "aria-live": "polite" });
  const queuesBox = h("div", {});
  const workersBox = h("div", {});
  const error = h("div", {});
  fill(root, h("h1", { text: "Queues and workers" }), error, problems,
    section("Queues", "queues", queuesBox), section("Workers", "workers", workersBox));
  const open = new Set(); // queues whose waiting tasks are shown
  const waitingTasks = new Map(); // queue → last list shown (no flicker while refreshing)
  let last = { queues: [], workers: [] };

  const render = () => {
    const { queues, workers } = last;
    const live = liveWorkers(workers);
    const issues = idleQueueProblems(queues, workers);
    fill(problems, issues.map((p) => h("p", { class: "hint warn", dataset: { queue: p.queue } },
      h("strong", { text: "Waiting: " }), p.text)));
    fill(queuesBox, queues.length ? queueTable(queues, live, open, render, signal, waitingTasks)
      : h("p", { class: "muted", text: "No queues yet." }));
    fill(workersBox, workers.length ? workerTable(workers)
      : h("p", { class: "muted", text: "No agent has registered. Start one with: agent daemon --queue default" }));
  };

  await new Promise((resolve) => {
    poll(async () => {
      const [queues, workers] = await Promise.all([api.get("queues", null, signal), api.get("workers", null, signal)]);
      last = { queues, workers };
      error.replaceChildren();
      keepFocus(render);
      resolve();
    }, POLL_MS, signal, (err) => { fill(error, errorBox(err)); resolve(); });
  });
}

function queueTable(queues, live, open, rerender, signal, waitingTasks) {
  const body = h("tbody", {});
  for (const q of queues) {
    const servers = live.filter((w) => w.queues.includes(q.name)).map((w) => w.id);
    const expanded = open.has(q.name);
    const toggle = h("button", { type: "button", class: "linklike", "aria-expanded": String(expanded),
      text: expanded ? "hide tasks" : "show tasks", disabled: q.length === 0,
      dataset: { focusKey: `queue:${q.name}` } });
    toggle.addEventListener("click", () => {
      if (open.has(q.name)) open.delete(q.name); else open.add(q.name);
      rerender();
    });
    const row = h("tr", { dataset: { queue: q.name }, class: q.length && !servers.length ? "warn-row" : "" },
      h("th", { scope: "row", text: q.name }),
      h("td", { class: "num", text: String(q.length) }),
      h("td", {}, q.oldest_queued_at ? `${fmtAge(q.oldest_queued_at)} (${fmtTime(q.oldest_queued_at)})` : "–"),
      h("td", {}, servers.length ? servers.join(", ") : h("span", { class: "muted", text: "no live agent" })),
      h("td", {}, toggle));
    body.append(row);
    if (expanded) {
      const cell = h("td", { colspan: 5 });
      const show = (tasks) => fill(cell, tasks.length ? h("ol", { class: "queue-tasks" }, tasks.map((t) => h("li", {},
        taskLink(t.id, t.name), " ", badge(t.status), ` ${t.project || ""}`,
        h("span", { class: "muted", text: ` queued ${fmtAge(t.queued_at)}` }))))
        : h("p", { class: "muted", text: "Empty." }));
      if (waitingTasks.has(q.name)) show(waitingTasks.get(q.name));
      else fill(cell, h("p", { class: "muted", text: "Loading…" }));
      body.append(h("tr", { class: "sub-row" }, cell));
      api.get(`queues/${encodeURIComponent(q.name)}/tasks`, null, signal).then((tasks) => {
        waitingTasks.set(q.name, tasks);
        show(tasks);
      }).catch((err) => fill(cell, errorBox(err)));
    }
  }
  return h("table", { class: "queues-table" },
    h("thead", {}, h("tr", {}, ["Queue", "Waiting", "Oldest waiting since", "Served by", ""].map((c) => h("th", { scope: "col", text: c })))),
    body);
}

function percent(value) {
  if (value === null || value === undefined) return "–";
  const v = Number(value);
  return h("span", { class: "meter-wrap" },
    h("meter", { min: 0, max: 100, low: 70, high: 90, optimum: 20, value: v, "aria-hidden": "true" }),
    ` ${v.toFixed(0)} %`);
}

function workerTable(workers) {
  const now = serverNow();
  return h("table", { class: "workers-table" },
    h("thead", {}, h("tr", {}, ["Worker", "Host", "Queues", "Slots", "Current tasks", "Last seen", "CPU", "Memory"]
      .map((c) => h("th", { scope: "col", text: c })))),
    h("tbody", {}, workers.map((w) => {
      const lost = now - w.last_seen >= WORKER_LOST_S;
      const r = w.resources || {};
      return h("tr", { dataset: { worker: w.id }, class: lost ? "warn-row" : "" },
        h("th", { scope: "row", text: w.id }),
        h("td", { text: w.hostname || "–" }),
        h("td", { text: w.queues.join(", ") || "–" }),
        h("td", { class: "num", text: `${w.current_tasks.length}/${w.slots}` }),
        h("td", {}, w.current_tasks.length ? w.current_tasks.map((id) => [taskLink(id, id.slice(0, 8)), " "]) : "idle"),
        h("td", {}, fmtAge(w.last_seen), lost ? h("span", { class: "tag warn", text: "lost?" }) : null),
        h("td", {}, percent(r.cpu_percent)),
        h("td", {}, percent(r.memory_percent),
          r.memory_total_gb ? h("span", { class: "muted small", text: ` of ${r.memory_total_gb} GiB` }) : null));
    })));
}
