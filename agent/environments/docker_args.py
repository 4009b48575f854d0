"""A task's docker_args string, parsed like a shell line into docker SDK run options.

`parse_docker_args("-e A=1 -v /data:/data:ro --gpus all --shm-size 2g")` returns
`ContainerOptions`, whose `create_kwargs()` are keyword arguments of the docker SDK's
`containers.create`. Needs no docker engine (only the SDK's types).

Decisions:

- **Shell syntax.** The string is split with `shlex` (quotes work as in a shell, no
  variables are expanded). Long options take `--opt value` and `--opt=value`; options
  with a short form (`-e`, `-v`, `-w`, `-m`, `-l`) also take `-eVALUE`. Repeatable
  options (`-e`, `-v`, `--label`, `--cap-add`, ...) add up; others keep the last value.
- **Supported options.** `-e/--env`, `-v/--volume`, `--network/--net`, `--ipc`, `--pid`,
  `--uts`, `--shm-size`, `--gpus`, `-u/--user`, `-w/--workdir`, `-m/--memory`,
  `--memory-swap`, `--cpus`, `--cpuset-cpus`, `-l/--label`, `--privileged`, `--device`,
  `--cap-add`, `--cap-drop`, `--security-opt`, `--add-host`, `--dns`, `-h/--hostname`,
  `--ulimit`, `--tmpfs`, `--runtime`, `--mount` (`type=bind|volume|tmpfs`, the docker
  CLI's csv fields and key spellings), `--volumes-from`. `-e NAME` without a value takes
  NAME from the agent's environment, as the docker CLI does (skipped if unset).
  A short option's value may also be written `-v=VALUE` (as the docker CLI reads it).
- **Host paths.** Every host path (`-v` and `--mount type=bind` sources, `--device`) is
  normalized before any rule looks at it, the way it will be mounted: leading `//`,
  `.`, `..` and trailing `/` cleaned lexically, then symlinks of the existing part
  resolved (`os.path.realpath`), so `//`, `/data/../etc` and a link to `/` are seen as
  `/`, `/etc` and `/`. The normalized path is what the container gets. Host paths are
  allowed only under the folders the agent is started with (`agent daemon --allow-mount
  PATH`, repeatable, normalized the same way); any other host path is refused, naming the
  option and the path, unless the agent runs with `--allow-privileged`. Named volumes
  (no slash) are always allowed.
- **Ignored options.** Flags users copy from `docker run` lines that the agent decides
  itself: `--rm` (containers are always removed), `--init` (always on), `-i`, `-t`,
  `-it`, `-d`, `--name` (the agent names containers). They are reported in
  `ignored`, so the agent can say so in the task log, and change nothing.
- **Refused unless the agent runs with `--allow-privileged`.** Whatever gives the step
  the host: `--privileged`, `--device` (whatever the path), `--cap-add`, `--security-opt`
  (except `no-new-privileges`), the host's (or another container's) namespaces
  (`--pid/--ipc/--uts/--network host` or `container:...`: `--network host` exposes every
  service listening on the host's loopback, e.g. a trust-auth database),
  `--volumes-from` (another container's volumes, which may be host paths),
  `--mount` with `volume-driver`/`volume-opt` (the local driver binds any host path with
  `volume-opt=o=bind`), host paths outside the `--allow-mount` folders, and host paths
  that control the host even inside them: the docker, containerd or podman socket, `/`,
  `/proc`, `/sys`, `/dev`, `/boot`, `/etc`, `/run`, `/var/run`, `/var/lib/docker`
  (exactly these, or below `/proc`, `/sys`).
- **Refused always.** Unknown options (the message names every one), positional words
  (the image goes in `container.image`, the command is the task's entry point), labels
  under `conveyor.` (the agent's own, used to find and clean up its containers),
  `--env-file`/`--label-file` (the docker CLI reads these files on the machine it runs
  on; the SDK has no such option, and the agent does not read host files for a task:
  give the values with `-e`/`--label`).
- **GPUs.** `--gpus all|N|device=0,1|"device=0,1",capabilities=utility` becomes a
  `DeviceRequest` (driver default, capabilities default `gpu`), as the docker CLI does.
  `agent_gpu_request` maps the agent's own `--gpus` option the same way.
"""

