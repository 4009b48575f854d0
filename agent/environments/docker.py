"""Docker steps: the engine, the image, and the container a task runs in.

This module prepares the container (`prepare_container`);
`agent.container_supervisor.run_task_in_container`, the container twin of "venv +
run_step", runs it and returns the same `StepOutcome`. Uses the docker SDK for Python, never the docker CLI.

Decisions:

- **When.** A task whose `container.image` is set runs in a container when the agent
  was started with `--docker`; `--docker IMAGE` also runs tasks naming no image in
  IMAGE. Without `--docker`, a task naming an image fails (setup_failed) instead of
  running on the host in the wrong environment (see `agent.executor`).
- **Inside the container** (`/conveyor/...`, fixed paths so cached venvs stay valid):
  `run/` the task's control folder (bootstrap scripts, config, the stage file), `code/`
  the checkout (read-write, as on the host), `cache/` the agent's container cache
  (`CONVEYOR_HOME/cache/docker`: `venvs/`, `uv-cache/`, `pip-cache/`; one mount, so uv
  hard-links from its cache into venvs), `sdk/` the agent's `controller` and `agent`
  packages and `sdk-deps/` the SDK's installed dependencies (all read-only, one bind
  mount per top-level entry: the agent's other packages stay invisible), `bin/uv` the
  agent's uv binary. Local `--find-links` folders of the installer options
  (`CONVEYOR_PIP_ARGS`) are mounted read-only at their own path, so one setting serves
  host venvs and containers (and offline installs work).
- **Order inside** (`/bin/sh run/bootstrap.sh` as the command, docker-init as PID 1,
  the image's ENTRYPOINT replaced): the setup shell script (bash if the image has it,
  else sh; its exit code is the verdict) → the venv with the image's own Python and the
  task's packages (`agent.environments.container_boot`) → the step. The image needs
  `/bin/sh` and a `python3` (or `python`) on its PATH; the setup script may install it.
- **Venv cache key**: image id, the agent's Python ABI (decides whether the SDK's
  dependencies are mounted or installed), normalised packages, the requirements file's
  content and the SDK's requirements. Evicted LRU by the agent like host venvs.
- **Environment** of the step, later wins: the image's, docker_args `-e`, the task's
  `Environment` hyperparameters, the agent's GPUs (`NVIDIA_VISIBLE_DEVICES`), then
  `CONVEYOR_TASK_ID`, `CONVEYOR_API`/`CONVEYOR_API_TOKEN` (an `http://` URL the
  container can reach, with the `--add-host` entry naming it: see
  `agent.container_api`), `CONVEYOR_WORKER_ID`. Nothing else
  of the agent's environment goes in, except `CONVEYOR_OUTPUT_URI` when the agent has
  one.
- **Artifacts on a SQL store.** The SDK's default destination there is the files area
  `file://$CONVEYOR_HOME/files` of the agent's machine; that folder is mounted at the
  same path and named in `CONVEYOR_OUTPUT_URI` (the task's own `output_uri` still
  wins), so artifact URLs of container steps are the same as those of host steps and
  readable by both.
- **Working directory.** The step runs in the task's `working_dir` inside `code/`
  (entry points are relative to it). docker_args `-w` sets where the setup script runs.
- **GPUs.** The agent's `--gpus` (what this worker owns) becomes the container's
  DeviceRequest and wins over a task's own `--gpus`, which is used on agents without it.
- **Labels** `conveyor.worker`, `conveyor.task`, `conveyor.attempt`, `conveyor.agent-host`,
  `conveyor.agent-pid` mark the agent's containers; at start a daemon force-removes those
  of its worker id whose agent process is gone (see also `agent.watchdog`).
- **Engine.** `docker.from_env()` (DOCKER_HOST etc.), pinged before every task, so an
  engine that went away is reported per task, and one that came back is used again.
  The engine must run on the agent's machine (host paths are bind-mounted).
- **Images** are used if present locally, else pulled (tag `latest` if none); when both
  fail the task fails naming the image and the pull error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shlex
import shutil
import socket
import sysconfig
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import docker
import psutil
from docker.errors import APIError, DockerException, ImageNotFound
from docker.types import Mount

from agent.container_api import ApiEndpoint, ContainerApi
from agent.environments import container_boot
from agent.environments.docker_args import ContainerOptions, agent_gpu_request, parse_docker_args
from agent.environments.errors import ContainerError, DockerUnavailableError, ImageUnavailableError
from agent.environments.sdk import (
    default_sdk_source,
    sdk_dependency_paths,
    sdk_packages,
    sdk_requirements,
)
from agent.environments.venv import (
    find_uv,
    normalize_packages,
)
from controller.models import TaskRecord

if TYPE_CHECKING:
    from agent.executor import ExecutionSettings

log = logging.getLogger(__name__)

LAYOUT_VERSION = 1
#: Seconds of one ordinary engine API call.
ENGINE_TIMEOUT_S = 60
ROOT = "/conveyor"
RUN_DIR, CODE_DIR, CACHE_DIR = f"{ROOT}/run", f"{ROOT}/code", f"{ROOT}/cache"
SDK_DIR, SDK_DEPS_DIR, UV_PATH = f"{ROOT}/sdk", f"{ROOT}/sdk-deps", f"{ROOT}/bin/uv"
LABEL_WORKER, LABEL_TASK, LABEL_ATTEMPT = "conveyor.worker", "conveyor.task", "conveyor.attempt"
LABEL_AGENT_HOST, LABEL_AGENT_PID = "conveyor.agent-host", "conveyor.agent-pid"

BOOTSTRAP_SH = f"""#!/bin/sh
# Written by the Conveyor agent: the setup script, then the Python bootstrap.
RUN={RUN_DIR}
echo setup > "$RUN/stage"
if [ -f "$RUN/setup.sh" ]; then
  echo "{container_boot.MARK}running the container setup script" >&2
  if command -v bash >/dev/null 2>&1; then bash "$RUN/setup.sh"; else sh "$RUN/setup.sh"; fi
  code=$?
  if [ "$code" -ne 0 ]; then echo "setup_failed $code" > "$RUN/stage"; exit "$code"; fi
