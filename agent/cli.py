"""`agent daemon | execute | list | stop`: the worker-side command line.

Thin commands: parse, call one function of `agent.daemon`, print. Errors are one line
(`error: ...`, exit 1; usage mistakes such as a malformed queue name exit 2), with the
traceback only under `agent --debug`.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import click
import psutil

from agent.daemon import (
    DEFAULT_SHUTDOWN_GRACE_S,
    AgentDaemon,
    agents_dir,
    default_worker_id,
    local_agents,
)
from agent.executor import DEFAULT_STOP_GRACE_S, ExecutionSettings
from controller import __version__
from controller.backend import Backend
from controller.cli import QUEUE_NAME, OneLineErrorGroup
from controller.cli_format import format_duration, next_offset
from controller.connect import backend_from_url, conveyor_home, default_api_url
from controller.errors import ConveyorError
from controller.models import DEFAULT_LEASE_S, LogLine, StatusReason, TaskStatus

#: Seconds between two reads of the task log by `agent execute` (it echoes the step's output).
ECHO_POLL_S = 0.25
#: Seconds between two progress lines of `agent stop`.
STOP_PROGRESS_EVERY_S = 5.0


def _fail(message: str) -> None:
    """Print `error: message` (after the traceback of the error being handled, with --debug)."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None and ctx.find_root().params.get("debug") and sys.exc_info()[0] is not None:
        traceback.print_exc()
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


def _setup_logging(log_file: Path | None, verbose: bool) -> None:
    handler: logging.Handler
    if log_file is None:
        handler = logging.StreamHandler(sys.stderr)
    else:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


#: What `--docker` given without an image stands for.
_DOCKER_WITHOUT_DEFAULT_IMAGE = "\0no-default-image"


def _settings(
    api: str, token: str | None, worker_id: str, grace: float,
    docker: str | None = None, allow_privileged: bool = False, gpus: str | None = None,
    allowed_mounts: tuple[str, ...] = (),
) -> ExecutionSettings:
    docker_settings = None
    if docker is not None:
        from agent.environments.docker import DockerSettings

        default_image = "" if docker == _DOCKER_WITHOUT_DEFAULT_IMAGE else docker.strip()
        docker_settings = DockerSettings(default_image=default_image, allow_privileged=allow_privileged,
                                         allowed_mounts=allowed_mounts)
    elif allow_privileged:
        _fail("--allow-privileged only applies to container steps: add --docker")
    elif allowed_mounts:
        _fail("--allow-mount only applies to container steps: add --docker")
    return ExecutionSettings(
        worker_id=worker_id, api_url=api, api_token=token, home=conveyor_home(), stop_grace_s=grace,
        gpus=gpus or None, docker=docker_settings,
    )


def _daemonize(log_file: Path) -> None:
    """Detach from the terminal (double fork); output goes to the log file."""
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(os.devnull, "rb") as devnull:
        os.dup2(devnull.fileno(), 0)
    with open(log_file, "ab") as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)


api_option = click.option(
    "--api", envvar="CONVEYOR_API", default=None, show_envvar=True,
    help="Control plane: sqlite:///path, postgresql://..., or http://host:port "
    "(default: the embedded store under CONVEYOR_HOME).",
)
token_option = click.option(
    "--token", envvar="CONVEYOR_API_TOKEN", default=None, show_envvar=True,
    help="Bearer token for an http:// API.",
)


def _allowed_mount_folders(
    ctx: click.Context, param: click.Parameter, folders: tuple[str, ...]
) -> tuple[str, ...]:
    """`--allow-mount` values: absolute existing paths, never the host's root."""
    for folder in folders:
        if not folder.startswith("/"):
            raise click.BadParameter(f"{folder!r} is not an absolute path (e.g. /data)", ctx, param)
        if os.path.realpath(folder) == "/":
            raise click.BadParameter(
                f"{folder!r} is the host's root: name data folders, or use --allow-privileged "
                "to allow every host path", ctx, param)
    return folders


