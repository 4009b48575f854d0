// Buttons that change something through the API (abort, enqueue), with a confirmation.

import { api } from "./api.js";
import { errorText, h } from "./dom.js";

/**
 * A button that POSTs to `path` after the user confirms `confirm`. While the call runs it
 * is disabled; the outcome is announced next to it (role=status), errors included.
 */
export function actionButton(label, path, { confirm: question, danger = false, id, onDone } = {}) {
  const status = h("span", { class: "action-status", role: "status" });
  const button = h("button", { type: "button", class: danger ? "danger" : "primary", id, text: label });
  button.addEventListener("click", async () => {
    if (question && !window.confirm(question)) return;
    button.disabled = true;
    status.textContent = "…";
    try {
      const record = await api.post(path, {});
      status.textContent = record && record.status ? `done: ${record.status.replace("_", " ")}` : "done";
      if (onDone) await onDone(record);
    } catch (err) {
      status.textContent = `failed: ${errorText(err)}`;
      status.classList.add("error");
    } finally {
      button.disabled = false;
    }
  });
  return h("span", { class: "action" }, button, status);
}
