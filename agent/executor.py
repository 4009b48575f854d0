"""What happens to one claimed task: checkout → environment → run → report.

`execute_task` reads top to bottom as the life of a task on a worker; each stage is one
function of its own module (`checkout`, `environments.venv` + `supervisor` on the host,
or `environments.docker` + `container_supervisor` for a task with a container image).
Whatever happens, the task leaves this function in a final status with a precise
reason, unless the control plane already decided its fate (lease expired, deleted),
which the report then leaves alone.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.checkout import CheckoutError, checkout_task_code
from agent.environments.errors import ContainerError
from agent.environments.venv import EnvironmentBuildError, ensure_venv
from agent.supervisor import StepOutcome, run_step
from controller.backend import Backend, conveyor_home
from controller.errors import ConveyorError
from controller.models import StatusReason, TaskRecord, TaskStatus

if TYPE_CHECKING:
    from agent.environments.docker import DockerSettings

log = logging.getLogger(__name__)

#: Seconds between SIGTERM and SIGKILL when a step is stopped.
DEFAULT_STOP_GRACE_S = 10.0
#: Agent messages (checkout, installer output) are sent to the task log this often.
AGENT_LOG_FLUSH_S = 0.25
#: Hyperparameter section whose values become environment variables of the step.
ENVIRONMENT_SECTION = "Environment"


@dataclass
class ExecutionSettings:
    """How this agent runs tasks (shared by every task of a daemon)."""

    worker_id: str
    api_url: str
    api_token: str | None = None
    home: Path = field(default_factory=conveyor_home)
    python: str = sys.executable
    stop_grace_s: float = DEFAULT_STOP_GRACE_S
    keep_work_dirs: bool = False
    index_args: list[str] | None = None
    #: `all` or GPU ids like `0,1`: the GPUs this worker gives its steps (None: not set).
    gpus: str | None = None
    #: Set when the agent runs container steps (`--docker`); None: it does not.
    docker: DockerSettings | None = None

    @property
    def env_cache(self) -> Path:
        """Root of the environment caches (venvs/, uv-cache/, sdk/)."""
        return self.home / "cache"

    @property
    def git_cache(self) -> Path:
        """Where repository mirrors live."""
        return self.home / "cache" / "git"

    @property
    def work_root(self) -> Path:
        """Where per-task work directories are made."""
        return self.home / "work"


class TaskLog:
    """Buffers agent messages for a task's log and sends them in batches."""

    def __init__(self, backend: Backend, task_id: str) -> None:
        self._backend = backend
        self._task_id = task_id
        self._pending: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._last_flush = time.monotonic()

    def agent(self, message: str) -> None:
        """Record one line from the agent itself (stream "agent")."""
        with self._lock:
            self._pending.append({"line": message, "stream": "agent", "timestamp": time.time()})
        if time.monotonic() - self._last_flush >= AGENT_LOG_FLUSH_S:
            self.flush()

    def output(self, batch: list[dict[str, Any]]) -> None:
        """Record a batch of step output (from the supervisor's delivery thread)."""
        self.flush()
        self._send(batch)

    def flush(self) -> None:
        """Send what is buffered."""
        with self._lock:
            batch, self._pending = self._pending, []
            self._last_flush = time.monotonic()
        if batch:
            self._send(batch)

    def _send(self, batch: list[dict[str, Any]]) -> None:
        try:
            self._backend.append_log(self._task_id, batch)
        except ConveyorError as exc:  # a lost log line must not kill the step
            log.warning("cannot send %d log line(s) of task %s: %s", len(batch), self._task_id, exc)


def execute_task(
    backend: Backend,
    task: TaskRecord,
    settings: ExecutionSettings,
    should_abort: Callable[[], str | None],
) -> TaskStatus | None:
    """Run a task this worker holds (status in_progress) and report how it ended.

    `should_abort()` returns a StatusReason (aborted, agent_shutdown) once the step must
    stop. Returns the final status reported, or None if the control plane refused it.
    """
    task_log = TaskLog(backend, task.id)
    work_dir = settings.work_root / f"{task.id}-{task.runtime.attempt}"
    task_log.agent(f"worker {settings.worker_id} runs task {task.id} (attempt {task.runtime.attempt})")
    image = task.container.image.strip() or (settings.docker.default_image if settings.docker else "")
    if image and settings.docker is None:
        message = (f"the task asks for container image {image!r} but worker {settings.worker_id} "
                   "was not started with --docker: refusing to run it on the host")
        task_log.agent(f"error: {message}")
        task_log.flush()
        return report(backend, task.id, settings.worker_id, TaskStatus.failed, StatusReason.setup_failed, message)
    shutil.rmtree(work_dir, ignore_errors=True)  # a leftover of a crashed agent
    try:
        checkout = checkout_task_code(task.script, work_dir, settings.git_cache, task_log.agent)
        _record_runtime(backend, task.id, {"commit_used": checkout.commit_used})
        if image:
            outcome = run_in_container(backend, task, image, work_dir, checkout.path_to_run_in,
                                       settings, task_log, should_abort)
        else:
            with prepare_environment(task, checkout.path_to_run_in, settings, task_log.agent) as venv:
                argv = build_argv(task, venv.python_path)
                env = build_env(task, settings, venv.path)
                task_log.agent(f"running: {shlex.join(argv)} (in {checkout.path_to_run_in})")
                task_log.flush()
                outcome = run_step(
                    argv,
                    checkout.path_to_run_in,
                    env,
                    task.execution.time_limit_s,
                    task_log.output,
                    should_abort,
                    grace_s=settings.stop_grace_s,
                )
    except (CheckoutError, EnvironmentBuildError, ContainerError) as exc:
        task_log.agent(f"error: {exc}")
        task_log.flush()
        return report(backend, task.id, settings.worker_id, TaskStatus.failed, StatusReason.setup_failed, str(exc))
    except Exception as exc:  # noqa: BLE001 - an agent bug must still end the task
        log.exception("task %s failed inside the agent", task.id)
        task_log.agent(f"internal agent error: {exc!r}")
        task_log.flush()
        return report(backend, task.id, settings.worker_id, TaskStatus.failed, StatusReason.setup_failed,
                      f"internal agent error: {exc!r}")
    finally:
        if not settings.keep_work_dirs:
            shutil.rmtree(work_dir, ignore_errors=True)
    task_log.flush()
    _record_runtime(
        backend, task.id, {"exit_code": outcome.exit_code, "duration_s": round(outcome.duration_s, 3)}
    )
    status = outcome_status(outcome)
    task_log.agent(f"step ended: {outcome.message}")
    task_log.flush()
    return report(backend, task.id, settings.worker_id, status, outcome.reason, outcome.message)


