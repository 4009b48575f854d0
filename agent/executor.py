"""What happens to one claimed task: checkout → environment → run → report.

`execute_task` reads top to bottom as the life of a task on a worker; each stage is one
function of its own module (`checkout`, `environments.venv` + `supervisor` on the host,
or `environments.docker` + `container_supervisor` for a task with a container image).
On the host, a Python step of a daemon's task is forked by the warm interpreter of its
venv when it can start exactly as a cold one would (`agent.forkserver`), else started cold.
Whatever happens, the task leaves this function in a final status with a precise
reason, unless the control plane already decided its fate (lease expired, deleted),
which the report then leaves alone.

The final report is durable: status, reason, message, runtime figures (commit, exit
code, duration) and every log line not yet delivered are written to the worker's
outbox under CONVEYOR_HOME first, then delivered with backoff until the control plane
acknowledges or refuses them (`agent.outbox`), so a control-plane outage while a step
ends loses nothing; a restarted daemon replays the outbox before claiming.
"""

from __future__ import annotations

import contextlib
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
from agent.environments.venv import EnvironmentBuildError, ensure_venv, find_uv
from agent.outbox import Outbox, form_chunks, make_report
from agent.supervisor import LastExceptionLine, Launcher, StepOutcome, run_step, with_exception
from controller.backend import Backend
from controller.connect import conveyor_home
from controller.errors import BackendUnavailableError, ConveyorError, NotFoundError
from controller.models import StatusReason, TaskRecord, TaskStatus

if TYPE_CHECKING:
    from agent.environments.docker import DockerSettings
    from agent.forkserver import ForkServers

log = logging.getLogger(__name__)