allow_mount_option = click.option(
    "--allow-mount", "allowed_mounts", multiple=True, metavar="PATH", callback=_allowed_mount_folders,
    type=click.Path(exists=True), envvar="CONVEYOR_AGENT_ALLOW_MOUNTS", show_envvar=True,
    help="Host folder (or file) that docker_args may mount into container steps (-v, --mount "
    "type=bind), with everything below it; repeat for several. Paths are compared after "
    "normalization (//, .., symlinks). Other host paths need --allow-privileged.",
)


def docker_options(command: Any) -> Any:
    """`--docker [IMAGE]`, `--allow-privileged` and `--gpus`, shared by daemon and execute."""
    for option in reversed([
        click.option(
            "--docker", is_flag=False, flag_value=_DOCKER_WITHOUT_DEFAULT_IMAGE, default=None,
            metavar="[IMAGE]",
            help="Run tasks that name a container image in a docker container (docker SDK; "
            "the engine must run on this machine). With IMAGE, tasks naming no image run in "
            "IMAGE too. Without --docker, a task naming an image fails instead of running on "
            "the host.",
        ),
        click.option(
            "--allow-privileged", is_flag=True,
            help="Allow docker_args that give a step the host: --privileged, --device, "
            "--cap-add, --security-opt, host namespaces (--network/--pid/--ipc/--uts host), "
            "--volumes-from, and any host path as a volume (the docker socket, /, /etc, and "
            "paths outside --allow-mount).",
        ),
        click.option(
            "--gpus", envvar="CONVEYOR_AGENT_GPUS", default=None, metavar="all|ID[,ID...]",
            help="GPUs this worker gives its steps: CUDA_VISIBLE_DEVICES/NVIDIA_VISIBLE_DEVICES "
            "on the host, a GPU device request in containers.",
        ),
    ]):
        command = option(command)
    return command


@click.group(cls=OneLineErrorGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, envvar="CONVEYOR_DEBUG",
              help="Print the traceback of an error too (errors are one line without it).")
@click.version_option(__version__, prog_name="agent")
def main(debug: bool) -> None:
    """Conveyor agent: run pipeline steps pulled from queues."""


@main.command()
@click.option("--queue", "queues", multiple=True, required=True, metavar="QUEUE", type=QUEUE_NAME,
              help="Queue to pull from; repeat (or give several: --queue a b) in priority order.")
@click.argument("more_queues", nargs=-1, metavar="[QUEUE]...", type=QUEUE_NAME)
@click.option("--concurrency", type=click.IntRange(1, 1024), default=1, show_default=True,
              envvar="CONVEYOR_AGENT_CONCURRENCY", help="Tasks run at once.")
@click.option("--order-fairness", is_flag=True, help="Take from the queues round-robin instead of in order.")
@click.option("--worker-id", envvar="CONVEYOR_WORKER_ID", default=None,
              help="Worker id (default hostname:N).")
@click.option("--foreground", is_flag=True, help="Log to the console instead of a file.")
@click.option("--detached", is_flag=True, help="Run in the background (daemonize).")
@click.option("--shutdown-grace", type=float, default=DEFAULT_SHUTDOWN_GRACE_S, show_default=True,
              help="Seconds running tasks may finish after SIGTERM before they are stopped.")
@click.option("--stop-grace", type=float, default=DEFAULT_STOP_GRACE_S, show_default=True,
              help="Seconds between SIGTERM and SIGKILL when a step is stopped.")
@click.option("--create-queue", is_flag=True, help="Create the queues if they do not exist.")
@click.option("--lease", "lease_s", type=click.FloatRange(1, 3600), default=DEFAULT_LEASE_S,
              show_default=True, envvar="CONVEYOR_AGENT_LEASE_S",
              help="Seconds a claimed task stays ours without a heartbeat (if this agent dies, "
              "its tasks fail after this long).")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@docker_options
