"""Runs INSIDE a task's container, with the image's own Python: the venv, then the step.

The agent copies this file into the container's control folder and the container's
`/bin/sh` bootstrap runs it after the setup shell script, as
`python3 boot.py /conveyor/run/config.json`. Standard library only, Python >= 3.7: it
must run in any image. It never imports `agent` or `controller`.

1. **Virtualenv** at `venv_root/venv_key` (a folder of the agent's cache mounted into
   every container, so it survives across tasks), built with the image's Python by the
   agent's `uv` binary when it runs in this image (glibc), else by `python -m venv` +
   pip. One builder per key across containers and agents: an exclusive `flock` on
   `venv_root/<key>.lock`; a venv is published by renaming its marker file into it
   last, and a user holds a shared `flock` on its `.conveyor-in-use` file while the step
   runs — the same protocol as host venvs (`agent.environments.venv`), so the agent's
   LRU eviction works on these venvs too.
2. **The Conveyor SDK.** A `.pth` file adds `sdk_path` (the agent's `controller` and
   `agent` packages, mounted read-only) and, when this Python has the agent's ABI
   (SOABI), `sdk_deps_path` (the agent's installed SDK dependencies, mounted read-only).
   Otherwise the SDK's requirements are installed into the venv with the task's
   packages (that needs an index). The build ends with `import controller.models`.
3. **The step** runs as a child in its own session; SIGTERM/SIGINT/SIGHUP to this
   process (PID 1's child: docker-init forwards the engine's signals) are forwarded to
   the step's process group, so stopping a container stops the whole step as on the
   host. The exit status goes to the stage file: `exit N` (negative N: killed by
   signal -N), which the agent reads for a precise outcome.

Progress goes to the stage file (`environment`, `environment_failed`, `run`,
`start_failed`, `exit N`); the agent's own messages are stderr lines starting with
`##conveyor## `, which the agent files under the task log's "agent" stream.
"""

from __future__ import annotations

import collections
import fcntl
import glob
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time

MARK = "##conveyor## "
MARKER_NAME = ".conveyor-venv.json"
IN_USE_NAME = ".conveyor-in-use"
PTH_NAME = "zz_conveyor_sdk.pth"


class BootError(Exception):
    """The environment could not be prepared; the message becomes the task's."""


def say(message: str) -> None:
    """One agent line in the task log."""
    for line in message.splitlines() or [""]:
        sys.stderr.write(MARK + line + "\n")
    sys.stderr.flush()


def set_stage(run_dir: str, text: str) -> None:
    tmp = os.path.join(run_dir, ".stage.tmp")
    with open(tmp, "w") as out:
        out.write(text + "\n")
    os.replace(tmp, os.path.join(run_dir, "stage"))


def run(cmd: list, what: str, env: dict, timeout_s: float) -> None:
    """Run an installer command, its output as agent lines; BootError on failure."""
    say("$ " + " ".join(shlex.quote(str(c)) for c in cmd))
    tail = collections.deque(maxlen=25)
    try:
        proc = subprocess.Popen(
            [str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env=env, universal_newlines=True, errors="replace",
        )
    except OSError as exc:
        raise BootError(f"{what} failed: cannot run {cmd[0]}: {exc}") from None
    timer = threading.Timer(timeout_s, proc.kill)
    timer.start()
    try:
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                say(line)
                tail.append(line)
        code = proc.wait()
    finally:
        timer.cancel()
    if code != 0:
        why = f"timed out after {timeout_s:g} s" if code == -9 else f"exit code {code}"
        output = "\n".join(tail)
        raise BootError(f"{what} failed ({why}):\n{output}")


def find_uv(path: str) -> str:
    """The agent's uv binary if it runs in this image, else ""."""
    if not path or not os.access(path, os.X_OK):
        return ""
    try:
        subprocess.run([path, "--version"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=30, check=True)
        return path
    except (OSError, subprocess.SubprocessError):
        say("the agent's uv does not run in this image; using python -m venv and pip")
        return ""


def take_lease(venv_dir: str):
    """A shared flock on the venv's in-use file (an fd), or None if it is not ready."""
    marker = os.path.join(venv_dir, MARKER_NAME)
    if not os.path.exists(marker):
        return None
    try:
        fd = os.open(os.path.join(venv_dir, IN_USE_NAME), os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                     0o666)
    except OSError:
        return None
    fcntl.flock(fd, fcntl.LOCK_SH)
    if not os.path.exists(marker) or not os.path.exists(os.path.join(venv_dir, "bin", "python")):
        os.close(fd)  # evicted (or broken) while we waited
        return None
    return fd


def dir_size(path: str) -> int:
    seen = set()
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


def build(cfg: dict, venv_dir: str, with_deps: bool) -> None:
    env = dict(os.environ)
    env.update(UV_CACHE_DIR=cfg["uv_cache"], PIP_CACHE_DIR=cfg["pip_cache"],
               UV_PYTHON_DOWNLOADS="never", PIP_DISABLE_PIP_VERSION_CHECK="1")
    for name in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"):
        env.pop(name, None)
    timeout_s = float(cfg.get("build_timeout_s", 3600))
    uv = find_uv(cfg.get("uv", ""))
    if uv:
        run([uv, "venv", "--quiet", "--no-project", "--python", sys.executable, venv_dir],
            "creating the virtualenv with uv", env, timeout_s)
    else:
        run([sys.executable, "-m", "venv", venv_dir],
            "creating the virtualenv (the image needs the venv module, e.g. python3-venv)",
            env, timeout_s)
    python = os.path.join(venv_dir, "bin", "python")
    args = []
    if cfg["packages"]:
        generated = os.path.join(venv_dir, ".conveyor-requirements.txt")
        with open(generated, "w") as out:
            out.write("\n".join(cfg["packages"]) + "\n")
        args += ["-r", generated]
    if cfg.get("requirements_file"):
        args += ["-r", cfg["requirements_file"]]
    if not with_deps:
        args += cfg["sdk_requirements"]
    if args:
        if uv:
            cmd = [uv, "pip", "install", "--python", python] + cfg["index_args"] + args
        else:
            cmd = [python, "-m", "pip", "install", "--no-input"] + cfg["index_args"] + args
        run(cmd, f"installing packages with {'uv' if uv else 'pip'}", env, timeout_s)
    sites = sorted(glob.glob(os.path.join(venv_dir, "lib", "*", "site-packages")))
    if not sites:
        raise BootError(f"no site-packages folder in virtualenv {venv_dir}")
    paths = [cfg["sdk_path"]] + ([cfg["sdk_deps_path"]] if with_deps else [])
    with open(os.path.join(sites[0], PTH_NAME), "w") as out:
        out.write("\n".join(paths) + "\n")
    run([python, "-c", "import controller.models"],
        "importing the Conveyor SDK in the new virtualenv", env, 120.0)


def ensure_venv(cfg: dict):
    """(venv folder, lease fd) for the task's packages, built if missing."""
    root, key = cfg["venv_root"], cfg["venv_key"]
    venv_dir = os.path.join(root, key)
    lease = take_lease(venv_dir)
    if lease is not None:
        os.utime(os.path.join(venv_dir, MARKER_NAME))
        say(f"using cached virtualenv {venv_dir}")
        return venv_dir, lease
    started = time.monotonic()
    os.makedirs(root, exist_ok=True)
    lock = os.open(os.path.join(root, key + ".lock"), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder per key, across containers
        lease = take_lease(venv_dir)
        if lease is not None:
            say(f"using virtualenv {venv_dir} built by another task")
            return venv_dir, lease
        shutil.rmtree(venv_dir, ignore_errors=True)  # left over from a crashed build
        agent_soabi = cfg.get("agent_soabi") or ""
        with_deps = bool(agent_soabi) and sysconfig.get_config_var("SOABI") == agent_soabi
        say(f"building virtualenv {venv_dir} with {sys.executable} "
            f"({len(cfg['packages'])} packages)")
        try:
            build(cfg, venv_dir, with_deps)
            marker = {"key": key, "python": " ".join(sys.version.split()),
                      "packages": cfg["packages"], "image": cfg.get("image", ""),
                      "sdk_deps_mounted": with_deps, "size": dir_size(venv_dir),
                      "built_at": time.time()}
            tmp = os.path.join(venv_dir, MARKER_NAME + ".tmp")
            with open(tmp, "w") as out:
                json.dump(marker, out, indent=1)
            os.replace(tmp, os.path.join(venv_dir, MARKER_NAME))
        except BaseException:
            shutil.rmtree(venv_dir, ignore_errors=True)
            raise
        lease = take_lease(venv_dir)
        if lease is None:
            raise BootError(f"virtualenv {venv_dir} vanished right after it was built")
        say(f"virtualenv ready in {time.monotonic() - started:.1f} s")
        return venv_dir, lease
    finally:
        os.close(lock)


def run_step(cfg: dict, venv_dir: str) -> int:
    """Run the step in its own session, forwarding stop signals; its wait status."""
    env = dict(os.environ)
    env.pop("PYTHONHOME", None)
    env["VIRTUAL_ENV"] = venv_dir
    env["PATH"] = os.path.join(venv_dir, "bin") + os.pathsep + env.get(
        "PATH", "/usr/local/bin:/usr/bin:/bin")
    say(f"running: {' '.join(shlex.quote(a) for a in cfg['argv'])} (in {cfg['cwd']})")
    set_stage(cfg["run_dir"], "run")
    try:
        proc = subprocess.Popen(cfg["argv"], cwd=cfg["cwd"], env=env, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    except OSError as exc:
        set_stage(cfg["run_dir"], "start_failed")
        say(f"error: cannot start {cfg['argv'][0]}: {exc}")
        return 127

    def forward(signum, _frame) -> None:
        try:
            os.killpg(proc.pid, signum)
        except OSError:
            pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    code = proc.wait()
    set_stage(cfg["run_dir"], f"exit {code}")
    return code


def main() -> int:
    with open(sys.argv[1]) as f:
        cfg = json.load(f)
    try:
        venv_dir, _lease = ensure_venv(cfg)  # the lease is held until this process exits
    except BootError as exc:
        with open(os.path.join(cfg["run_dir"], "error"), "w") as out:
            out.write(str(exc))
        set_stage(cfg["run_dir"], "environment_failed")
        say(f"error: {exc}")
        return 1
    code = run_step(cfg, venv_dir)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
