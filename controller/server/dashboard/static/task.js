// One task: its record section by section, artifacts, scalars and the live log.

import { api, filesUrl, poll } from "./api.js";

import { actionButton } from "./actions.js";
import {
  badge, elapsed, errorBox, fill, fmtBytes, fmtDuration, fmtTime, fmtValue, h, kvList,
  pipelineLink, section, setText, table, taskLink,
} from "./dom.js";
import { groupScalars, linePlot } from "./plot.js";
import { canChange, isTerminal, statusGroup } from "./statuses.js";

/** Location-independent references to the files area (see controller.sdk.storage). */
const FILES_REF = "conveyor://files/";
const RECORD_POLL_MS = 2000;
const LOG_POLL_MS = 1000;
const SCALARS_POLL_MS = 3000;
/** Lines shown when the page opens (the log's tail) and kept in the page at most. */
const LOG_TAIL = 1000;
const LOG_KEEP = 5000;
/** Artifacts at most this large get an inline preview. */
const PREVIEW_MAX_BYTES = 64 * 1024;
const TEXT_TYPES = /^(str|string|text|json|dict|yaml|csv|txt|markdown|md)$/i;
const IMAGE_EXT = /\.(png|jpe?g|gif|webp|svg)$/i;

export async function mount(root, { id, signal }) {
  const record = await api.get(`tasks/${encodeURIComponent(id)}`, null, signal);
  const info = await api.get("info", null, signal).catch(() => null);
  new TaskPage(root, record, info, signal).start();
}

class TaskPage {
  constructor(root, record, info, signal) {
    this.root = root;
    this.record = record;
    this.info = info;
    this.signal = signal;
    this.sigs = new Map(); // section id → JSON of what it shows
    this.boxes = {};
  }

  start() {
    const ids = ["summary", "history", "parameters", "configuration", "script", "packages",
      "container", "artifacts", "models", "scalars"];
    for (const key of ids) this.boxes[key] = h("div", {});
    this.head = h("div", { class: "page-head" });
    this.error = h("div", {});
    this.logBox = h("pre", { id: "log", class: "log", tabindex: 0, role: "log", "aria-live": "off",
      "aria-label": "Task log", dataset: { lines: "0" } });
    this.logInfo = h("span", { class: "muted", role: "status" });
    this.follow = h("input", { type: "checkbox", id: "log-follow", checked: true });
    const titles = {
      summary: "Summary", history: "Status history", parameters: "Parameters", configuration: "Configuration",
      script: "Script", packages: "Packages", container: "Container", artifacts: "Artifacts", models: "Models",
      scalars: "Scalars",
    };
    fill(this.root,
      h("nav", { class: "crumbs", "aria-label": "Breadcrumb" }, h("a", { href: "#/tasks", text: "Tasks" }), " / ",
        h("span", { text: this.record.id })),
      this.head, this.error,
      h("div", { class: "task-grid" },
        ids.slice(0, 2).map((k) => section(titles[k], `task-${k}`, this.boxes[k]))),
      section("Log", "task-log",
        h("div", { class: "log-bar" }, this.logInfo,
          h("label", { for: "log-follow" }, this.follow, " follow new lines")),
        this.logBox),
      section(titles.scalars, "task-scalars", this.boxes.scalars),
      section(titles.artifacts, "task-artifacts", this.boxes.artifacts),
      h("div", { class: "task-grid" },
        ids.slice(2, 7).map((k) => section(titles[k], `task-${k}`, this.boxes[k]))),
      section(titles.models, "task-models", this.boxes.models));
    this.render();
    this.logNext = null; // next line number to ask for
    this.logLines = 0;
    poll(() => this.refreshRecord(), RECORD_POLL_MS, this.signal, (err) => fill(this.error, errorBox(err)));
    poll(() => this.refreshLog(), LOG_POLL_MS, this.signal, (err) => setText(this.logInfo, `log: ${err.message}`));
    poll(() => this.refreshScalars(), SCALARS_POLL_MS, this.signal, (err) => fill(this.boxes.scalars, errorBox(err)));
    const ticker = setInterval(() => this.renderDuration(), 1000);
    this.signal.addEventListener("abort", () => clearInterval(ticker));
  }

  active() {
    return !isTerminal(this.record.status) && this.record.status !== "created";
  }

  async refreshRecord() {
    this.record = await api.get(`tasks/${encodeURIComponent(this.record.id)}`, null, this.signal);
    this.error.replaceChildren();
    this.render();
    return isTerminal(this.record.status) ? 5000 : RECORD_POLL_MS;
  }