@allow_mount_option
@api_option
@token_option
def daemon(
    queues: tuple[str, ...], more_queues: tuple[str, ...], concurrency: int, order_fairness: bool,
    worker_id: str | None, foreground: bool, detached: bool, shutdown_grace: float,
    stop_grace: float, create_queue: bool, lease_s: float, verbose: bool, docker: str | None,
    allow_privileged: bool, gpus: str | None, allowed_mounts: tuple[str, ...], api: str | None,
    token: str | None,
) -> None:
    """Pull tasks from queues and run them until stopped (SIGTERM, SIGINT or `agent stop`).

    Tasks run in cached virtualenvs on this machine; with --docker, tasks naming a
    container image run in a container from it (docker_args and the setup script
    applied, the task's packages in a venv made with the image's Python).
    """
    queue_names = list(dict.fromkeys((*queues, *more_queues)))
    for given, option in ((allow_privileged, "--allow-privileged"), (allowed_mounts, "--allow-mount")):
        if given and docker is None:
            raise click.UsageError(f"{option} only applies to container steps: add --docker")
    api = api or default_api_url()
    home = conveyor_home()
    try:
        backend = backend_from_url(api, token=token)
        known = {q.name for q in backend.list_queues()}
        for name in queue_names:
            if name not in known:
                if not create_queue:
                    _fail(f"no queue named {name!r}: create it (controller queues create {name}) "
                          "or pass --create-queue")
                backend.create_queue(name)
        worker_id = worker_id or default_worker_id(home)
    except ConveyorError as exc:
        _fail(exc.message)
    settings = _settings(api, token, worker_id, stop_grace, docker, allow_privileged, gpus,
                         allowed_mounts)
    log_file = home / "logs" / f"agent-{worker_id.replace(':', '_').replace('/', '_')}.log"
    if detached:
        click.echo(f"agent {worker_id} detached; log: {log_file}", err=True)
        backend.close()
        _daemonize(log_file)
        backend = backend_from_url(api, token=token)
    _setup_logging(None if foreground and not detached else log_file, verbose)
    agent = AgentDaemon(
        backend, settings, queue_names,
        concurrency=concurrency, order_fairness=order_fairness, shutdown_grace_s=shutdown_grace,
        lease_s=lease_s,
    )
    agent.install_signal_handlers()
    pid_file = agents_dir(home) / f"{worker_id.replace(':', '_').replace('/', '_')}.json"
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    pid_file.write_text(json.dumps({
        "worker_id": worker_id, "pid": os.getpid(), "queues": queue_names, "api": api,
        "started": time.time(), "log_file": str(log_file), "shutdown_grace_s": shutdown_grace,
    }))
    if not foreground and not detached:
        click.echo(f"agent {worker_id} on queue(s) {', '.join(queue_names)}; log: {log_file}", err=True)
    try:
        agent.run()
    except ConveyorError as exc:
        _fail(exc.message)
    finally:
        pid_file.unlink(missing_ok=True)


@main.command()
@click.option("--id", "task_id", required=True, help="The task to run.")
@click.option("--worker-id", envvar="CONVEYOR_WORKER_ID", default=None, help="Worker id (default hostname:N).")
@click.option("--stop-grace", type=float, default=DEFAULT_STOP_GRACE_S, show_default=True,
              help="Seconds between SIGTERM and SIGKILL when the step is stopped.")
@click.option("--started", is_flag=True,
              help="The task is already in_progress, held by --worker-id (a pipeline running its "
              "steps locally starts each step, then runs it with this command): run it as it is.")
@click.option("--own-environment", is_flag=True,
              help="Run the step with this agent's own Python and environment, without a venv of "
              "the task's packages (a pipeline's local steps run in the pipeline's environment).")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.option("--output/--no-output", "echo_output", default=True, show_default=True,
              help="Print the step's output (and the agent's lines about it, on stderr) while "
              "it runs, as it is written to the task log.")
