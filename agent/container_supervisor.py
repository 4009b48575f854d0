"""Run a prepared container as `agent.supervisor.run_step` runs a process.

`run_container` creates the container, streams its output to the task log, enforces
the time limit and aborts, and removes it, returning the same `StepOutcome`.

Decisions:

- **Output.** The engine's attach stream (opened before the container starts, as
  `docker run` does, so no early line is lost; stdout and stderr kept apart) feeds
  `agent.output.OutputPump`: same line splitting, progress-bar folding and delivery
  every 0.25 s as host steps. Lines the bootstrap marks as the agent's own (installer
  output, "using cached virtualenv") go to the "agent" stream.
- **Time limit** counts from the moment the step itself starts (the bootstrap's stage
  file says `run`), like host steps whose limit excludes the venv build; the setup
  script and the venv build are bounded by `SETUP_TIMEOUT_S` instead.
- **Stopping** (time limit, abort, agent shutdown): SIGTERM to the container's PID 1
  (docker-init, which forwards it to the bootstrap, which forwards it to the step's
  process group), `grace_s`, then SIGKILL, which ends every process in the container.
- **Nothing left behind.** The container is registered with the agent's watchdog from
  creation to removal (agent SIGKILL → the watchdog removes it) and force-removed
  (with its anonymous volumes) in a `finally`, whatever happened: normal exit, stop,
  start failure, agent error, KeyboardInterrupt.
- **Outcome** from the bootstrap's stage file: `exit N` → the step's own status (N < 0:
  killed by signal -N) mapped as on the host; `setup_failed N` → setup_failed with the
  setup script's exit code; `environment_failed` → setup_failed with the installer's
  message; a container killed before the step reported (OOM) → the engine's exit code
  (128+N → signal N), with "out of memory" when the engine says OOMKilled.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import docker
import requests
from docker.errors import APIError, DockerException, NotFound

from agent.environments.container_boot import MARK
from agent.environments.docker import ContainerSpec, control_folder, prepare_container
from agent.environments.errors import ContainerError
from agent.environments.venv import DEFAULT_DISK_BUDGET_BYTES, evict_venvs
from agent.output import OutputCallback, OutputPump
from agent.supervisor import StepOutcome, step_outcome
from agent.watchdog import guard_container, release_container
from controller.models import StatusReason, TaskRecord

if TYPE_CHECKING:
    from agent.executor import ExecutionSettings

log = logging.getLogger(__name__)

_POLL_S = 0.2
_INSPECT_EVERY_S = 1.0
#: Longest the setup script plus the venv build may take before the step starts.
SETUP_TIMEOUT_S = 3600.0
_SETUP_TIMEOUT = "setup_timeout"
_ENGINE_ERRORS = (DockerException, requests.RequestException, OSError)


def _one_line(exc: BaseException) -> str:
    explanation = getattr(exc, "explanation", None) or str(exc)
    return " ".join(str(explanation).split())


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return ""


def _agent_lines(on_output: OutputCallback) -> OutputCallback:
    def deliver(batch: list[dict[str, Any]]) -> None:
        for entry in batch:
            if entry["line"].startswith(MARK):
                entry["line"] = entry["line"][len(MARK):]
                entry["stream"] = "agent"
        on_output(batch)

    return deliver


def _pump(stream: Any, pump: OutputPump) -> None:
    try:
        for stdout, stderr in stream:
            if stdout:
                pump.feed("stdout", stdout)
            if stderr:
                pump.feed("stderr", stderr)
    except _ENGINE_ERRORS as exc:  # the container was removed under us, or the engine left
        log.debug("container output stream ended: %s", exc)


def _state(api: Any, container_id: str) -> dict[str, Any]:
    return api.inspect_container(container_id)["State"]


def _exited(state: dict[str, Any]) -> bool:
    return not state.get("Running") and state.get("Status") in ("exited", "dead")


def _wait_exited(api: Any, container_id: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not _exited(_state(api, container_id)):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def _stop(api: Any, container_id: str, grace_s: float) -> None:
    """SIGTERM, `grace_s`, SIGKILL."""
    for sig, wait_s in (("SIGTERM", grace_s), ("SIGKILL", 10.0)):
        try:
            api.kill(container_id, signal=sig)
        except APIError:  # not running any more
            pass
        if _wait_exited(api, container_id, wait_s):
            return


def _remove(api: Any, container_id: str) -> None:
    try:
        api.remove_container(container_id, force=True, v=True)
    except NotFound:
        pass
    except _ENGINE_ERRORS as exc:
        log.warning("cannot remove container %s: %s", container_id[:12], _one_line(exc))
        return  # still guarded: the watchdog or the next daemon start removes it
    release_container(container_id)


def _outcome(
    run_dir: Path,
    state: dict[str, Any],
    stop_reason: str | None,
    time_limit_s: float | None,
    duration_s: float,
    output_error: str | None,
) -> StepOutcome:
    stage = _read(run_dir / "stage")
    engine_code = state.get("ExitCode")
    if stage.startswith("exit "):
        code: int | None = int(stage.split()[1])
    elif isinstance(engine_code, int) and engine_code > 128:
        code = -(engine_code - 128)  # killed by a signal before the bootstrap could say
    else:
        code = engine_code
    if stop_reason == _SETUP_TIMEOUT:
        return StepOutcome(code, None, StatusReason.setup_failed,
                           f"the container's setup and environment took longer than "
                           f"{SETUP_TIMEOUT_S:g} s", duration_s, output_error)
    if stop_reason is not None or stage.startswith("exit "):
        return step_outcome(code, stop_reason, time_limit_s, duration_s, output_error)
    setup_failure = {
        "environment_failed": _read(run_dir / "error") or "the container's environment failed",
        "no_python": "the image has no python3 or python on its PATH",
        "start_failed": "cannot start the entry point in the container (see the log)",
    }
    if stage.startswith("setup_failed"):
        script_code = int(stage.split()[1])
        message = f"the container setup script failed with exit code {script_code}"
        return StepOutcome(script_code, None, StatusReason.setup_failed, message, duration_s,
                           output_error)
    if stage in setup_failure:
        return StepOutcome(code, None, StatusReason.setup_failed, setup_failure[stage],
                           duration_s, output_error)
    outcome = step_outcome(code, None, time_limit_s, duration_s, output_error)
    if state.get("OOMKilled"):
        message = f"{outcome.message}: out of memory (the container's memory limit)"
        return StepOutcome(code, outcome.signal_name, outcome.reason, message, duration_s,
                           output_error)
    if stage != "run":  # died in the setup script or the venv build
        return StepOutcome(code, None, StatusReason.setup_failed,
                           f"the container exited with code {engine_code} during {stage or 'start'}",
                           duration_s, output_error)
    return outcome


def run_container(
    client: docker.DockerClient,
    spec: ContainerSpec,
    time_limit_s: float | None,
    on_output: OutputCallback,
    should_abort: Callable[[], str | None],
    grace_s: float = 10.0,
    *,
    flush_interval_s: float = 0.25,
) -> StepOutcome:
    """Create, start, supervise and remove the container of `spec`; how the step ended.

    ContainerError if the container cannot be created or started, or the engine is lost
    while it runs (the container is removed all the same).
    """
    api = client.api
    started = time.monotonic()
    try:
        container = client.containers.create(spec.image_id, name=spec.name, **spec.create_kwargs)
    except _ENGINE_ERRORS as exc:
        raise ContainerError(f"cannot create a container from image {spec.image!r}: "
                             f"{_one_line(exc)}") from None
    guard_container(container.id)
    pump = OutputPump(_agent_lines(on_output), flush_interval_s=flush_interval_s)
    reader: threading.Thread | None = None
    run_started: float | None = None
    ended_at: float | None = None
    stop_reason: str | None = None
    try:
        try:
            stream = api.attach(container.id, stdout=True, stderr=True, stream=True, demux=True)
            reader = threading.Thread(target=_pump, args=(stream, pump), daemon=True,
                                      name=f"container-{spec.name}")
            reader.start()
            container.start()
        except _ENGINE_ERRORS as exc:
            raise ContainerError(f"the container from image {spec.image!r} failed to start: "
                                 f"{_one_line(exc)}") from None
        deadline: float | None = None
        next_inspect = 0.0
        while True:
            now = time.monotonic()
            if run_started is None and _read(spec.run_dir / "stage").startswith(("run", "exit")):
                run_started = now
                deadline = now + time_limit_s if time_limit_s else None
            if not reader.is_alive() or now >= next_inspect:
                next_inspect = now + _INSPECT_EVERY_S
                if _exited(_state(api, container.id)):
                    ended_at = now
                    break
            if deadline is not None and now >= deadline:
                stop_reason = StatusReason.time_limit
                break
            if run_started is None and now - started >= SETUP_TIMEOUT_S:
                stop_reason = _SETUP_TIMEOUT
                break
            try:
                abort = should_abort()
            except Exception:  # a broken callback must not leave the step unsupervised
                abort = None
            if abort:
                stop_reason = abort
                break
            reader.join(_POLL_S if deadline is None else max(0.0, min(_POLL_S, deadline - now)))
        if stop_reason is not None:
            _stop(api, container.id, grace_s)
        state = _state(api, container.id)
    except _ENGINE_ERRORS as exc:
        raise ContainerError(f"lost the docker engine while the container ran: "
                             f"{_one_line(exc)}") from None
    finally:
        _remove(api, container.id)
        if reader is not None:
            reader.join(5.0)
        output_error = pump.close()
    duration = (ended_at or time.monotonic()) - (run_started or ended_at or time.monotonic())
    return _outcome(spec.run_dir, state, stop_reason, time_limit_s, duration, output_error)


# ----------------------------------------------------------------- entry point
def run_task_in_container(
    task: TaskRecord,
    image_name: str,
    checkout_root: Path,
    run_in: Path,
    requirements_file: Path | None,
    argv_for: Callable[[Path], list[str]],
    settings: ExecutionSettings,
    say: Callable[[str], None],
    on_output: Callable[[list[dict[str, Any]]], None],
    should_abort: Callable[[], str | None],
    record: Callable[[dict[str, Any]], None],
) -> StepOutcome:
    """Run the task's step in a container from `image_name`; how it ended.

    Raises ContainerError / DockerArgsError when the container cannot be prepared or
    started; failures inside it (setup script, packages) come back as an outcome with
    reason setup_failed.
    """
    assert settings.docker is not None
    try:
        spec = prepare_container(
            task, image_name, checkout_root, run_in, requirements_file, argv_for, settings, say
        )
        record({"container": {"image": spec.image, "image_id": spec.image_id, "name": spec.name}})
        say(f"starting container {spec.name} from image {spec.image}")
        outcome = run_container(
            settings.docker.engine.client(), spec, task.execution.time_limit_s, on_output,
            should_abort, settings.stop_grace_s,
        )
    finally:
        if not settings.keep_work_dirs:
            shutil.rmtree(control_folder(task, settings), ignore_errors=True)
    evict_venvs(spec.venv_root, DEFAULT_DISK_BUDGET_BYTES, spec.venv_key, say)
    return outcome