from __future__ import annotations

import csv
import os
import posixpath
import re
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from docker.types import DeviceRequest, DriverConfig, Mount, Ulimit

from agent.environments.errors import DockerArgsError

#: Label prefix the agent reserves for its own container labels.
RESERVED_LABEL_PREFIX = "conveyor."

#: Host paths whose volume gives the step control of the host (see the docstring).
HOST_CONTROL_PATHS = frozenset(
    {"/", "/proc", "/sys", "/dev", "/boot", "/etc", "/run", "/var/run", "/var/lib/docker"}
)
_HOST_CONTROL_TREES = ("/proc/", "/sys/")
_SOCKET_RE = re.compile(r"(^|/)(docker|containerd|podman)\.sock$")
_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([bkmgt]?)b?$", re.IGNORECASE)
_VOLUME_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


@dataclass(frozen=True)
class HostPath:
    """A host path a docker_args option mounts: as written and as it will be mounted."""

    option: str
    written: str
    normalized: str
    #: Why symlinks in it could not be resolved (then it needs --allow-privileged).
    unresolved: str | None = None

    def describe(self) -> str:
        """`-v //` → `-v // (= /)`: the option, the path as written and, if different, normalized."""
        text = f"{self.option} {self.written}"
        if self.written != self.normalized:
            text += f" (= {self.normalized})"
        if self.unresolved:
            text += f" (cannot resolve its symlinks: {self.unresolved})"
        return text


def lexical_host_path(path: str) -> str:
    """`//` → `/`, `/data/./x/../y/` → `/data/y` (no file system access)."""
    return posixpath.normpath("/" + path.lstrip("/"))


def normalize_host_path(path: str, option: str = "host path") -> str:
    """An absolute host path as docker mounts it: lexically cleaned, symlinks resolved.

    `//` → `/`, `/data/./x/../y/` → `/data/y`, `/tmp/link-to-root` → `/`. Symlinks are
    resolved where the path exists on this machine (the docker engine's machine).
    OSError if a part of it cannot be read (e.g. permission denied).
    """
    if not path.startswith("/"):
        raise DockerArgsError(f"docker_args {option} {path!r}: a host path must be absolute")
    if "\0" in path:
        raise DockerArgsError(f"docker_args {option} {path!r}: a host path cannot contain NUL")
    return os.path.realpath(lexical_host_path(path))


def _is_under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


@dataclass
class ContainerOptions:
    """Run options from docker_args; `create_kwargs()` feeds `containers.create`."""

    environment: dict[str, str] = field(default_factory=dict)
    volumes: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    network_mode: str | None = None
    ipc_mode: str | None = None
    pid_mode: str | None = None
    uts_mode: str | None = None
    shm_size: int | None = None
    device_requests: list[DeviceRequest] = field(default_factory=list)
    user: str | None = None
    working_dir: str | None = None
    mem_limit: int | None = None
    memswap_limit: int | None = None
    nano_cpus: int | None = None
    cpuset_cpus: str | None = None
    privileged: bool = False
    devices: list[str] = field(default_factory=list)
    cap_add: list[str] = field(default_factory=list)
    cap_drop: list[str] = field(default_factory=list)
    security_opt: list[str] = field(default_factory=list)
    extra_hosts: dict[str, str] = field(default_factory=dict)
    dns: list[str] = field(default_factory=list)
    hostname: str | None = None
    ulimits: list[Ulimit] = field(default_factory=list)
    tmpfs: dict[str, str] = field(default_factory=dict)
    runtime: str | None = None
    mounts: list[Mount] = field(default_factory=list)
    volumes_from: list[str] = field(default_factory=list)
    #: Host paths to mount, normalized; `parse_docker_args` checks them against its policy.
    host_paths: list[HostPath] = field(default_factory=list)
    #: Options that need `--allow-privileged`, as the user wrote them.
    host_access: list[str] = field(default_factory=list)
    #: Options accepted and ignored (see the module docstring).
    ignored: list[str] = field(default_factory=list)

    def create_kwargs(self) -> dict[str, Any]:
        """The options that were given, as `containers.create` keyword arguments."""
        out: dict[str, Any] = {}
        for name in (
            "environment", "volumes", "labels", "network_mode", "ipc_mode", "pid_mode",
            "uts_mode", "shm_size", "device_requests", "user", "working_dir", "mem_limit",
            "memswap_limit", "nano_cpus", "cpuset_cpus", "devices", "cap_add", "cap_drop",
            "security_opt", "extra_hosts", "dns", "hostname", "ulimits", "tmpfs", "runtime",
            "mounts", "volumes_from",
        ):
            value = getattr(self, name)
            if value is not None and value != [] and value != {}:
                out[name] = value
        if self.privileged:
            out["privileged"] = True
        return out