@docker_options
@api_option
@token_option
def execute(task_id: str, worker_id: str | None, stop_grace: float, started: bool, own_environment: bool,
            verbose: bool, echo_output: bool, docker: str | None, allow_privileged: bool, gpus: str | None,
            api: str | None, token: str | None) -> None:
    """Run one task in the foreground (same code path as the daemon).

    The step's output is printed as it runs (stdout on stdout; its stderr and the
    agent's own lines, such as the checkout and venv build, on stderr), and recorded in
    the task log as under a daemon. The step stops on SIGTERM/SIGINT, on an abort (seen
    in the heartbeat answer) and at its time limit; the exit code is 0 if it completed,
    else 1.
    """
    _setup_logging(None, verbose)
    api = api or default_api_url()
    try:
        backend = backend_from_url(api, token=token)
        if started and not worker_id:
            _fail("--started needs the --worker-id that holds the task")
        worker_id = worker_id or default_worker_id(conveyor_home())
        task = backend.get_task(task_id)
        if started:
            if task.status == TaskStatus.stopping and task.runtime.worker == worker_id:
                backend.set_status(task_id, TaskStatus.stopped, reason=StatusReason.aborted,
                                   message="aborted before it started", worker_id=worker_id)
                _fail(f"task {task_id} was aborted before it started")
            if task.status != TaskStatus.in_progress or task.runtime.worker != worker_id:
                _fail(f"task {task_id} is {task.status.value} (worker {task.runtime.worker or 'none'}), "
                      f"not in_progress held by {worker_id}")
        elif task.status.is_terminal:
            _fail(f"task {task_id} is {task.status.value}: reset it first (controller tasks reset {task_id})")
        settings = _settings(api, token, worker_id, stop_grace, docker, allow_privileged, gpus)
        settings.own_environment = own_environment
        agent = AgentDaemon(backend, settings, [])
        if not started:  # with --started, whoever started the task registered the worker
            agent.register()
            task = backend.set_status(task_id, TaskStatus.in_progress, reason="started",
                                      message=f"run by agent execute on {worker_id}", worker_id=worker_id)
        signal.signal(signal.SIGTERM, lambda *_: _abort_execute(agent))
        signal.signal(signal.SIGINT, lambda *_: _abort_execute(agent))
        echo = LogEcho(backend, task_id) if echo_output else None
        try:
            status = agent.run_one(task)
        finally:
            if echo is not None:
                echo.stop()
    except ConveyorError as exc:
        _fail(exc.message)
    final = backend.get_task(task_id)
    click.echo(f"task {task_id}: {final.status.value} ({final.status_message})")
    sys.exit(0 if status == TaskStatus.completed else 1)


