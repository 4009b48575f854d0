// The REST API as the dashboard uses it: JSON calls, connection state, polling.
//
// Calls are relative ("api/v1/..."), so the dashboard also works behind a proxy that
// serves it under a prefix. The token travels in the HttpOnly cookie the server set when
// the page was opened with ?token=...; this code never sees it.

const BASE = "api/v1/";

/** An error answer of the API (4xx/5xx) with its JSON body. */
export class ApiError extends Error {
  constructor(status, body, path) {
    const text = (body && body.message) || `HTTP ${status}`;
    super(text);
    this.status = status;
    this.body = body;
    this.path = path;
  }
}

/** The server refused the token (401). */
export class Unauthorized extends ApiError {}

/** The server could not be reached at all (network error, server down). */
export class Unreachable extends Error {
  constructor(cause) {
    super("cannot reach the Conveyor server; retrying");
    this.cause = cause;
  }
}

/** Connection state: "ok", "unreachable" or "unauthorized"; listeners get a CustomEvent. */
export const connection = new EventTarget();
let state = "ok";
let clockSkewS = 0;

function setState(next, detail) {
  if (next === state) return;
  state = next;
  connection.dispatchEvent(new CustomEvent("change", { detail: { state, ...detail } }));
}

export function connectionState() {
  return state;
}

/** Seconds since the epoch on the server's clock (from the Date header of its answers). */
export function serverNow() {
  return Date.now() / 1000 + clockSkewS;
}

function noteServerClock(response) {
  const date = response.headers.get("date");
  if (!date) return;
  const server = Date.parse(date) / 1000;
  if (!isNaN(server)) {
    const skew = server - Date.now() / 1000;
    // The header has 1 s resolution: only correct for a real difference.
    clockSkewS = Math.abs(skew) > 2 ? skew : 0;
  }
}

function url(path, params) {
  const u = new URL(BASE + path, document.baseURI);
  for (const [key, value] of Object.entries(params || {})) {
    if (value === undefined || value === null || value === "") continue;
    if (Array.isArray(value)) value.forEach((v) => u.searchParams.append(key, v));
    else u.searchParams.set(key, value);
  }
  return u;
}

async function call(method, path, { params, body, signal } = {}) {
  let response;
  try {
    response = await fetch(url(path, params), {
      method,
      signal,
      credentials: "same-origin",
      headers: body === undefined ? {} : { "content-type": "application/json" },
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
    });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    setState("unreachable", { error: err });
    throw new Unreachable(err);
  }
  noteServerClock(response);
  let data = null;
  const text = await response.text();
  if (text) data = parseJson(text);
  if (response.status === 401) {
    setState("unauthorized", {});
    throw new Unauthorized(401, data, path);
  }
  setState("ok", {});
  if (!response.ok) throw new ApiError(response.status, data, path);
  return data;
}

/**
 * JSON.parse, also accepting the bare NaN / Infinity the server writes for scalars (a
 * diverging loss is kept as reported): they come back as the strings "NaN", "Infinity".
 */
export function parseJson(text) {
  try {
    return JSON.parse(text);
  } catch {
    try {
      return JSON.parse(text.replace(/([:,[]\s*)(NaN|-?Infinity)(?=\s*[,}\]])/g, '$1"$2"'));
    } catch {
      return { message: text.slice(0, 200) };
    }
  }
}

export const api = {
  get: (path, params, signal) => call("GET", path, { params, signal }),
  post: (path, body, signal) => call("POST", path, { body: body ?? {}, signal }),
};

/** The URL of the files endpoint for `path` (relative to the page, so the cookie goes). */
export function filesUrl(path) {
  return BASE + "files/" + path.split("/").map(encodeURIComponent).join("/");
}

/**
 * Call `fn` now and then every `intervalMs` after it finished (never overlapping), until
 * `signal` aborts. `fn` may return a number of milliseconds to use as the next interval.
 * Errors are reported to `onError` (the loop goes on: the server may come back).
 * While the tab is hidden, polls are at most every 5 s.
 */
export function poll(fn, intervalMs, signal, onError = () => {}) {
  let timer = null;
  const run = async () => {
    if (signal.aborted) return;
    let next = intervalMs;
    try {
      const wanted = await fn();
      if (typeof wanted === "number") next = wanted;
    } catch (err) {
      if (err.name === "AbortError" || signal.aborted) return;
      onError(err);
      next = Math.max(next, 2000);
    }
    if (signal.aborted) return;
    if (document.hidden) next = Math.max(next, 5000);
    timer = setTimeout(run, next);
  };
  signal.addEventListener("abort", () => clearTimeout(timer));
  run();
}