  /** Render the sections whose data changed since they were last drawn. */
  render() {
    const r = this.record;
    document.title = `${r.name} · Conveyor`;
    this.once("head", [r.name, r.status, r.status_message, r.parent, r.type], () => this.renderHead());
    this.once("summary", [r.status, r.status_reason, r.status_message, r.execution, r.runtime.worker,
      r.runtime.attempt, r.runtime.exit_code, r.started_at, r.finished_at, r.queued_at, r.tags, r.project],
    () => this.renderSummary());
    this.once("history", r.status_history, () => fill(this.boxes.history, historyTable(r.status_history)));
    this.once("parameters", r.hyperparams, () => fill(this.boxes.parameters, parametersView(r.hyperparams)));
    this.once("configuration", r.configuration, () => fill(this.boxes.configuration, configurationView(r.configuration)));
    this.once("script", r.script, () => fill(this.boxes.script, scriptView(r.script, r.runtime)));
    this.once("packages", r.packages, () => fill(this.boxes.packages, r.packages.length
      ? h("pre", { class: "small-pre", text: r.packages.join("\n") }) : h("p", { class: "muted", text: "None (the repository's requirements, if any)." })));
    this.once("container", r.container, () => fill(this.boxes.container, containerView(r.container)));
    this.once("artifacts", r.artifacts, () => fill(this.boxes.artifacts, this.artifactsView(r.artifacts)));
    this.once("models", r.models, () => fill(this.boxes.models, modelsView(r.models, this)));
  }

  once(key, data, render) {
    const sig = JSON.stringify(data);
    if (this.sigs.get(key) === sig) return;
    this.sigs.set(key, sig);
    render();
  }

  renderHead() {
    const r = this.record;
    const buttons = [];
    if (canChange(r.status, "stopped") && statusGroup(r.status) !== "aborted") { // not being stopped yet
      buttons.push(actionButton(r.type === "controller" ? "Abort pipeline" : "Abort", `tasks/${encodeURIComponent(r.id)}/abort`, {
        confirm: `Abort task "${r.name}"?`, danger: true, id: "abort-task", onDone: () => this.refreshRecord(),
      }));
    }
    if (isTerminal(r.status)) {
      buttons.push(actionButton("Re-enqueue", `tasks/${encodeURIComponent(r.id)}/enqueue`, {
        confirm: `Run task "${r.name}" again${r.execution.queue ? ` on '${r.execution.queue}'` : ""}?`,
        id: "enqueue-task", onDone: () => { this.logNext = null; return this.refreshRecord(); },
      }));
    }
    fill(this.head,
      h("h1", {}, `${r.name} `, badge(r.status)),
      h("div", { class: "actions" }, buttons,
        r.type === "controller" ? h("a", { class: "button", href: `#/pipelines/${encodeURIComponent(r.id)}`, text: "Pipeline view" }) : null));
  }

  renderSummary() {
    const r = this.record;
    this.durationEl = h("span", {});
    fill(this.boxes.summary, kvList([
      ["Id", h("code", { text: r.id })],
      ["Project", r.project || "–"],
      ["Type", r.type],
      ["Parent", r.parent ? [taskLink(r.parent), " (", pipelineLink(r.parent, "as pipeline"), ")"] : "–"],
      ["Tags", r.tags.length ? r.tags.join(", ") : "–"],
      ["Status", [badge(r.status), " ", r.status_reason ? h("code", { text: r.status_reason }) : ""]],
      ["Message", r.status_message || "–"],
      ["Queue", r.execution.queue || "–"],
      ["Priority", String(r.execution.priority)],
      ["Time limit", r.execution.time_limit_s ? fmtDuration(r.execution.time_limit_s) : "none"],
      ["Worker", r.runtime.worker || "–"],
      ["Attempt", String(r.runtime.attempt)],
      ["Exit code", r.runtime.exit_code === null || r.runtime.exit_code === undefined ? "–" : String(r.runtime.exit_code)],
      ["Created", fmtTime(r.created_at)],
      ["Queued", fmtTime(r.queued_at)],
      ["Started", fmtTime(r.started_at)],
      ["Finished", fmtTime(r.finished_at)],
      ["Duration", this.durationEl],
    ]));
    this.renderDuration();
  }

  renderDuration() {
    const r = this.record;
    if (this.durationEl) {
      setText(this.durationEl, fmtDuration(r.started_at ? elapsed(r.started_at, isTerminal(r.status) ? r.finished_at : null) : null));
    }
  }

  // ----------------------------------------------------------------- the log
  async refreshLog() {
    const id = encodeURIComponent(this.record.id);
    const first = this.logNext === null;
    const lines = first
      ? await api.get(`tasks/${id}/log`, { tail: LOG_TAIL }, this.signal)
      : await api.get(`tasks/${id}/log`, { offset: this.logNext }, this.signal);
    if (first) {
      this.logBox.replaceChildren();
      this.logLines = 0;
      if (lines.length && lines[0].n > 0) {
        this.logBox.append(h("span", { class: "muted", text: `… ${lines[0].n} earlier lines not shown\n` }));
      }
      this.logNext = 0;
    }
    if (lines.length) {
      const atBottom = this.logBox.scrollHeight - this.logBox.scrollTop - this.logBox.clientHeight < 30;
      const frag = document.createDocumentFragment();
      for (const line of lines) {
        const text = line.line.endsWith("\n") ? line.line : `${line.line}\n`;
        frag.append(line.stream === "stderr" ? h("span", { class: "stderr", text }) : document.createTextNode(text));
      }
      this.logBox.append(frag);
      this.logLines += lines.length;
      this.logNext = lines[lines.length - 1].n + 1;
      while (this.logBox.childNodes.length > LOG_KEEP) this.logBox.firstChild.remove();
      if (this.follow.checked && (atBottom || first)) this.logBox.scrollTop = this.logBox.scrollHeight;
    }
    this.logBox.dataset.lines = String(this.logNext);
    setText(this.logInfo, this.logNext ? `${this.logNext} lines${this.active() ? ", following" : ""}` : (this.active() ? "no output yet" : "no output"));
    return this.active() || this.record.status === "created" ? LOG_POLL_MS : 5000;
  }

  // ------------------------------------------------------------- scalars
  async refreshScalars() {
    const scalars = await api.get(`tasks/${encodeURIComponent(this.record.id)}/scalars`, null, this.signal);
    this.once("scalars", scalars, () => {
      const plots = groupScalars(scalars);
      fill(this.boxes.scalars, plots.size
        ? h("div", { class: "plots" }, [...plots.entries()].map(([title, series]) => linePlot(title, series)))
        : h("p", { class: "muted", text: "No scalars reported." }));
    });
    return this.active() ? SCALARS_POLL_MS : 10000;
  }

  // ----------------------------------------------------------- artifacts
  /** The address shown for a stored file: at the server's public URL (--public-url) when
   * the link is the files endpoint, else the stored URI. */
  shownUrl(uri, link) {
    const base = this.info && this.info.public_url;
    if (base && link && link.startsWith("api/")) return base.replace(/\/?$/, "/") + link;
    return uri;
  }

  /** Where the browser can download `uri` from: the files endpoint (same origin, so the
   * token cookie goes along), another http(s) URL, or nowhere (a path on some machine). */
  downloadUrl(uri) {
    if (!uri) return null;
    const filesPath = (this.info && this.info.files_path) || "/api/v1/files/";
    if (uri.startsWith(FILES_REF)) return filesUrl(decodeURIComponent(uri.slice(FILES_REF.length)));
    try {
      const u = new URL(uri);
      if ((u.protocol === "http:" || u.protocol === "https:")) {
        const at = u.pathname.indexOf(filesPath);
        if (at >= 0) return filesUrl(decodeURIComponent(u.pathname.slice(at + filesPath.length)));
        return u.href;
      }
      if (u.protocol === "file:" && this.info && this.info.files_url) {
        const root = this.info.files_url.replace(/\/?$/, "/");
        if (uri.startsWith(root)) return filesUrl(decodeURIComponent(uri.slice(root.length)));
      }
    } catch {
      return null;
    }
    return null;
  }

