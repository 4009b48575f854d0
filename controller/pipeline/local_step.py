"""A step run on this machine (`run_pipeline_steps_locally=True`, `PipelineDecorator.run_locally()`).

The pipeline does not run the step itself: it starts it as the worker `local:...`
(status in_progress, so the loop follows it like any other step) and hands it to the
agent's process boundary, `python -m agent.cli execute --id TASK --worker-id W --started
--own-environment`, with the same store URL and token in its environment: the step runs
with this interpreter in this environment (no venv of its packages), as the reference
says of local steps. That process is the agent's
one-task path (checkout → environment → supervisor → report): the step's output goes to
the task log, its time limit and aborts (seen in its heartbeat answers) stop its process
tree, and it reports the final status, which the pipeline sees as a status change.

When the pipeline stops, it aborts its running steps through the control plane; a local
step's agent notices that within a heartbeat. If the process is still there
`SIGTERM_AFTER_S` later it gets SIGTERM (the agent stops the step), and
`SIGKILL_AFTER_S` after the stop its process group gets SIGKILL (the step, started with a
parent-death signal, dies with it). A step whose agent process ended without reporting
(it could not start, or was killed) is marked failed (or stopped, if it was being
aborted) with the process's last output line as the message.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

from controller.backend import Backend
from controller.errors import ConveyorError
from controller.models import StatusReason, TaskStatus

log = logging.getLogger("conveyor.pipeline")

#: After the pipeline stopped, seconds the step's agent has to notice the abort itself.
SIGTERM_AFTER_S = 3.0
#: After the pipeline stopped, seconds before the agent's process group is killed
#: (the agent's default stop grace for the step is 10 s).
SIGKILL_AFTER_S = 20.0
#: How often the follower checks the process and the pipeline's stop.
POLL_S = 0.1
#: Variables of the pipeline's own environment that must not reach the step's agent.
_PRIVATE_VARIABLES = ("CONVEYOR_TASK_ID", "CONVEYOR_WORKER_ID")


def agent_execute_argv(task_id: str, worker_id: str) -> list[str]:
    """The command that runs a started task through the agent (see the module doc), in
    this interpreter and environment (`--own-environment`: no venv of the step's packages,
    as the reference says of local steps)."""
    return [sys.executable, "-m", "agent.cli", "execute", "--id", task_id, "--worker-id", worker_id,
            "--started", "--own-environment", "--no-output"]


class LocalStep:
    """One local step: its `agent execute` process and the thread that follows it."""

    def __init__(self, backend: Backend, task_id: str, worker_id: str, stop_event: threading.Event) -> None:
        self.backend = backend
        self.task_id = task_id
        self.worker_id = worker_id
        self._stop_event = stop_event
        self._thread = threading.Thread(target=self._follow, name=f"local-step-{task_id[:8]}", daemon=True)
        self.exit_code: int | None = None

    def start(self) -> None:
        """Start the agent process for the step (the task must be in_progress, held by
        `worker_id`) and follow it on a thread."""
        self._thread.start()

    def join(self, timeout_s: float | None = None) -> None:
        """Wait until the agent process ended (and a missing report was made up for)."""
        self._thread.join(timeout_s)

    def _environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _PRIVATE_VARIABLES}
        env["CONVEYOR_API"] = self.backend.url
        return env

    def _follow(self) -> None:
        with tempfile.TemporaryFile() as output:
            try:
                process = subprocess.Popen(
                    agent_execute_argv(self.task_id, self.worker_id), env=self._environment(),
                    stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own process group: signalled as one
                )
            except OSError as exc:
                self._report_if_unreported(None, f"cannot start the step's agent: {exc}")
                return
            self.exit_code = self._wait(process)
            output.seek(0)
            text = output.read().decode(errors="replace").strip()
        for line in text.splitlines():
            log.debug("local step %s: %s", self.task_id, line)
        last_line = text.splitlines()[-1] if text else ""
        self._report_if_unreported(self.exit_code, last_line)

    def _wait(self, process: subprocess.Popen[bytes]) -> int:
        stopped_at: float | None = None
        terminated = False
        while True:
            try:
                return process.wait(timeout=POLL_S)
            except subprocess.TimeoutExpired:
                pass
            if stopped_at is None:
                if self._stop_event.is_set():
                    stopped_at = time.monotonic()
                continue
            waited_s = time.monotonic() - stopped_at
            if waited_s >= SIGKILL_AFTER_S:
                log.warning("local step %s: its agent is still running %.0f s after the stop; killing it",
                            self.task_id, waited_s)
                _signal_group(process.pid, signal.SIGKILL)
                return process.wait()
            if waited_s >= SIGTERM_AFTER_S and not terminated:
                terminated = True
                _signal_group(process.pid, signal.SIGTERM)

    def _report_if_unreported(self, exit_code: int | None, last_line: str) -> None:
        """Finish the task if its agent ended without reporting (it held it, still active)."""
        try:
            task = self.backend.get_task(self.task_id)
            if not task.status.is_active or task.runtime.worker != self.worker_id:
                return
            how = "could not start" if exit_code is None else f"exited with code {exit_code}"
            message = f"the step's agent (agent execute) {how} without reporting" + (
                f": {last_line}" if last_line else "")
            if task.status == TaskStatus.stopping:
                status, reason = TaskStatus.stopped, StatusReason.aborted
            else:
                status, reason = TaskStatus.failed, StatusReason.setup_failed
            self.backend.set_status(self.task_id, status, reason=reason, message=message,
                                    worker_id=self.worker_id)
            log.warning("local step %s: %s", self.task_id, message)
        except ConveyorError as exc:
            log.warning("local step %s: cannot check how it ended: %s", self.task_id, exc)


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass
