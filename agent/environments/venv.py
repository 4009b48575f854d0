"""Cached virtualenvs: one per distinct (python, packages, requirements file).

Decisions:

- **Key.** sha256 of the interpreter's version string and ABI tag, the sorted
  normalised `packages` (PEP 503 names, spaces removed from version specifiers), the
  requirements file's *content*, and how the SDK's dependencies are provided (below).
  Index options (`index_args`) are not part of the key: they say where packages come
  from, not which.
- **No relocation.** uv (and pip) write absolute paths into a venv (`pyvenv.cfg`,
  script shebangs), so a venv built in a temporary directory breaks when renamed. The
  venv is therefore built directly at its final path `cache_root/venvs/<key>/`, under a
  per-key `filelock` (one builder per key, across processes), and *published* by
  atomically renaming a small marker file (`.conveyor-venv.json`) into it as the very
  last step. Readers only trust a venv whose marker exists; a half-built directory
  left by a crash has no marker and is wiped by the next builder.
- **Cache hits** take no lock: a stat of the marker, a shared `flock` on
  `.conveyor-in-use` (the "in use" lease, held until `VenvResult.release()`), a touch
  of the marker (its mtime is the LRU clock). A few milliseconds.
- **Eviction** (after each build): least-recently-used venvs are deleted while the cache
  is over `disk_budget_bytes`, except the one just asked for, one being built (its key
  lock is busy) or one in use (its in-use `flock` cannot be taken exclusively). Sizes
  are measured once at build time and stored in the marker.
- **Installer.** `uv` (from the `uv` package, else PATH) with its cache in
  `cache_root/uv-cache` (same file system, so files are hard-linked, not copied).
  When uv is missing or `installer="pip"`: `virtualenv` (a dependency of the agent)
  creates the venv, seeding pip from its app-data cache `cache_root/virtualenv`
  (symlinked, nothing downloaded: a fraction of stdlib `venv` + ensurepip), and pip
  installs. Index options come from `index_args`, else the `CONVEYOR_PIP_ARGS`
  environment variable (e.g. `--no-index --find-links /wheels`). Installer output goes
  to `log` line by line; a failure raises EnvironmentBuildError with the output's tail.
- **The Conveyor SDK inside the venv, offline.** A `zz_conveyor_sdk.pth` file in the
  venv's site-packages adds one directory, `cache_root/sdk/<hash>/`, *after* the venv's
  own site-packages, so the task's own packages always win. That directory holds
  symlinks to the `controller` and `agent` packages (from `sdk_source`) and, when the
  venv's interpreter has the agent's ABI (same SOABI, e.g. cpython-311-x86_64), to the
  installed files of the SDK's runtime dependencies taken from the agent's own
  environment: the closure of `importlib.metadata.requires("conveyor")` minus the
  server/agent-only ones (fastapi, uvicorn, gitpython, uv). Nothing is downloaded or
  copied, and other agent packages (pytest, fastapi...) stay invisible to the step.
  When the ABI differs (a task asking for another Python), the agent's compiled
  dependencies cannot load there, so the SDK's requirements are installed into the venv
  with the task's packages instead (this needs an index or `--find-links`).
  The symlink directory is made by `agent.environments.sdk`.
- **The SDK check, only where it can fail.** A build ends by checking that the SDK
  will import in the venv. When the SDK's dependencies come through the .pth file
  (same ABI) and none of the venv's own distributions provides a top-level module the
  SDK directory provides, at another version, the step imports exactly what the agent
  imports: checking costs a look at the venv's metadata and that the .pth names an SDK
  directory holding `controller`, no interpreter start. Otherwise (a task pinning e.g.
  pydantic 1, or SDK dependencies installed into the venv for another ABI) the new
  venv runs `import controller.models`; if that fails the build fails with its output
  and the conflicting distributions named.
"""

from __future__ import annotations

import collections
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import filelock

from agent.environments.sdk import (
    REQUIREMENT_RE,
    canonical_name,
    default_sdk_source,
    distribution_top_levels,
    sdk_dir,
    sdk_requirements,
)
from controller.errors import ConveyorError

LAYOUT_VERSION = 1
DEFAULT_DISK_BUDGET_BYTES = 20 * 1024**3
DEFAULT_BUILD_TIMEOUT_S = 3600.0
MARKER_NAME = ".conveyor-venv.json"
IN_USE_NAME = ".conveyor-in-use"
PTH_NAME = "zz_conveyor_sdk.pth"

Log = Callable[[str], None]
_AGENT_SOABI = sysconfig.get_config_var("SOABI") or ""


class EnvironmentBuildError(ConveyorError):
    """A virtualenv could not be built; `output` holds the installer's last lines."""

    code = "environment_build_failed"

    def __init__(self, message: str, output: str = ""):
        super().__init__(message, detail={"output": output} if output else None)
        self.output = output


@dataclass
class VenvResult:
    """A ready virtualenv. Keep it while the step runs: it holds the in-use lease."""

    path: Path
    python_path: Path
    cache_hit: bool
    seconds: float
    key: str = ""
    _lease: IO[bytes] | None = field(default=None, repr=False, compare=False)

    def release(self) -> None:
        """Let the venv be evicted again (also happens when the result is collected)."""
        if self._lease is not None:
            self._lease.close()
            self._lease = None

    def __enter__(self) -> VenvResult:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# ----------------------------------------------------------------- keys and python
def normalize_packages(packages: Iterable[str]) -> list[str]:
    """Sorted, de-duplicated requirement lines with canonical names and no comments."""
    out: set[str] = set()
    for raw in packages:
        for line in str(raw).splitlines():
            line = " ".join(line.split())
            if not line or line.startswith("#"):
                continue
            match = REQUIREMENT_RE.match(line)
            if match and not line.startswith("-") and "@" not in line:
                spec, _, marker = line.partition(";")
                rest = spec[match.end(1) :].replace(" ", "")
                line = (
                    canonical_name(match.group(1))
                    + rest
                    + (f"; {marker.strip()}" if marker else "")
                )
            out.add(line)
    return sorted(out)


def venv_key(
    python_version: str,
    packages: Sequence[str],
    requirements: str = "",
    sdk_deps: Sequence[str] = (),
) -> str:
    """The cache key of a venv (24 hex characters)."""
    blob = json.dumps(
        [
            LAYOUT_VERSION,
            python_version,
            normalize_packages(packages),
            requirements,
            sorted(sdk_deps),
        ]
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class _PythonInfo:
    executable: str
    soabi: str
    version: str


_PY_INFO: dict[tuple[str, int], _PythonInfo] = {}
_PY_PROBE = (
    "import sys, sysconfig; print(sys.executable); "
    "print(sysconfig.get_config_var('SOABI') or ''); print(' '.join(sys.version.split()))"
)


def _python_info(python: str) -> _PythonInfo:
    """Ask the interpreter `python` (name or path) who it is; memoised per process."""
    exe = shutil.which(python)
    if exe is None:
        raise EnvironmentBuildError(f"python interpreter {python!r} not found")
    memo_key = (exe, os.stat(exe).st_mtime_ns)
    if memo_key not in _PY_INFO and os.path.realpath(exe) == os.path.realpath(sys.executable):
        version = " ".join(sys.version.split())
        _PY_INFO[memo_key] = _PythonInfo(sys.executable, _AGENT_SOABI, version)  # no subprocess
    if memo_key not in _PY_INFO:
        try:
            out = subprocess.run(
                [exe, "-c", _PY_PROBE], capture_output=True, text=True, timeout=60, check=True
            ).stdout.splitlines()
        except (OSError, subprocess.SubprocessError) as exc:
            raise EnvironmentBuildError(f"cannot run python interpreter {exe}: {exc}") from exc
        _PY_INFO[memo_key] = _PythonInfo(out[0], out[1], out[2])
    return _PY_INFO[memo_key]


def _site_packages(venv_dir: Path) -> Path:
    found = sorted(venv_dir.glob("lib/*/site-packages"))
    if not found:
        raise EnvironmentBuildError(f"no site-packages folder in virtualenv {venv_dir}")
    return found[0]


def _ensure_pth(venv_dir: Path, sdk_path: Path) -> None:
    """Point the venv's SDK .pth file at `sdk_path` (rewritten atomically if it changed)."""
    pth = _site_packages(venv_dir) / PTH_NAME
    content = f"{sdk_path}\n"
    try:
        if pth.read_text() == content:
            return
    except FileNotFoundError:
        pass
    tmp = pth.with_name(f".{PTH_NAME}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(content)
    os.rename(tmp, pth)


# ----------------------------------------------------------------- building
def find_uv() -> str | None:
    """The uv binary: from the `uv` package, else PATH; None when there is none."""
    try:
        import uv

        return uv.find_uv_bin()
    except (ImportError, FileNotFoundError):
        return shutil.which("uv")


def _installer_env(cache_root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("UV_CACHE_DIR", str(cache_root / "uv-cache"))
    env["UV_PYTHON_DOWNLOADS"] = "never"
    env.setdefault("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    env.pop("VIRTUAL_ENV", None)
    return env


def _run(
    cmd: list[str], what: str, log: Log, env: dict[str, str], cwd: Path, timeout_s: float
) -> None:
    """Run an installer command, logging its output; EnvironmentBuildError on failure."""
    log("$ " + shlex.join(cmd))
    tail: collections.deque[str] = collections.deque(maxlen=25)
    try:
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            text=True,
            errors="replace",
        )
    except OSError as exc:
        raise EnvironmentBuildError(f"{what} failed: cannot run {cmd[0]}: {exc}") from exc
    timer = threading.Timer(timeout_s, proc.kill)
    timer.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                log(line)
                tail.append(line)
        code = proc.wait()
    finally:
        timer.cancel()
    if code != 0:
        output = "\n".join(tail)
        why = f"timed out after {timeout_s:g} s" if code == -9 else f"exit code {code}"
        raise EnvironmentBuildError(f"{what} failed ({why}):\n{output}", output=output)


def _create_command(venv_dir: Path, info: _PythonInfo, uv: str | None, cache_root: Path) -> tuple[list[str], str]:
    """The command creating an empty venv at `venv_dir`, and what it does (for errors)."""
    if uv:
        return (
            [uv, "venv", "--quiet", "--no-project", "--python", info.executable, str(venv_dir)],
            "creating the virtualenv with uv",
        )
    if importlib.util.find_spec("virtualenv") is None:
        raise EnvironmentBuildError(
            "cannot create a virtualenv: neither uv nor the virtualenv package is installed "
            f"in the agent's environment ({sys.executable}); install one of them"
        )
    return (
        [
            sys.executable, "-m", "virtualenv", "--quiet", "--no-download", "--no-periodic-update",
            "--symlink-app-data", "--app-data", str(cache_root / "virtualenv"),
            "--python", info.executable, str(venv_dir),
        ],
        "creating the virtualenv with virtualenv",
    )


def sdk_conflicts(site_packages: Path, sdk_path: Path) -> list[str]:
    """Distributions installed in a venv that shadow a top-level module of the SDK
    directory `sdk_path` with other files: "name version" each, sorted.

    A distribution whose metadata folder the SDK directory links too (same name, same
    version) is the very one the SDK uses and is not read at all; the others' RECORD
    (else top_level.txt) say which top-level names they installed. No interpreter start.
    """
    linked = {entry.name for entry in sdk_path.iterdir()}
    conflicts = set()
    for entry in site_packages.iterdir():
        if entry.suffix not in (".dist-info", ".egg-info") or entry.name in linked:
            continue
        dist = importlib.metadata.Distribution.at(entry)
        if distribution_top_levels(dist) & linked:
            conflicts.add(f"{canonical_name(dist.metadata['Name'] or entry.stem)} {dist.version}")
    return sorted(conflicts)


def _check_sdk(
    venv_dir: Path, python_path: Path, sdk_path: Path, sdk_deps: list[str], log: Log, env: dict[str, str]
) -> None:
    """EnvironmentBuildError unless the SDK will import in the venv (see the module docstring)."""
    if not (sdk_path / "controller" / "__init__.py").is_file():
        raise EnvironmentBuildError(
            f"the Conveyor SDK cannot be imported in the new virtualenv: {sdk_path} (named by its "
            f"{PTH_NAME}) holds no 'controller' package"
        )
    conflicts = sdk_conflicts(_site_packages(venv_dir), sdk_path)
    if not conflicts and not sdk_deps:
        log(f"Conveyor SDK linked from {sdk_path} (no installed package shadows its dependencies)")
        return
    if conflicts:
        log(f"packages of the task shadow SDK dependencies ({', '.join(conflicts)}): checking the import")
    check_env = {k: v for k, v in env.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    try:
        _run(
            [str(python_path), "-c", "import controller.models"],
            "importing the Conveyor SDK in the new virtualenv",
            log,
            check_env,
            venv_dir,
            120.0,
        )
    except EnvironmentBuildError as exc:
        if not conflicts:
            raise
        raise EnvironmentBuildError(
            f"{exc.message}\nthe task's packages replace SDK dependencies: {', '.join(conflicts)}",
            output=exc.output,
        ) from exc


def _build(
    venv_dir: Path,
    info: _PythonInfo,
    packages: list[str],
    requirements_file: Path | None,
    sdk_deps: list[str],
    sdk_path: Path,
    index_args: list[str],
    installer: str,
    log: Log,
    env: dict[str, str],
    timeout_s: float,
    cache_root: Path,
) -> None:
    uv = find_uv() if installer in ("auto", "uv") else None
    if installer == "uv" and uv is None:
        raise EnvironmentBuildError("installer 'uv' requested but not found")
    create, what = _create_command(venv_dir, info, uv, cache_root)
    _run(create, what, log, env, venv_dir.parent, timeout_s)
    python_path = venv_dir / "bin" / "python"
    args: list[str] = []
    if packages:
        generated = venv_dir / ".conveyor-requirements.txt"
        generated.write_text("\n".join(packages) + "\n")
        args += ["-r", str(generated)]
    if requirements_file is not None:
        args += ["-r", str(requirements_file)]
    args += sdk_deps
    if args:
        if uv:
            cmd = [uv, "pip", "install", "--python", str(python_path), *index_args, *args]
        else:
            cmd = [str(python_path), "-m", "pip", "install", "--no-input", *index_args, *args]
        _run(
            cmd, f"installing packages with {'uv' if uv else 'pip'}", log, env, venv_dir, timeout_s
        )
    _ensure_pth(venv_dir, sdk_path)
    _check_sdk(venv_dir, python_path, sdk_path, sdk_deps, log, env)


def _dir_size(path: Path) -> int:
    seen: set[tuple[int, int]] = set()
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def _write_marker(venv_dir: Path, data: dict[str, Any]) -> None:
    tmp = venv_dir / f"{MARKER_NAME}.{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps(data, indent=1))
    os.rename(tmp, venv_dir / MARKER_NAME)


def _take_lease(venv_dir: Path) -> IO[bytes] | None:
    """Hold a shared flock on the venv's in-use file; None if the venv is not ready."""
    if not (venv_dir / MARKER_NAME).exists():
        return None
    try:
        lease = open(venv_dir / IN_USE_NAME, "ab")  # noqa: SIM115 - held by VenvResult
    except OSError:
        return None
    fcntl.flock(lease, fcntl.LOCK_SH)
    if not (venv_dir / MARKER_NAME).exists() or not (venv_dir / "bin" / "python").exists():
        lease.close()  # evicted (or broken) while we waited
        return None
    return lease


# ----------------------------------------------------------------- eviction
def evict_venvs(root: Path, budget: int, keep: str, log: Log) -> None:
    """Delete least-recently-used venvs while the cache is over `budget` bytes."""
    for trash in root.glob(".trash-*"):
        shutil.rmtree(trash, ignore_errors=True)
    entries = []
    for marker in root.glob(f"*/{MARKER_NAME}"):
        try:
            size = int(json.loads(marker.read_text()).get("size", 0))
            entries.append((marker.stat().st_mtime, marker.parent, size))
        except (OSError, ValueError):
            continue
    total = sum(size for _, _, size in entries)
    for _mtime, venv_dir, size in sorted(entries, key=lambda e: e[0]):
        if total <= budget:
            break
        if venv_dir.name == keep:
            continue
        try:
            with filelock.FileLock(str(root / f"{venv_dir.name}.lock"), timeout=0):
                with open(venv_dir / IN_USE_NAME, "ab") as in_use:
                    try:
                        fcntl.flock(in_use, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue  # a step is using it
                    (venv_dir / MARKER_NAME).unlink()
                    trash = root / f".trash-{venv_dir.name}-{uuid.uuid4().hex[:8]}"
                    os.rename(venv_dir, trash)
        except (filelock.Timeout, OSError):
            continue
        shutil.rmtree(trash, ignore_errors=True)
        total -= size
        log(f"evicted virtualenv {venv_dir.name} ({size / 1e6:.0f} MB) from the cache")


# ----------------------------------------------------------------- entry point
def ensure_venv(
    python: str,
    packages: list[str],
    requirements_file: Path | None,
    cache_root: Path,
    log: Log,
    sdk_source: Path | None = None,
    disk_budget_bytes: int = DEFAULT_DISK_BUDGET_BYTES,
    *,
    index_args: list[str] | None = None,
    installer: str = "auto",
    timeout_s: float = DEFAULT_BUILD_TIMEOUT_S,
    lock_timeout_s: float = DEFAULT_BUILD_TIMEOUT_S,
) -> VenvResult:
    """Return a virtualenv with `packages` (and `requirements_file`) installed.

    `python` is an interpreter name or path; `installer` is "auto", "uv" or "pip";
    `index_args` are extra installer options (default: `$CONVEYOR_PIP_ARGS`). The
    result holds an in-use lease until `release()`. Raises EnvironmentBuildError.
    """
    started = time.monotonic()
    cache_root = Path(cache_root).absolute()
    info = _python_info(python)
    with_deps = bool(info.soabi) and info.soabi == _AGENT_SOABI
    sdk_deps = [] if with_deps else sdk_requirements()
    pkgs = normalize_packages(packages)
    requirements = ""
    if requirements_file is not None:
        requirements_file = Path(requirements_file).absolute()
        try:
            requirements = requirements_file.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise EnvironmentBuildError(
                f"cannot read requirements file {requirements_file}: {exc.strerror}"
            ) from exc
    key = venv_key(f"{info.version}|{info.soabi}", pkgs, requirements, sdk_deps)
    root = cache_root / "venvs"
    venv_dir = root / key
    try:
        sdk_path = sdk_dir(
            cache_root, Path(sdk_source or default_sdk_source()).absolute(), with_deps
        )
    except OSError as exc:
        raise EnvironmentBuildError(f"cannot prepare the Conveyor SDK for the venv: {exc}") from exc

    def result(lease: IO[bytes], hit: bool) -> VenvResult:
        os.utime(venv_dir / MARKER_NAME)
        return VenvResult(
            venv_dir, venv_dir / "bin" / "python", hit, time.monotonic() - started, key, lease
        )

    lease = _take_lease(venv_dir)
    if lease is not None:
        _ensure_pth(venv_dir, sdk_path)
        log(f"using cached virtualenv {venv_dir}")
        return result(lease, True)
    root.mkdir(parents=True, exist_ok=True)
    try:
        with filelock.FileLock(str(root / f"{key}.lock"), timeout=lock_timeout_s):
            lease = _take_lease(venv_dir)
            if lease is not None:
                log(f"using virtualenv {venv_dir} built by another process")
                _ensure_pth(venv_dir, sdk_path)
                return result(lease, True)
            shutil.rmtree(venv_dir, ignore_errors=True)  # left over from a crashed build
            index = (
                list(index_args)
                if index_args is not None
                else shlex.split(os.environ.get("CONVEYOR_PIP_ARGS", ""))
            )
            log(f"building virtualenv {venv_dir} with {info.executable} ({len(pkgs)} packages)")
            try:
                _build(
                    venv_dir,
                    info,
                    pkgs,
                    requirements_file,
                    sdk_deps,
                    sdk_path,
                    index,
                    installer,
                    log,
                    _installer_env(cache_root),
                    timeout_s,
                    cache_root,
                )
                _write_marker(
                    venv_dir,
                    {
                        "key": key,
                        "python": info.version,
                        "packages": pkgs,
                        "sdk_deps": sdk_deps,
                        "size": _dir_size(venv_dir),
                        "built_at": time.time(),
                    },
                )
            except BaseException:
                shutil.rmtree(venv_dir, ignore_errors=True)
                raise
            lease = _take_lease(venv_dir)
            if lease is None:
                raise EnvironmentBuildError(
                    f"virtualenv {venv_dir} vanished right after it was built"
                )
    except filelock.Timeout as exc:
        raise EnvironmentBuildError(
            f"timed out waiting for another process building {venv_dir}"
        ) from exc
    evict_venvs(root, disk_budget_bytes, key, log)
    log(f"virtualenv ready in {time.monotonic() - started:.1f} s")
    return result(lease, False)