# ----------------------------------------------------------------- value parsers
def parse_size(text: str, option: str) -> int:
    """`2g`, `512m`, `1.5gb`, `1024` (bytes) → bytes; DockerArgsError otherwise."""
    match = _SIZE_RE.match(text.strip())
    if not match:
        raise DockerArgsError(f"docker_args {option}: {text!r} is not a size (e.g. 512m, 2g)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def parse_gpus(text: str, option: str = "--gpus") -> DeviceRequest:
    """A `--gpus` value as the docker CLI reads it → DeviceRequest."""
    try:
        fields = next(csv.reader([text.strip()]))
    except (csv.Error, StopIteration):
        fields = []
    count: int | None = None
    device_ids: list[str] | None = None
    capabilities = ["gpu"]
    driver = ""
    last_key = ""
    for item in (f.strip() for f in fields):
        key, eq, value = item.partition("=")
        if not eq:
            if item == "all":
                count = -1
            elif item.isdigit() and last_key == "device" and device_ids is not None:
                device_ids.append(item)  # `device=0,1` written without the CLI's quotes
            elif item.isdigit():
                count = int(item)
            else:
                raise DockerArgsError(f"docker_args {option}: cannot read {text!r} "
                                      "(use all, a count, or device=0,1)")
            continue
        last_key = key
        if key == "count":
            count = -1 if value == "all" else _int(value, option)
        elif key == "device":
            device_ids = [d for d in value.split(",") if d]
        elif key == "capabilities":
            capabilities = [c for c in value.split(",") if c] or ["gpu"]
        elif key == "driver":
            driver = value
        else:
            raise DockerArgsError(f"docker_args {option}: unknown field {key!r} in {text!r}")
    if count is None and not device_ids:
        raise DockerArgsError(f"docker_args {option}: {text!r} asks for no GPU")
    return DeviceRequest(
        driver=driver, count=0 if device_ids else count, device_ids=device_ids,
        capabilities=[capabilities],
    )


def agent_gpu_request(gpus: str) -> tuple[DeviceRequest, dict[str, str]]:
    """The agent's `--gpus` (`all` or `0,1`) → a DeviceRequest and the NVIDIA env vars."""
    gpus = gpus.strip()
    if gpus == "all":
        return parse_gpus("all", "--gpus"), {"NVIDIA_VISIBLE_DEVICES": "all"}
    ids = [g.strip() for g in gpus.split(",") if g.strip()]
    if not ids:
        raise DockerArgsError(f"agent --gpus {gpus!r}: use all or a list of GPU ids like 0,1")
    request = DeviceRequest(device_ids=ids, capabilities=[["gpu"]])
    return request, {"NVIDIA_VISIBLE_DEVICES": ",".join(ids)}


def _int(text: str, option: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise DockerArgsError(f"docker_args {option}: {text!r} is not a whole number") from None


def _cpus(text: str, option: str) -> int:
    try:
        cpus = float(text)
    except ValueError:
        cpus = -1.0
    if cpus <= 0:
        raise DockerArgsError(f"docker_args {option}: {text!r} is not a positive number of CPUs")
    return int(round(cpus * 1e9))


def _key_value(text: str, option: str, sep: str = "=") -> tuple[str, str]:
    key, found, value = text.partition(sep)
    if not key or not found:
        raise DockerArgsError(f"docker_args {option}: expected NAME{sep}VALUE, got {text!r}")
    return key, value


def _is_host_control_path(path: str) -> bool:
    path = posixpath.normpath(path)
    return (
        path in HOST_CONTROL_PATHS
        or path.startswith(_HOST_CONTROL_TREES)
        or bool(_SOCKET_RE.search(path))
    )


def _namespace_mode(opts: ContainerOptions, attr: str, value: str, option: str) -> None:
    setattr(opts, attr, value)
    if value == "host" or value.startswith("container:"):
        opts.host_access.append(f"{option}={value}")


# ----------------------------------------------------------------- option handlers
def _env(opts: ContainerOptions, value: str, option: str, environ: Mapping[str, str]) -> None:
    name, eq, val = value.partition("=")
    if not name:
        raise DockerArgsError(f"docker_args {option}: expected NAME=VALUE, got {value!r}")
    if eq:
        opts.environment[name] = val
    elif name in environ:
        opts.environment[name] = environ[name]


def _host_path(opts: ContainerOptions, path: str, option: str) -> str:
    """Record a host path for the policy; its normalized form."""
    try:
        normalized, unresolved = normalize_host_path(path, option), None
    except OSError as exc:
        normalized, unresolved = lexical_host_path(path), exc.strerror or str(exc)
    opts.host_paths.append(HostPath(option, path, normalized, unresolved))
    return normalized


def _volume(opts: ContainerOptions, value: str, option: str) -> None:
    parts = value.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise DockerArgsError(
            f"docker_args {option} {value!r}: give SOURCE:DESTINATION[:OPTIONS]"
        )
    source, target = parts[0], parts[1]
    if not target.startswith("/"):
        raise DockerArgsError(f"docker_args {option} {value!r}: the destination must be absolute")
    if source.startswith("/"):
        parts[0] = _host_path(opts, source, option)
    elif not _VOLUME_NAME_RE.match(source):
        raise DockerArgsError(
            f"docker_args {option} {value!r}: the source must be an absolute host path "
            "or a volume name"
        )
    opts.volumes.append(":".join(parts))


#: `--mount` keys as the docker CLI spells them → the one name used here.
_MOUNT_KEYS = {
    "type": "type", "source": "source", "src": "source", "target": "target",
    "destination": "target", "dst": "target", "readonly": "readonly", "ro": "readonly",
    "bind-propagation": "bind-propagation", "consistency": "consistency",
    "volume-nocopy": "volume-nocopy", "volume-driver": "volume-driver",
    "volume-opt": "volume-opt", "volume-label": "volume-label",
    "tmpfs-size": "tmpfs-size", "tmpfs-mode": "tmpfs-mode",
}
_MOUNT_BARE_FLAGS = {"readonly", "volume-nocopy"}


def _mount(opts: ContainerOptions, value: str, option: str) -> None:
    """`--mount type=bind,src=/data,dst=/data,ro` (csv, keys as the docker CLI reads them)."""
    try:
        fields = next(csv.reader([value]))
    except (csv.Error, StopIteration):
        fields = []
    spec: dict[str, str] = {}
    driver_options: dict[str, str] = {}
    labels: dict[str, str] = {}
    for item in fields:
        raw_key, eq, val = item.partition("=")
        key = _MOUNT_KEYS.get(raw_key.strip().lower())
        if key is None:
            raise DockerArgsError(
                f"docker_args {option} {value!r}: unknown field {raw_key.strip()!r} "
                f"(known: {', '.join(sorted(_MOUNT_KEYS))})"
            )
        if not eq:
            if key not in _MOUNT_BARE_FLAGS:
                raise DockerArgsError(f"docker_args {option} {value!r}: {raw_key} needs =VALUE")
            val = "true"
        if key == "volume-opt":
            name, _ = _key_value(val, f"{option} volume-opt")
            driver_options[name] = val.partition("=")[2]
        elif key == "volume-label":
            name, _ = _key_value(val, f"{option} volume-label")
            labels[name] = val.partition("=")[2]
        else:
            spec[key] = val
    kind = spec.get("type", "volume").lower()
    target = spec.get("target", "")
    source = spec.get("source", "")
    if not target.startswith("/"):
        raise DockerArgsError(f"docker_args {option} {value!r}: give an absolute target=PATH")
    if kind == "bind":
        if not source:
            raise DockerArgsError(f"docker_args {option} {value!r}: a bind mount needs source=PATH")
        source = _host_path(opts, source, option)
    elif kind == "volume":
        if source and not _VOLUME_NAME_RE.match(source):
            raise DockerArgsError(
                f"docker_args {option} {value!r}: a volume's source is a volume name "
                "(for a host path use type=bind)"
            )
        if "volume-driver" in spec or driver_options:
            opts.host_access.append(f"{option} {value}")
    elif kind == "tmpfs":
        if source:
            raise DockerArgsError(f"docker_args {option} {value!r}: a tmpfs mount has no source")
    else:
        raise DockerArgsError(
            f"docker_args {option} {value!r}: type {kind!r} is not supported (bind, volume, tmpfs)"
        )
    driver = spec.get("volume-driver")
    opts.mounts.append(Mount(
        target=target, source=source or None, type=kind,
        read_only=_bool_value(spec.get("readonly", "false"), f"{option} readonly"),
        consistency=spec.get("consistency"), propagation=spec.get("bind-propagation"),
        no_copy=_bool_value(spec.get("volume-nocopy", "false"), f"{option} volume-nocopy"),
        labels=labels or None,
        driver_config=DriverConfig(driver or "local", driver_options) if driver or driver_options else None,
        tmpfs_size=parse_size(spec["tmpfs-size"], option) if "tmpfs-size" in spec else None,
        tmpfs_mode=_octal(spec["tmpfs-mode"], f"{option} tmpfs-mode") if "tmpfs-mode" in spec else None,
    ))


def _octal(text: str, option: str) -> int:
    try:
        return int(text, 8)
    except ValueError:
        raise DockerArgsError(f"docker_args {option}: {text!r} is not an octal mode (e.g. 1777)") from None


def _device(opts: ContainerOptions, value: str, option: str) -> None:
    """`--device HOST[:CONTAINER[:PERMISSIONS]]`: always host access; the host path normalized."""
    host, sep, rest = value.partition(":")
    try:
        normalized = normalize_host_path(host, option)
    except OSError:
        normalized = lexical_host_path(host)
    opts.devices.append(normalized + sep + rest)
    opts.host_access.append(HostPath(option, host, normalized).describe())


def _volumes_from(opts: ContainerOptions, value: str, option: str) -> None:
    opts.volumes_from.append(value)
    opts.host_access.append(f"{option} {value}")


def _host_file(opts: ContainerOptions, value: str, option: str) -> None:
    raise DockerArgsError(
        f"docker_args {option} {value}: the docker CLI reads this file on its own machine; "
        "the agent does not read host files for a step: give the values with -e NAME=VALUE "
        "or --label NAME=VALUE instead"
    )


def _label(opts: ContainerOptions, value: str, option: str) -> None:
    name, _, val = value.partition("=")
    if not name:
        raise DockerArgsError(f"docker_args {option}: expected NAME=VALUE, got {value!r}")
    if name.startswith(RESERVED_LABEL_PREFIX):
        raise DockerArgsError(
            f"docker_args {option} {name}: labels starting with {RESERVED_LABEL_PREFIX!r} "
            "are the agent's own"
        )
    opts.labels[name] = val


def _security_opt(opts: ContainerOptions, value: str, option: str) -> None:
    opts.security_opt.append(value)
    if not value.startswith("no-new-privileges"):
        opts.host_access.append(f"{option} {value}")


def _ulimit(opts: ContainerOptions, value: str, option: str) -> None:
    name, limits = _key_value(value, option)
    soft, _, hard = limits.partition(":")
    opts.ulimits.append(
        Ulimit(name=name, soft=_int(soft, option), hard=_int(hard or soft, option))
    )


def _add_host(opts: ContainerOptions, value: str, option: str) -> None:
    host, address = _key_value(value, option, ":" if "=" not in value else "=")
    opts.extra_hosts[host] = address


def _tmpfs(opts: ContainerOptions, value: str, option: str) -> None:
    path, _, mount_options = value.partition(":")
    opts.tmpfs[path] = mount_options


Handler = Callable[[ContainerOptions, str, str], None]

#: Options that take a value: canonical name → handler(options, value, option as written).
_VALUE_OPTIONS: dict[str, Handler] = {
    "--volume": _volume,
    "--label": _label,
    "--network": lambda o, v, n: _namespace_mode(o, "network_mode", v, n),
    "--ipc": lambda o, v, n: _namespace_mode(o, "ipc_mode", v, n),
    "--pid": lambda o, v, n: _namespace_mode(o, "pid_mode", v, n),
    "--uts": lambda o, v, n: _namespace_mode(o, "uts_mode", v, n),
    "--shm-size": lambda o, v, n: setattr(o, "shm_size", parse_size(v, n)),
    "--gpus": lambda o, v, n: o.device_requests.append(parse_gpus(v, n)),
    "--user": lambda o, v, n: setattr(o, "user", v),
    "--workdir": lambda o, v, n: setattr(o, "working_dir", v),
    "--memory": lambda o, v, n: setattr(o, "mem_limit", parse_size(v, n)),
    "--memory-swap": lambda o, v, n: setattr(
        o, "memswap_limit", -1 if v.strip() == "-1" else parse_size(v, n)
    ),
    "--cpus": lambda o, v, n: setattr(o, "nano_cpus", _cpus(v, n)),
    "--cpuset-cpus": lambda o, v, n: setattr(o, "cpuset_cpus", v),
    "--device": _device,
    "--mount": _mount,
    "--volumes-from": _volumes_from,
    "--env-file": _host_file,
    "--label-file": _host_file,
    "--cap-add": lambda o, v, n: (o.cap_add.append(v), o.host_access.append(f"{n} {v}")),
    "--cap-drop": lambda o, v, n: o.cap_drop.append(v),
    "--security-opt": _security_opt,
    "--add-host": _add_host,
    "--dns": lambda o, v, n: o.dns.append(v),
    "--hostname": lambda o, v, n: setattr(o, "hostname", v),
    "--ulimit": _ulimit,
    "--tmpfs": _tmpfs,
    "--runtime": lambda o, v, n: setattr(o, "runtime", v),
    "--name": lambda o, v, n: o.ignored.append(f"{n} {v}"),
}
_FLAG_OPTIONS = frozenset({"--privileged", "--rm", "--init", "--interactive", "--tty", "--detach"})
_ALIASES = {
    "-e": "--env", "-v": "--volume", "-l": "--label", "-u": "--user", "-w": "--workdir",
    "-m": "--memory", "-h": "--hostname", "--net": "--network", "-i": "--interactive",
    "-t": "--tty", "-d": "--detach",
}
_SHORT_WITH_VALUE = {"-e", "-v", "-l", "-u", "-w", "-m", "-h"}
_COMBINED_SHORT_FLAGS = {"-it": ("-i", "-t"), "-ti": ("-t", "-i"), "-itd": ("-i", "-t", "-d")}


def supported_options() -> list[str]:
    """Every option `parse_docker_args` understands (for error messages and docs)."""
    return sorted({"--env", *_VALUE_OPTIONS, *_FLAG_OPTIONS})


def _bool_value(value: str | None, option: str) -> bool:
    if value is None or value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise DockerArgsError(f"docker_args {option}={value}: expected true or false")


def parse_docker_args(
    text: str, *, allow_privileged: bool = False, allowed_mounts: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
) -> ContainerOptions:
    """Parse a docker_args string (see the module docstring); DockerArgsError if refused.

    `allowed_mounts` are the host folders (`agent daemon --allow-mount`) under which host
    paths may be mounted; `allow_privileged` lifts every host-access rule.
    """
    environ = os.environ if environ is None else environ
    try:
        words = shlex.split(text or "")
    except ValueError as exc:
        raise DockerArgsError(f"docker_args cannot be read as a shell line: {exc}") from None
    opts = ContainerOptions()
    unknown: list[str] = []
    i = 0
    while i < len(words):
        word = words[i]
        i += 1
        if not word.startswith("-") or word == "-":
            raise DockerArgsError(
                f"unexpected argument {word!r} in docker_args: only options go there "
                "(the image is container.image, the command is the task's entry point)"
            )
        if word in _COMBINED_SHORT_FLAGS:
            opts.ignored.append(word)
            continue
        value: str | None = None
        written = word
        if word.startswith("--") and "=" in word:
            written, value = word.split("=", 1)
        elif not word.startswith("--") and len(word) > 2 and word[:2] in _SHORT_WITH_VALUE:
            written, value = word[:2], word[2:]
            if value.startswith("="):
                value = value[1:]  # `-v=/a:/b`, read as the docker CLI reads it
        name = _ALIASES.get(written, written)
        if name in _FLAG_OPTIONS:
            enabled = _bool_value(value, written)
            if name == "--privileged":
                opts.privileged = enabled
                if enabled:
                    opts.host_access.append(written)
            elif enabled:
                opts.ignored.append(written)
            continue
        if name != "--env" and name not in _VALUE_OPTIONS:
            unknown.append(written)
            if value is None and i < len(words) and not words[i].startswith("-"):
                i += 1  # skip its probable value, so it is not reported as a stray word
            continue
        if value is None:
            if i >= len(words):
                raise DockerArgsError(f"docker_args option {written} needs a value")
            value = words[i]
            i += 1
        if name == "--env":
            _env(opts, value, written, environ)
        else:
            _VALUE_OPTIONS[name](opts, value, written)
    if unknown:
        raise DockerArgsError(
            f"unsupported docker_args option(s): {', '.join(dict.fromkeys(unknown))} "
            f"(supported: {' '.join(supported_options())})"
        )
    if not allow_privileged:
        _check_host_access(opts, allowed_mounts)
    return opts


def _allowed_folders(allowed_mounts: Sequence[str]) -> list[str]:
    folders = []
    for folder in allowed_mounts:
        try:
            folders.append(normalize_host_path(folder, "--allow-mount"))
        except OSError:
            folders.append(lexical_host_path(folder))
    return folders


def host_access_of(
    opts: ContainerOptions, allowed_mounts: Sequence[str] = ()
) -> tuple[list[str], list[str]]:
    """What of `opts` needs `--allow-privileged`: (host-access options, host paths outside
    `allowed_mounts`), each described as `option path-as-written (= normalized)`."""
    folders = _allowed_folders(allowed_mounts)
    control = list(opts.host_access)
    outside: list[str] = []
    for path in opts.host_paths:
        lexical = lexical_host_path(path.written)
        if (path.unresolved or _is_host_control_path(path.normalized)
                or _is_host_control_path(lexical)):
            control.append(path.describe())
        elif not any(_is_under(path.normalized, folder) for folder in folders):
            outside.append(path.describe())
    return control, outside


def _check_host_access(opts: ContainerOptions, allowed_mounts: Sequence[str]) -> None:
    """DockerArgsError naming every option and path that needs --allow-privileged."""
    control, outside = host_access_of(opts, allowed_mounts)
    if not control and not outside:
        return
    problems = []
    if control:
        problems.append(f"docker_args {', '.join(control)} would give the step access to the host")
    if outside:
        folders = _allowed_folders(allowed_mounts)
        where = ", ".join(folders) if folders else "none: the agent was started without --allow-mount"
        problems.append(
            f"docker_args {', '.join(outside)}: host path outside the folders the agent allows "
            f"to mount ({where})"
        )
    hint = "start the agent with --allow-privileged"
    if outside:
        hint = "start the agent with --allow-mount FOLDER (data folders) or --allow-privileged"
    raise DockerArgsError(f"{'; '.join(problems)}: refused; {hint}")