def run_in_container(
    backend: Backend,
    task: TaskRecord,
    image: str,
    work_dir: Path,
    run_dir: Path,
    settings: ExecutionSettings,
    task_log: TaskLog,
    should_abort: Callable[[], str | None],
) -> StepOutcome:
    """The step of `task` in a container from `image` (see `agent.environments.docker`)."""
    from agent.environments.docker import run_task_in_container

    outcome = run_task_in_container(
        task, image, work_dir, run_dir, requirements_file_for(task, run_dir),
        lambda python: build_argv(task, python), settings, task_log.agent, task_log.output,
        should_abort, lambda values: _record_runtime(backend, task.id, values),
    )
    return outcome


def requirements_file_for(task: TaskRecord, run_dir: Path) -> Path | None:
    """The task's requirements file: `script.requirements_file`, else the repo's
    requirements.txt when the task lists no packages, else None."""
    if task.script.requirements_file:
        return (run_dir / task.script.requirements_file).resolve()
    if not task.packages and (run_dir / "requirements.txt").is_file():
        return run_dir / "requirements.txt"
    return None


def prepare_environment(
    task: TaskRecord, run_dir: Path, settings: ExecutionSettings, say: Callable[[str], None]
) -> Any:
    """The virtualenv for the task's packages (or its repo's requirements.txt)."""
    requirements_file = requirements_file_for(task, run_dir)
    if requirements_file is not None:
        say(f"installing from {requirements_file.name}")
    venv = ensure_venv(
        settings.python,
        list(task.packages),
        requirements_file,
        settings.env_cache,
        say,
        index_args=settings.index_args,
    )
    say(f"environment ready in {venv.seconds * 1000:.0f} ms ({'cached' if venv.cache_hit else 'built'}: {venv.path})")
    return venv


def build_argv(task: TaskRecord, python: Path) -> list[str]:
    """The command line of the step: `script.py args`, `-m module args` or a program."""
    entry = shlex.split(task.script.entry_point or "")
    if not entry:
        entry = ["script.py"] if task.script.code else []
    if not entry:
        raise CheckoutError("the task has no entry point to run")
    binary = task.script.binary or "python"
    if binary.startswith("python") or entry[0] == "-m" or entry[0].endswith(".py"):
        return [str(python), *entry]
    return [binary, *entry]


def build_env(task: TaskRecord, settings: ExecutionSettings, venv_path: Path | None) -> dict[str, str]:
    """The step's environment: the agent's, the task's Environment section, Conveyor's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env["CONVEYOR_HOME"] = str(settings.home)
    for name, value in (task.hyperparams.get(ENVIRONMENT_SECTION) or {}).items():
        env[str(name)] = "" if value is None else str(value)
    env.update(
        CONVEYOR_TASK_ID=task.id,
        CONVEYOR_API=settings.api_url,
        CONVEYOR_WORKER_ID=settings.worker_id,
        PYTHONUNBUFFERED="1",
    )
    if settings.api_token:
        env["CONVEYOR_API_TOKEN"] = settings.api_token
    if settings.gpus and settings.gpus != "all":
        env["CUDA_VISIBLE_DEVICES"] = env["NVIDIA_VISIBLE_DEVICES"] = settings.gpus
    if venv_path is not None:
        env["VIRTUAL_ENV"] = str(venv_path)
        env["PATH"] = f"{venv_path / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env.pop("PYTHONHOME", None)
    return env


def outcome_status(outcome: StepOutcome) -> TaskStatus:
    """The status a step outcome maps to."""
    if outcome.reason == StatusReason.completed:
        return TaskStatus.completed
    if outcome.reason in (StatusReason.time_limit, StatusReason.aborted, StatusReason.agent_shutdown):
        return TaskStatus.stopped
    return TaskStatus.failed


def report(
    backend: Backend, task_id: str, worker_id: str, status: TaskStatus, reason: str, message: str
) -> TaskStatus | None:
    """Set the final status as the holding worker; None if the control plane refused it."""
    try:
        backend.set_status(task_id, status, reason=reason, message=message, worker_id=worker_id)
        return status
    except ConveyorError as exc:
        log.warning("task %s: could not report %s (%s): %s", task_id, status.value, message, exc)
        return None


def _record_runtime(backend: Backend, task_id: str, values: Mapping[str, Any]) -> None:
    try:
        backend.edit_task(task_id, {"runtime": dict(values)}, force=True)
    except ConveyorError as exc:
        log.warning("task %s: cannot record %s: %s", task_id, ", ".join(values), exc)