#: Seconds between SIGTERM and SIGKILL when a step is stopped.
DEFAULT_STOP_GRACE_S = 10.0
#: Agent messages (checkout, installer output) are sent to the task log this often.
AGENT_LOG_FLUSH_S = 0.25
#: First and longest wait before log lines that could not be sent are tried again.
LOG_FIRST_RETRY_S = 0.5
LOG_MAX_RETRY_S = 5.0
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
    #: Run host steps with `python` itself, in this process's environment, instead of a
    #: venv of the task's packages (`agent execute --own-environment`: a pipeline's
    #: local steps run in the pipeline's own interpreter and environment).
    own_environment: bool = False
    #: Warm interpreters of the cached venvs (set by the daemon); None: every step starts cold.
    fork_servers: ForkServers | None = None

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
    """Buffers a task's log lines and sends them in batches, keeping what cannot be sent.

    Agent messages are batched every AGENT_LOG_FLUSH_S; step output arrives in batches
    from the supervisor's delivery thread, except the lines still pending when the
    step ended, which are kept (`keep`) for the final report, the same store write as
    the agent's last lines. While the control plane is unreachable,
    lines stay here in order (a new attempt at most every few seconds, with backoff),
    and whatever is still unsent when the task ends goes into its final report
    (`take_unsent`), so no line is lost to an outage. Every chunk carries a batch id
    fixed when it is formed, so a chunk resent after a lost answer is not doubled.
    """

    def __init__(self, backend: Backend, task_id: str) -> None:
        self._backend = backend
        self._task_id = task_id
        self._pending: list[dict[str, Any]] = []  # lines not yet formed into chunks
        self._chunks: list[dict[str, Any]] = []  # formed chunks not yet delivered
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._last_flush = time.monotonic()
        self._retry_at = 0.0
        self._retry_wait_s = LOG_FIRST_RETRY_S

    def agent(self, message: str) -> None:
        """Record one line from the agent itself (stream "agent")."""
        with self._lock:
            self._pending.append({"line": message, "stream": "agent", "timestamp": time.time()})
        if time.monotonic() - self._last_flush >= AGENT_LOG_FLUSH_S:
            self.flush()

    def output(self, batch: list[dict[str, Any]]) -> None:
        """Record a batch of step output (from the supervisor's delivery thread)."""
        with self._lock:
            self._pending.extend(batch)
        self.flush()

    def flush(self) -> None:
        """Send what is buffered (unless the last attempt failed moments ago).

        Buffered lines are formed into chunks with a batch id each (`form_chunks`) when
        they are first sent; a chunk that could not be sent (or whose answer was lost) is
        retried as it is, with the same id, so the store appends it once.
        """
        with self._send_lock:
            with self._lock:
                self._last_flush = time.monotonic()
                if not (self._pending or self._chunks) or self._last_flush < self._retry_at:
                    return
                if self._pending:
                    self._chunks.extend(form_chunks(self._pending))
                    self._pending = []
                chunks = list(self._chunks)
            done = self._send(chunks)
            with self._lock:
                del self._chunks[:done]

    def keep(self, batch: list[dict[str, Any]]) -> None:
        """Record the step's last batch of output without sending it: the final report
        (`take_unsent`) carries it, in the same store write as the agent's last lines."""
        with self._lock:
            self._pending.extend(batch)

    def take_unsent(self) -> list[dict[str, Any]]:
        """The chunks not delivered yet (`{"batch_id", "lines"}`, oldest first); they are
        no longer this buffer's to send."""
        with self._send_lock, self._lock:
            unsent = self._chunks + form_chunks(self._pending)
            self._chunks, self._pending = [], []
        return unsent

    def _send(self, chunks: list[dict[str, Any]]) -> int:
        """Deliver `chunks` in order; how many (from the start) are done with."""
        done = 0
        for chunk in chunks:
            try:
                self._backend.append_log(self._task_id, chunk["lines"], batch_id=chunk["batch_id"])
            except BackendUnavailableError as exc:
                return self._retry_later(done, chunks, exc)
            except NotFoundError as exc:  # the task is gone: nobody can read these lines
                log.warning("dropping %d log line(s) of task %s: %s",
                            _count_lines(chunks[done:]), self._task_id, exc)
                return len(chunks)
            except ConveyorError as exc:  # refused as invalid: sending it again cannot help
                log.warning("dropping %d log line(s) of task %s: %s", len(chunk["lines"]), self._task_id, exc)
            except Exception as exc:  # noqa: BLE001 - e.g. a raw database error: the step goes on
                return self._retry_later(done, chunks, exc)
            done += 1
        self._retry_at, self._retry_wait_s = 0.0, LOG_FIRST_RETRY_S
        return done

    def _retry_later(self, done: int, chunks: list[dict[str, Any]], error: Exception) -> int:
        log.warning("cannot send %d log line(s) of task %s yet (next try in %.1f s): %s: %s",
                    _count_lines(chunks[done:]), self._task_id, self._retry_wait_s,
                    type(error).__name__, error)
        self._retry_at = time.monotonic() + self._retry_wait_s
        self._retry_wait_s = min(self._retry_wait_s * 2, LOG_MAX_RETRY_S)
        return done


def _count_lines(chunks: list[dict[str, Any]]) -> int:
    return sum(len(chunk["lines"]) for chunk in chunks)