fi
echo environment > "$RUN/stage"
for py in python3 python; do
  if command -v "$py" >/dev/null 2>&1; then exec "$py" "$RUN/boot.py" "$RUN/config.json"; fi
done
echo no_python > "$RUN/stage"
echo "{container_boot.MARK}error: the image has no python3 or python on its PATH" >&2
exit 127
"""


def _one_line(exc: BaseException) -> str:
    explanation = getattr(exc, "explanation", None) or str(exc)
    return " ".join(str(explanation).split())


class DockerEngine:
    """The docker SDK client of one agent process, (re)connected on demand."""

    def __init__(self) -> None:
        self._client: docker.DockerClient | None = None
        self._lock = threading.Lock()

    def client(self) -> docker.DockerClient:
        """A client whose engine just answered a ping; DockerUnavailableError if none."""
        where = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
        with self._lock:
            try:
                if self._client is None:
                    self._client = docker.from_env(timeout=ENGINE_TIMEOUT_S)
                self._client.ping()
                return self._client
            except (DockerException, OSError) as exc:
                self._client = None
                reason = _one_line(exc)
                if "FileNotFoundError" in reason or "No such file" in reason:
                    reason = "no engine socket (is dockerd running?)"
                raise DockerUnavailableError(
                    f"cannot reach the docker engine at {where}: {reason}"
                ) from None


@dataclass
class DockerSettings:
    """How this agent runs container steps (`agent daemon --docker [IMAGE]`)."""

    default_image: str = ""
    allow_privileged: bool = False
    #: Host folders under which docker_args may mount host paths (`--allow-mount`).
    allowed_mounts: tuple[str, ...] = ()
    engine: DockerEngine = field(default_factory=DockerEngine, repr=False, compare=False)
    api: ContainerApi = field(default_factory=ContainerApi, repr=False, compare=False)


def ensure_image(client: docker.DockerClient, name: str, say: Callable[[str], None]) -> Any:
    """The local image `name`, pulled if missing; ImageUnavailableError otherwise."""
    try:
        return client.images.get(name)
    except ImageNotFound:
        pass
    except APIError as exc:
        raise ContainerError(f"cannot inspect image {name!r}: {_one_line(exc)}") from None
    say(f"image {name} is not present locally; pulling it")
    try:
        return client.images.pull(name)
    except (APIError, DockerException) as exc:
        raise ImageUnavailableError(
            f"image {name!r} is not available locally and could not be pulled: {_one_line(exc)}"
        ) from None


def remove_leftover_containers(client: docker.DockerClient, worker_id: str) -> list[str]:
    """Force-remove containers of `worker_id` on this host whose agent process is gone."""
    removed = []
    host = socket.gethostname()
    found = client.api.containers(all=True, filters={"label": f"{LABEL_WORKER}={worker_id}"})
    for container in found:
        labels = container.get("Labels") or {}
        name = (container.get("Names") or [container["Id"][:12]])[0].lstrip("/")
        pid = int(labels.get(LABEL_AGENT_PID, "0") or 0)
        alive = pid and pid != os.getpid() and psutil.pid_exists(pid)
        if labels.get(LABEL_AGENT_HOST) == host and alive:
            continue  # another live agent (same worker id, another CONVEYOR_HOME) owns it
        try:
            client.api.remove_container(container["Id"], force=True, v=True)
            removed.append(name)
        except APIError as exc:
            log.warning("cannot remove leftover container %s: %s", name, _one_line(exc))
    return removed


# ----------------------------------------------------------------- the container spec
@dataclass
class ContainerSpec:
    """Everything `containers.create` needs, plus where the control folder is."""

    image: str
    image_id: str
    name: str
    create_kwargs: dict[str, Any]
    run_dir: Path
    venv_root: Path
    venv_key: str
    api: ApiEndpoint


def _find_links_dirs(index_args: list[str]) -> list[str]:
    """Local folders named by --find-links/-f in installer options."""
    found = []
    for i, arg in enumerate(index_args):
        value = None
        if arg in ("--find-links", "-f") and i + 1 < len(index_args):
            value = index_args[i + 1]
        elif arg.startswith("--find-links="):
            value = arg.split("=", 1)[1]
        if value:
            path = value[len("file://"):] if value.startswith("file://") else value
            if path.startswith("/") and os.path.isdir(path):
                found.append(os.path.normpath(path))
    return found


def _venv_key(image_id: str, packages: list[str], requirements: str) -> str:
    blob = json.dumps([LAYOUT_VERSION, image_id, sysconfig.get_config_var("SOABI") or "",
                       packages, requirements, sorted(sdk_requirements())])
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _bind(source: str | Path, target: str, read_only: bool) -> Mount:
    return Mount(target=target, source=str(source), type="bind", read_only=read_only)


def _mounts(
    run_dir: Path, checkout_root: Path, cache: Path, index_args: list[str]
) -> list[Mount]:
    mounts = [_bind(run_dir, RUN_DIR, False), _bind(checkout_root, CODE_DIR, False),
              _bind(cache, CACHE_DIR, False)]
    try:
        packages = sdk_packages(default_sdk_source())
    except FileNotFoundError as exc:
        raise ContainerError(f"cannot find the Conveyor SDK to mount: {exc}") from None
    mounts += [_bind(path, f"{SDK_DIR}/{name}", True) for name, path in packages.items()]
    mounts += [_bind(path, f"{SDK_DEPS_DIR}/{name}", True)
               for name, path in sdk_dependency_paths().items()]
    uv = find_uv()
    if uv:
        mounts.append(_bind(os.path.realpath(uv), UV_PATH, True))
    taken = {m["Target"] for m in mounts}
    mounts += [_bind(d, d, True) for d in _find_links_dirs(index_args) if d not in taken]
    return mounts


def _in_container(path: Path, checkout_root: Path, what: str) -> str:
    try:
        relative = path.resolve().relative_to(checkout_root.resolve())
    except ValueError:
        raise ContainerError(f"the {what} {path} is outside the task's checkout") from None
    return CODE_DIR if str(relative) == "." else f"{CODE_DIR}/{relative.as_posix()}"


def control_folder(task: TaskRecord, settings: ExecutionSettings) -> Path:
    """The host folder mounted at /conveyor/run for this attempt of the task."""
    return settings.work_root / f"{task.id}-{task.runtime.attempt}.container"


def prepare_container(
    task: TaskRecord,
    image_name: str,
    checkout_root: Path,
    run_in: Path,
    requirements_file: Path | None,
    argv_for: Callable[[Path], list[str]],
    settings: ExecutionSettings,
    say: Callable[[str], None],
) -> ContainerSpec:
    """Parse docker_args, find the image, write the control folder: the container spec.

    `argv_for(python)` is the step's command line for a given venv python.
    """
    assert settings.docker is not None
    options: ContainerOptions = parse_docker_args(
        task.container.arguments, allow_privileged=settings.docker.allow_privileged,
        allowed_mounts=settings.docker.allowed_mounts,
    )
    if options.ignored:
        say(f"ignored docker_args (the agent decides these): {' '.join(options.ignored)}")
    client = settings.docker.engine.client()
    image = ensure_image(client, image_name, say)
    api = settings.docker.api.endpoint_for(
        settings.api_url, settings.api_token, client, options.network_mode
    )

    packages = normalize_packages(task.packages)
    requirements = ""
    requirements_in_container = ""
    if requirements_file is not None:
        try:
            requirements = requirements_file.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise ContainerError(
                f"cannot read requirements file {requirements_file}: {exc.strerror}"
            ) from None
        requirements_in_container = _in_container(
            requirements_file, checkout_root, "requirements file"
        )
        say(f"installing from {requirements_file.name}")
    key = _venv_key(image.id, packages, requirements)
    cache = settings.env_cache / "docker"
    venv_root = cache / "venvs"
    for folder in (venv_root, cache / "uv-cache", cache / "pip-cache"):
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o1777)  # containers may run as any --user
    index_args = (list(settings.index_args) if settings.index_args is not None
                  else shlex.split(os.environ.get("CONVEYOR_PIP_ARGS", "")))

    run_dir = control_folder(task, settings)
    venv_python = Path(f"{CACHE_DIR}/venvs/{key}/bin/python")
    _write_control_folder(run_dir, task.container.setup_shell_script, {
        "run_dir": RUN_DIR, "venv_root": f"{CACHE_DIR}/venvs", "venv_key": key,
        "uv_cache": f"{CACHE_DIR}/uv-cache", "pip_cache": f"{CACHE_DIR}/pip-cache",
        "uv": UV_PATH, "packages": packages, "requirements_file": requirements_in_container,
        "index_args": index_args, "agent_soabi": sysconfig.get_config_var("SOABI") or "",
        "sdk_requirements": sdk_requirements(), "sdk_path": SDK_DIR,
        "sdk_deps_path": SDK_DEPS_DIR, "image": image_name,
        "argv": [str(a) for a in argv_for(venv_python)],
        "cwd": _in_container(run_in, checkout_root, "working directory"),
    })

    kwargs = options.create_kwargs()
    if api.extra_hosts:  # the name of the agent's server or relay wins over docker_args'
        kwargs["extra_hosts"] = {**kwargs.get("extra_hosts", {}), **dict(api.extra_hosts)}
    env, files_mounts = _step_environment(task, options, settings, api)
    if settings.gpus:
        request, gpu_env = agent_gpu_request(settings.gpus)
        if options.device_requests:
            say(f"the agent's --gpus {settings.gpus} replaces the task's --gpus")
        kwargs["device_requests"] = [request]
        env.update(gpu_env)
    kwargs.update(
        entrypoint=["/bin/sh"], command=[f"{RUN_DIR}/bootstrap.sh"], environment=env,
        labels={**options.labels, **_labels(task, settings)}, init=True, detach=True,
        stdin_open=False, tty=False, working_dir=options.working_dir or CODE_DIR,
        mounts=_mounts(run_dir, checkout_root, cache, index_args) + files_mounts + options.mounts,
    )
    name = f"conveyor-{task.id[:12]}-{task.runtime.attempt}-{secrets.token_hex(3)}"
    return ContainerSpec(image_name, image.id, name, kwargs, run_dir, venv_root, key, api)


def _write_control_folder(run_dir: Path, setup_script: str, config: dict[str, Any]) -> None:
    """/conveyor/run: the bootstrap, its Python half, the setup script, the config."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    run_dir.chmod(0o777)  # the bootstrap writes its stage file as the container's user
    (run_dir / "bootstrap.sh").write_text(BOOTSTRAP_SH)
    shutil.copyfile(container_boot.__file__, run_dir / "boot.py")
    if setup_script.strip():
        (run_dir / "setup.sh").write_text(setup_script)
    (run_dir / "config.json").write_text(json.dumps(config, indent=1))