  artifactsView(artifacts) {
    const entries = Object.entries(artifacts || {});
    if (!entries.length) return h("p", { class: "muted", text: "No artifacts." });
    return h("div", { class: "artifacts" }, entries.map(([name, a]) => {
      const url = this.downloadUrl(a.uri);
      const small = a.size !== null && a.size !== undefined && a.size <= PREVIEW_MAX_BYTES;
      const preview = h("div", { class: "preview" });
      if (a.preview) preview.append(h("pre", { class: "small-pre", text: a.preview }));
      else if (url && small && url.startsWith("api/") && IMAGE_EXT.test(a.uri)) {
        preview.append(h("img", { src: url, alt: `artifact ${name}`, loading: "lazy" }));
      } else if (url && small && url.startsWith("api/") && TEXT_TYPES.test(a.type || "")) {
        const pre = h("pre", { class: "small-pre", text: "loading preview…" });
        preview.append(pre);
        fetch(url, { credentials: "same-origin" }).then((res) => res.ok ? res.text() : Promise.reject(new Error(`HTTP ${res.status}`)))
          .then((text) => { pre.textContent = text.length > 4000 ? `${text.slice(0, 4000)}\n…` : text; })
          .catch((err) => { pre.textContent = `no preview: ${err.message}`; });
      }
      return h("article", { class: "artifact", dataset: { name } },
        h("h3", {}, name, " ", a.type ? h("span", { class: "tag", text: a.type }) : null),
        kvList([
          ["Location", url ? h("a", { href: url, download: "", text: this.shownUrl(a.uri, url) }) : h("code", { text: a.uri })],
          ["Size", fmtBytes(a.size)],
          ["sha256", a.sha256 ? h("code", { title: a.sha256, text: a.sha256.slice(0, 16) + "…" }) : "–"],
          ["Metadata", Object.keys(a.metadata || {}).length ? h("code", { text: JSON.stringify(a.metadata) }) : undefined],
        ]),
        preview.childNodes.length ? preview : null);
    }));
  }
}

function historyTable(history) {
  if (!history || !history.length) return h("p", { class: "muted", text: "No status changes recorded." });
  const rows = history.map((c, i) => [fmtTime(c.time), badge(c.status), c.reason ? h("code", { text: c.reason }) : "",
    c.message || "", i > 0 ? `+${fmtDuration(c.time - history[i - 1].time)}` : ""]);
  return table(["Time", "Status", "Reason", "Message", "After"], rows, { class: "history-table" });
}

function parametersView(hyperparams) {
  const sections = Object.entries(hyperparams || {});
  if (!sections.length) return h("p", { class: "muted", text: "No parameters." });
  return sections.map(([name, values]) => h("div", { class: "param-section" },
    h("h3", { text: name }),
    Object.keys(values || {}).length
      ? kvList(Object.entries(values).map(([k, v]) => [k, fmtValue(v)]))
      : h("p", { class: "muted", text: "empty" })));
}

function configurationView(configuration) {
  const entries = Object.entries(configuration || {});
  if (!entries.length) return h("p", { class: "muted", text: "No configuration." });
  return entries.map(([name, value]) => h("details", { class: "config", open: entries.length <= 2 && name !== "Pipeline" },
    h("summary", { text: name }),
    h("pre", { class: "small-pre", text: typeof value === "string" ? value : JSON.stringify(value, null, 2) })));
}

function scriptView(script, runtime) {
  const rows = [
    ["Repository", script.repository || "–"],
    ["Branch", script.branch || "–"],
    ["Commit", script.commit ? h("code", { text: script.commit }) : "–"],
    ["Commit used", runtime.commit_used ? h("code", { text: runtime.commit_used }) : undefined],
    ["Tag", script.tag || undefined],
    ["Entry point", script.entry_point ? h("code", { text: script.entry_point }) : "–"],
    ["Working dir", script.working_dir || "."],
    ["Interpreter", script.binary || "python"],
    ["Requirements file", script.requirements_file || undefined],
  ];
  return [kvList(rows),
    script.diff ? h("details", {}, h("summary", { text: `Uncommitted diff (${script.diff.split("\n").length} lines)` }),
      h("pre", { class: "small-pre", text: script.diff })) : null,
    script.code ? h("details", {}, h("summary", { text: `Code (${script.code.split("\n").length} lines)` }),
      h("pre", { class: "small-pre", text: script.code })) : null];
}

function containerView(container) {
  if (!container.image && !container.arguments && !container.setup_shell_script) {
    return h("p", { class: "muted", text: "Runs on the agent's host (no container image)." });
  }
  return [kvList([
    ["Image", container.image ? h("code", { text: container.image }) : "–"],
    ["docker_args", container.arguments ? h("code", { text: container.arguments }) : "–"],
  ]), container.setup_shell_script ? [h("h3", { text: "Setup script" }),
    h("pre", { class: "small-pre", text: container.setup_shell_script })] : null];
}

function modelsView(models, page) {
  const rows = [];
  for (const [kind, list] of Object.entries(models || {})) {
    for (const m of list || []) {
      const url = page.downloadUrl(m.url);
      rows.push([kind, m.name || "–", m.framework || "–", url ? h("a", { href: url, download: "", text: page.shownUrl(m.url, url) }) : h("code", { text: m.url || "–" })]);
    }
  }
  if (!rows.length) return h("p", { class: "muted", text: "No models." });
  return table(["Kind", "Name", "Framework", "Location"], rows);
}