def execute_task(
    backend: Backend,
    task: TaskRecord,
    settings: ExecutionSettings,
    should_abort: Callable[[], str | None],
    *,
    give_up_report: Callable[[], bool] = lambda: False,
) -> TaskStatus | None:
    """Run a task this worker holds (status in_progress) and report how it ended.

    `should_abort()` returns a StatusReason (aborted, agent_shutdown) once the step must
    stop. The final report goes through the worker's outbox (`agent.outbox`) and is
    retried while the control plane is unreachable, until `give_up_report()` turns true
    (it then stays in the outbox for the next start). Returns the final status
    reported, or None if the control plane refused it or it is still pending.
    """
    task_log = TaskLog(backend, task.id)
    runtime: dict[str, Any] = {}

    def finish(status: TaskStatus, reason: str, message: str) -> TaskStatus | None:
        return report(backend, settings, task.id, status, reason, message,
                      runtime=runtime, task_log=task_log, give_up=give_up_report)

    exception = LastExceptionLine()  # names the exception in a failed step's message
    step_output = exception.watching(task_log.output)
    work_dir = settings.work_root / f"{task.id}-{task.runtime.attempt}"
    task_log.agent(f"worker {settings.worker_id} runs task {task.id} (attempt {task.runtime.attempt})")
    image = task.container.image.strip() or (settings.docker.default_image if settings.docker else "")
    if image and settings.docker is None:
        message = (f"the task asks for container image {image!r} but worker {settings.worker_id} "
                   "was not started with --docker: refusing to run it on the host")
        task_log.agent(f"error: {message}")
        return finish(TaskStatus.failed, StatusReason.setup_failed, message)
    shutil.rmtree(work_dir, ignore_errors=True)  # a leftover of a crashed agent
    try:
        checkout = checkout_task_code(task.script, work_dir, settings.git_cache, task_log.agent)
        runtime["commit_used"] = checkout.commit_used
        if checkout.commit_used:  # a repository's commit, shown while the step runs; else only in the report
            _record_runtime(backend, task.id, {"commit_used": checkout.commit_used})
        if image:
            outcome = run_in_container(backend, task, image, work_dir, checkout.path_to_run_in,
                                       settings, task_log, should_abort, step_output)
        else:
            with own_or_prepared_environment(task, checkout.path_to_run_in, settings, task_log.agent) as venv:
                argv = build_argv(task, venv.python_path if venv else Path(settings.python))
                env = build_env(task, settings, venv.path if venv else None)
                task_log.agent(f"running: {shlex.join(argv)} (in {checkout.path_to_run_in})")
                # The lines so far are sent once the step has run AGENT_LOG_FLUSH_S (or with
                # its first output): a shorter step sends them with its final report instead
                # of one more store write on its way to start.
                early_flush = threading.Timer(AGENT_LOG_FLUSH_S, task_log.flush)
                early_flush.daemon = True
                early_flush.start()
                try:
                    outcome = run_step(
                        argv,
                        checkout.path_to_run_in,
                        env,
                        task.execution.time_limit_s,
                        step_output,
                        should_abort,
                        grace_s=settings.stop_grace_s,
                        launch=warm_launcher(settings, venv.python_path, task_log.agent) if venv else None,
                        on_final_output=exception.watching(task_log.keep),
                    )
                finally:
                    early_flush.cancel()
    except (CheckoutError, EnvironmentBuildError, ContainerError) as exc:
        task_log.agent(f"error: {exc}")
        return finish(TaskStatus.failed, StatusReason.setup_failed, str(exc))
    except Exception as exc:  # noqa: BLE001 - an agent bug must still end the task
        log.exception("task %s failed inside the agent", task.id)
        task_log.agent(f"internal agent error: {exc!r}")
        return finish(TaskStatus.failed, StatusReason.setup_failed, f"internal agent error: {exc!r}")
    finally:
        if not settings.keep_work_dirs:
            shutil.rmtree(work_dir, ignore_errors=True)
    outcome = with_exception(outcome, exception.line)
    runtime.update(exit_code=outcome.exit_code, duration_s=round(outcome.duration_s, 3))
    task_log.agent(f"step ended: {outcome.message}")
    return finish(outcome_status(outcome), outcome.reason, outcome.message)


def warm_launcher(settings: ExecutionSettings, python: Path, say: Callable[[str], None]) -> Launcher | None:
    """Start a step of the venv of `python` from its fork server (None: no fork servers)."""
    servers = settings.fork_servers
    if servers is None:
        return None
    return lambda argv, cwd, env: servers.launch(python, argv, cwd, env, say)