def _step_environment(
    task: TaskRecord, options: ContainerOptions, settings: ExecutionSettings, api: ApiEndpoint
) -> tuple[dict[str, str], list[Mount]]:
    """The step's environment (see the module docstring) and the files-area mount."""
    env = dict(options.environment)
    mounts = []
    if os.environ.get("CONVEYOR_OUTPUT_URI"):
        env["CONVEYOR_OUTPUT_URI"] = os.environ["CONVEYOR_OUTPUT_URI"]
    elif not settings.api_url.startswith(("http://", "https://")):
        files = (settings.home / "files").resolve()  # the SDK's default on a SQL store
        files.mkdir(parents=True, exist_ok=True)
        env["CONVEYOR_OUTPUT_URI"] = files.as_uri()
        mounts.append(_bind(files, str(files), False))
    for name, value in (task.hyperparams.get("Environment") or {}).items():
        env[str(name)] = "" if value is None else str(value)
    env.update(CONVEYOR_TASK_ID=task.id, CONVEYOR_API=api.url,
               CONVEYOR_WORKER_ID=settings.worker_id, PYTHONUNBUFFERED="1",
               TINI_KILL_PROCESS_GROUP="1")  # docker-init signals the whole group
    if api.token:
        env["CONVEYOR_API_TOKEN"] = api.token
    return env, mounts


def _labels(task: TaskRecord, settings: ExecutionSettings) -> dict[str, str]:
    return {LABEL_WORKER: settings.worker_id, LABEL_TASK: task.id,
            LABEL_ATTEMPT: str(task.runtime.attempt), LABEL_AGENT_HOST: socket.gethostname(),
            LABEL_AGENT_PID: str(os.getpid())}
