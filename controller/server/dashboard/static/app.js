// The dashboard's entry point: hash routing, page lifecycle and the connection banner.
//
// Routes:  #/pipelines[?project=&status=]   pipeline runs
//          #/pipelines/<task id>[?step=]    one run: its DAG, live
//          #/tasks[?project=&status=]       tasks
//          #/tasks/<task id>                one task: everything, its log live
//          #/queues                         queues and workers
// Each page module exports mount(root, {id, query, signal}); when the route changes the
// signal aborts, which stops the page's polling.

import { connection } from "./api.js";
import { fill, h } from "./dom.js";
import { loadStatuses } from "./statuses.js";
import * as pipelines from "./pipelines.js";
import * as pipeline from "./pipeline.js";
import * as queues from "./queues.js";
import * as task from "./task.js";
import * as tasks from "./tasks.js";

const ROUTES = [
  [/^\/pipelines\/([^/]+)$/, pipeline, "pipelines"],
  [/^\/pipelines$/, pipelines, "pipelines"],
  [/^\/tasks\/([^/]+)$/, task, "tasks"],
  [/^\/tasks$/, tasks, "tasks"],
  [/^\/queues$/, queues, "queues"],
];

let current = null; // AbortController of the mounted page

function parseHash() {
  const raw = location.hash.replace(/^#/, "") || "/pipelines";
  const [path, queryString] = raw.split("?");
  return { path, query: new URLSearchParams(queryString || "") };
}

async function route() {
  const { path, query } = parseHash();
  const match = ROUTES.map(([re, page, nav]) => [re.exec(path), page, nav]).find(([m]) => m);
  if (current) current.abort();
  current = new AbortController();
  const main = document.getElementById("main");
  if (!match) {
    location.replace("#/pipelines");
    return;
  }
  const [m, page, nav] = match;
  for (const link of document.querySelectorAll("[data-nav]")) {
    if (link.dataset.nav === nav) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  fill(main, h("p", { class: "muted", text: "Loading…" }));
  const id = m[1] ? decodeURIComponent(m[1]) : null;
  try {
    await loadStatuses(current.signal); // once: the statuses and their colours
    await page.mount(main, { id, query, signal: current.signal });
  } catch (err) {
    if (err.name !== "AbortError") fill(main, h("p", { class: "error", role: "alert", text: String(err.message || err) }));
  }
}

/** Show what is wrong with the connection (and say how to fix it) above every page. */
function showConnection(event) {
  const banner = document.getElementById("banner");
  const { state } = event.detail;
  document.body.dataset.connection = state;
  if (state === "ok") {
    banner.hidden = true;
    banner.replaceChildren();
    return;
  }
  banner.hidden = false;
  banner.className = `banner banner-${state}`;
  if (state === "unauthorized") {
    fill(banner, h("strong", { text: "Not authorized. " }),
      "The server wants its API token: open this page once as ",
      h("code", { text: `${location.origin}${location.pathname}?token=YOUR_TOKEN` }),
      " (the token given to ", h("code", { text: "controller serve --token" }),
      " or ", h("code", { text: "CONVEYOR_API_TOKEN" }), ").");
  } else {
    fill(banner, h("strong", { text: "Server unreachable. " }),
      `Cannot reach the Conveyor server at ${location.host}: is "controller serve" running? ` +
      "The page keeps retrying and updates when it answers again.");
  }
}

connection.addEventListener("change", showConnection);
window.addEventListener("hashchange", route);
route();