def run_in_container(
    backend: Backend,
    task: TaskRecord,
    image: str,
    work_dir: Path,
    run_dir: Path,
    settings: ExecutionSettings,
    task_log: TaskLog,
    should_abort: Callable[[], str | None],
    on_output: Callable[[list[dict[str, Any]]], None] | None = None,
) -> StepOutcome:
    """The step of `task` in a container from `image` (see `agent.environments.docker`).

    The step's output goes to `on_output` (default: the task log)."""
    from agent.container_supervisor import run_task_in_container

    outcome = run_task_in_container(
        task, image, work_dir, run_dir, requirements_file_for(task, run_dir),
        lambda python: build_argv(task, python), settings, task_log.agent,
        on_output or task_log.output,
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


def own_or_prepared_environment(
    task: TaskRecord, run_dir: Path, settings: ExecutionSettings, say: Callable[[str], None]
) -> Any:
    """A context giving the task's venv, or None with `settings.own_environment`."""
    if settings.own_environment:
        say(f"running in this environment ({settings.python}); the task's packages are not installed")
        return contextlib.nullcontext(None)
    return prepare_environment(task, run_dir, settings, say)


def prepare_environment(
    task: TaskRecord, run_dir: Path, settings: ExecutionSettings, say: Callable[[str], None]
) -> Any:
    """The virtualenv for the task's packages (or its repo's requirements.txt)."""
    requirements_file = requirements_file_for(task, run_dir)
    if requirements_file is not None:
        say(f"installing from {requirements_file.name}")

    def say_and_report_builds(message: str) -> None:
        if message.startswith("building virtualenv"):  # ensure_venv builds (no cache hit)
            progress = build_progress_line(task, requirements_file)  # looks for uv: only for a build
            log.info("task %s: %s", task.id, progress)
            say(progress)
        say(message)

    venv = ensure_venv(
        settings.python,
        list(task.packages),
        requirements_file,
        settings.env_cache,
        say_and_report_builds,
        index_args=settings.index_args,
    )
    say(f"environment ready in {venv.seconds * 1000:.0f} ms ({'cached' if venv.cache_hit else 'built'}: {venv.path})")
    return venv


def build_progress_line(task: TaskRecord, requirements_file: Path | None) -> str:
    """The one line a venv build reports: "building venv: numpy==1.26.4, pandas (uv)"."""
    what = [*task.packages]
    if requirements_file is not None:
        what.append(f"-r {requirements_file.name}")
    installer = "uv" if find_uv() else "pip"
    return f"building venv: {', '.join(what) or 'no packages'} ({installer})"


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
    backend: Backend,
    settings: ExecutionSettings,
    task_id: str,
    status: TaskStatus,
    reason: str,
    message: str,
    *,
    runtime: Mapping[str, Any] | None = None,
    task_log: TaskLog | None = None,
    give_up: Callable[[], bool] = lambda: False,
) -> TaskStatus | None:
    """End the task as the holding worker, durably (see `agent.outbox`).

    The report (with `runtime` figures and the log lines `task_log` could not send)
    is written to the worker's outbox first, then delivered until acknowledged or
    refused. Returns the status reported; None if refused or still pending.
    """
    unsent = task_log.take_unsent() if task_log is not None else []
    entry = make_report(task_id, settings.worker_id, status, reason, message, runtime, unsent)
    outbox = Outbox(settings.home, settings.worker_id)
    try:
        outbox.save(entry)
    except OSError as exc:  # a full or read-only disk: still try to deliver it once
        log.error("task %s: cannot write its report to %s: %s", task_id, outbox.path, exc)
    return outbox.deliver(backend, entry, give_up)


def _record_runtime(backend: Backend, task_id: str, values: Mapping[str, Any]) -> None:
    try:
        backend.edit_task(task_id, {"runtime": dict(values)}, force=True)
    except ConveyorError as exc:
        log.warning("task %s: cannot record %s: %s", task_id, ", ".join(values), exc)
