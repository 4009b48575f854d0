// Task statuses as the server defines them (GET api/v1/statuses), read once at start:
// their names in life order, display groups (the colours: st-<group> in style.css),
// terminal/active flags and legal transitions. The dashboard keeps no copy of its own.

import { api } from "./api.js";

const RETRY_MS = 2000;
let byName = null; // status name → {name, group, terminal, active, transitions}

/**
 * Read the statuses unless already read; retries every 2 s while the server cannot be
 * reached (the connection banner says so), until `signal` aborts.
 */
export async function loadStatuses(signal) {
  while (byName === null) {
    try {
      const data = await api.get("statuses", null, signal);
      byName = new Map(data.statuses.map((s) => [s.name, s]));
    } catch (err) {
      if (err.name === "AbortError" || signal.aborted) throw err;
      await new Promise((resolve) => setTimeout(resolve, RETRY_MS));
    }
  }
}

/** Every task status, in life order (created first). */
export function statusNames() {
  return [...byName.keys()];
}

/** The display group of a status; names that are no task status (pipeline step states
 * such as "pending" or "cached") are their own group. */
export function statusGroup(status) {
  return byName.get(status)?.group || status;
}

/** True for a finished status: a task leaves it only by a re-run or a reset. */
export function isTerminal(status) {
  return Boolean(byName.get(status)?.terminal);
}

/** True if a task in `status` may change to `next`. */
export function canChange(status, next) {
  return Boolean(byName.get(status)?.transitions.includes(next));
}