class LogEcho:
    """Prints the lines a task's log gets from now on, read from the store on a thread
    (the one path to a task's output): step stdout on stdout, the rest on stderr."""

    def __init__(self, backend: Backend, task_id: str) -> None:
        """Start echoing the lines written to task `task_id`'s log after this call."""
        self._backend = backend
        self._task_id = task_id
        self._offset = next_offset(backend.get_log(task_id, tail=1), 0)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="log-echo", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Print what is left of the log and stop."""
        self._done.set()
        self._thread.join(timeout=30)

    def _follow(self) -> None:
        while True:
            finished = self._done.is_set()  # read before the log: the last read gets every line
            try:
                self._print_new_lines()
            except ConveyorError as exc:
                click.echo(f"agent: cannot read the task log: {exc.message}", err=True)
            if finished:
                return
            self._done.wait(ECHO_POLL_S)

    def _print_new_lines(self) -> None:
        while True:
            lines = self._backend.get_log(self._task_id, offset=self._offset, limit=1000)
            for line in lines:
                _echo_log_line(line)
            self._offset = next_offset(lines, self._offset)
            if len(lines) < 1000:
                return


def _echo_log_line(line: LogLine) -> None:
    text = line.line.rstrip("\n")
    if line.stream == "stdout":
        click.echo(text)
    elif line.stream == "stderr":
        click.echo(text, err=True)
    else:
        click.echo(f"[{line.stream}] {text}", err=True)


def _abort_execute(agent: AgentDaemon) -> None:
    agent._abort_all("agent_shutdown")  # noqa: SLF001 - the CLI owns this daemon


@main.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_agents(as_json: bool) -> None:
    """Agent daemons running on this machine (for this CONVEYOR_HOME)."""
    agents = local_agents(conveyor_home())
    if as_json:
        click.echo(json.dumps(agents, indent=2))
        return
    if not agents:
        click.echo("no agent daemons running")
        return
    for a in agents:
        click.echo(f"{a['worker_id']:<28} pid {a['pid']:<8} queues {', '.join(a['queues'])}  log {a.get('log_file', '')}")


@main.command()
@click.argument("worker_id", required=False)
@click.option("--timeout", type=float, default=DEFAULT_SHUTDOWN_GRACE_S + 30, show_default=True,
              help="Seconds to wait for the daemon to exit.")
@click.option("--now", is_flag=True, help="Stop running tasks at once (sends the signal twice).")
@token_option
def stop(worker_id: str | None, timeout: float, now: bool, token: str | None) -> None:
    """Stop a running daemon of this machine (the only one, or WORKER_ID).

    The daemon takes no new task and lets the running ones finish within its
    --shutdown-grace (default 30 s), then stops them. Every few seconds this prints
    which tasks it still waits for and how much of the grace is left.
    """
    agents = local_agents(conveyor_home())
    if worker_id:
        agents = [a for a in agents if a["worker_id"] == worker_id]
        if not agents:
            _fail(f"no agent daemon {worker_id!r} is running here")
    elif len(agents) > 1:
        _fail("several agent daemons are running; name one: " + ", ".join(a["worker_id"] for a in agents))
    elif not agents:
        _fail("no agent daemon is running here")
    target = agents[0]
    proc = psutil.Process(target["pid"])
    proc.send_signal(signal.SIGTERM)
    if now:
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
    click.echo(f"stopping agent {target['worker_id']} (pid {target['pid']})...", err=True)
    grace_s = 0.0 if now else float(target.get("shutdown_grace_s") or DEFAULT_SHUTDOWN_GRACE_S)
    asked_at = time.monotonic()
    backend = _open_quietly(target.get("api"), token)
    try:
        while True:
            waited_s = time.monotonic() - asked_at
            try:
                proc.wait(timeout=max(min(STOP_PROGRESS_EVERY_S, timeout - waited_s), 0.0))
                break
            except psutil.TimeoutExpired:
                waited_s = time.monotonic() - asked_at
                if waited_s >= timeout:
                    _fail(f"agent {target['worker_id']} is still running after {timeout:.0f} s")
                click.echo(_stop_progress(backend, target["worker_id"], grace_s - waited_s), err=True)
    finally:
        if backend is not None:
            backend.close()
    click.echo(f"agent {target['worker_id']} stopped")


def _open_quietly(api: str | None, token: str | None) -> Backend | None:
    """The Backend a daemon's pid file names, or None if it cannot be opened (progress
    lines then name no tasks)."""
    try:
        return backend_from_url(api, token=token) if api else None
    except (ConveyorError, OSError):
        return None


def _stop_progress(backend: Backend | None, worker_id: str, grace_left_s: float) -> str:
    """One progress line of `agent stop`: the tasks the daemon still runs, the grace left."""
    names: list[str] | None = None  # None: unknown (the store cannot be read)
    if backend is not None:
        try:
            worker = next((w for w in backend.list_workers() if w.id == worker_id), None)
            names = []
            for task_id in worker.current_tasks if worker else []:
                try:
                    names.append(f"{task_id} ({backend.get_task(task_id).name})")
                except ConveyorError:
                    names.append(task_id)
        except (ConveyorError, OSError):
            names = None
    if names == []:
        return f"waiting for agent {worker_id} to exit (no task running)"
    tasks = f"{len(names)} running task(s): {', '.join(names)}" if names else "its running tasks"
    if grace_left_s > 0:
        return (f"waiting for {tasks}; {format_duration(grace_left_s)} of shutdown grace left, "
                "then they are stopped")
    return f"waiting for {tasks} to stop (shutdown grace over)"


if __name__ == "__main__":
    main(prog_name="agent")
