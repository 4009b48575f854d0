"""Warm step start-up: one interpreter per cached venv forks a child per step.

A Python step's start-up is mostly imports (pydantic models, SQLAlchemy and the store,
or the HTTP client): ~0.5 s of CPU per process. A fork server is a process started in
the step's venv (`python -m agent.forkserver`) that imports those modules once and
then forks one child per step; the child runs the step's script (`runpy`) as a cold
`python script.py args` / `python -m module args` would, with the modules already
loaded.

Decisions:

- **One per venv and start-up environment**, owned by the agent daemon
  (`ForkServers`, stopped with it). Its key is the venv's interpreter, the environment
  variables an interpreter reads at start (`PYTHON*`, `LANG`, `LC_*`) and the modules
  preloaded (which depend on the API kind). When the venv is rebuilt at the same path
  (its marker file is a new file) or its SDK link changes, the server is replaced: the
  old one finishes its running steps and exits.
- **Same start as a cold step, else a cold step.** The child gets the step's whole
  environment (`os.environ` replaced), working directory, `sys.argv`, `sys.path[0]`, its
  own session and process group (`setsid`), stdin/stdout/stderr passed by the agent as
  file descriptors over a Unix socket (`socket.send_fds`: the pipes the supervisor
  reads), and the server's umask and resource limits, which were the agent's when it
  started the server; the launch is refused (`launch` returns None: the supervisor
  starts the step cold) when the argv is not `<venv python> script.py|-m module ...`,
  when a start-up variable differs, or when the agent's umask or limits changed since.
  A failing preload is skipped (the step imports it itself). Known difference: every
  child of a server shares its hash seed (`PYTHONHASHSEED` is drawn once per server).
- **Nothing shared at fork.** The server imports modules only: no connection is opened,
  no thread started (it checks that it is single-threaded before each fork, else it
  refuses) and it calls `gc.freeze()` after preloading so the children do not copy the
  preloaded objects on the garbage collector's first walk.
- **Exit.** A forked child ends like a cold interpreter up to its exit handlers: the
  uncaught exception or `SystemExit` message printed, non-daemon threads joined, every
  exit handler run (the server's first one, registered before anything else, runs
  last); then that last handler flushes stdout, stderr and every file object the step
  left open, and ends the process with `os._exit` and the step's exit status, as
  multiprocessing's children do. What is skipped is the interpreter's teardown of the
  server's copy-on-write heap (clearing every preloaded module, ~45 ms of CPU per step
  with the store preloaded, most of it copying pages the fork shared). Known
  differences: `__del__` methods of objects still alive at exit do not run, and a
  daemon thread's unflushed work is lost sooner.
- **Store opened once.** For the embedded SQLite store, the server opens it as a step's
  `get_backend()` would (engines, schema check, then a read, an edit and a status
  change of a task that does not exist: the first connection and statements of each
  engine), then closes its connections; steps find it opened and make their own connections. The agent daemon
  opened and checked the same store before it started the server.
- **Exit status.** The server reaps its children (SIGCHLD wakes its selector) and sends
  each exit code (negative: the signal) on the step's own reply socket; `ForkedStep`
  offers the subset of `subprocess.Popen` the supervisor uses (pid, poll, wait,
  send_signal, returncode, stdout, stderr), so time limits, aborts and the process-tree
  handling are the supervisor's, unchanged. A crash of a step (even `os._exit` or
  SIGSEGV) only ends that child.
- **Lifetime.** The server's control socket is its only link to the agent. A `stop`
  message makes it finish its running steps and exit (daemon stop, venv replaced);
  end-of-file without `stop` (the agent died, even by SIGKILL) makes it SIGKILL its
  children's process groups and exit. It is also registered with the agent's watchdog,
  and its children get `PR_SET_PDEATHSIG` (SIGKILL) tied to it, as cold steps are to the
  agent. A server that died is started again at the next step.
- Disabled with `CONVEYOR_FORK_SERVER=0` in the agent's environment; Linux only.

Wire format: SOCK_SEQPACKET messages, one JSON object each. Agent → server on the
control socket: `{"argv", "cwd", "env"}` with four fds (reply socket, stdin, stdout,
stderr), or `{"stop": true}`. Server → agent: `{"ready", "pid", "umask", "rlimits",
"preloaded", "failed"}` once on the control socket; per step on its reply socket
`{"pid": N}` then `{"exit": code}` (or `{"error": message}` if it could not fork).
"""

# ruff: noqa: E402 - the exit handler below is registered before the other imports

from __future__ import annotations

import atexit
import os
import sys

#: Exit status of this process when it is a forked step (set by `main`); None in the server.
_forked_exit_code: int | None = None


def _end_forked_step() -> None:
    """The last exit handler of a forked step: flush, then end without the interpreter's
    teardown (see "Exit" in the module docstring). Does nothing in the server itself."""
    if _forked_exit_code is None:
        return
    flush_open_files()
    os._exit(_forked_exit_code)


if __name__ == "__main__":  # registered before any module registers its own: it runs last
    atexit.register(_end_forked_step)

import builtins
import gc
import importlib
import importlib.machinery
import io
import json
import logging
import resource
import runpy
import selectors
import signal
import socket
import subprocess
import tempfile
import threading
import time
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

log = logging.getLogger("agent")

#: Environment variable of the agent that disables fork servers when "0".
DISABLE_VARIABLE = "CONVEYOR_FORK_SERVER"
#: Longest wait for a new server to preload its modules and answer.
START_TIMEOUT_S = 60.0
#: Longest message (the step's environment is in it).
MAX_MESSAGE_BYTES = 1 << 20
#: Modules every fork server preloads: the SDK a step imports, its models, the function runner.
BASE_PRELOAD = (
    "pydantic",
    "controller.models",
    "controller.connect",
    "controller.sdk.task",
    "controller.sdk.logger",
    "controller.sdk.lifecycle",
    "controller.sdk.artifacts",
    "controller.pipeline.function_runner",
)
#: Added when the API is a database URL (the step opens the store itself).
DATABASE_PRELOAD = ("sqlalchemy", "controller.store", "sqlalchemy.dialects.sqlite")
POSTGRES_PRELOAD = ("sqlalchemy.dialects.postgresql", "psycopg")
#: Added when the API is an HTTP URL.
HTTP_PRELOAD = ("requests", "controller.client")
_RLIMITS = sorted(name for name in dir(resource) if name.startswith("RLIMIT_"))
_PR_SET_PDEATHSIG = 1
_MARKER_NAME = ".conveyor-venv.json"


def preload_for(api_url: str) -> tuple[str, ...]:
    """The modules a fork server preloads for steps talking to `api_url`."""
    if api_url.startswith(("http://", "https://")):
        return BASE_PRELOAD + HTTP_PRELOAD
    if api_url.startswith(("postgresql", "postgres")):
        return BASE_PRELOAD + DATABASE_PRELOAD + POSTGRES_PRELOAD
    return BASE_PRELOAD + DATABASE_PRELOAD


def startup_variables(env: Mapping[str, str]) -> dict[str, str]:
    """The variables of `env` an interpreter reads when it starts (a server's key)."""
    return {
        name: value
        for name, value in env.items()
        if name.startswith(("PYTHON", "LC_")) or name == "LANG"
    }


def current_umask() -> int | None:
    """This process's umask (from /proc, without changing it); None where unknown."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        return None
    return None


def current_rlimits() -> dict[str, list[int]]:
    """This process's resource limits by name (soft, hard)."""
    return {name: list(resource.getrlimit(getattr(resource, name))) for name in _RLIMITS}


def enabled() -> bool:
    """True when fork servers may be used (Linux, not disabled by CONVEYOR_FORK_SERVER=0)."""
    return sys.platform.startswith("linux") and os.environ.get(DISABLE_VARIABLE, "1") != "0"


# ----------------------------------------------------------------- agent side
class ForkedStep:
    """A step forked by a fork server: the part of `subprocess.Popen` the supervisor uses."""

    def __init__(self, pid: int, reply: socket.socket, stdout: IO[bytes], stderr: IO[bytes]) -> None:
        self.pid = pid
        self.returncode: int | None = None
        #: CPU seconds (user + system) the step's process used, once it ended.
        self.cpu_s: float | None = None
        self.stdout = stdout
        self.stderr = stderr
        self._reply = reply
        self._lock = threading.Lock()

    def _read_status(self, timeout_s: float | None) -> None:
        with self._lock:
            if self.returncode is not None:
                return
            self._reply.settimeout(timeout_s)
            try:
                message = self._reply.recv(MAX_MESSAGE_BYTES)
            except (TimeoutError, BlockingIOError):
                return
            except OSError:
                message = b""
            if message:
                status = json.loads(message)
                self.returncode = int(status.get("exit", -signal.SIGKILL))
                self.cpu_s = status.get("cpu_s")
            else:  # the server died without telling: the child went with it (PDEATHSIG)
                self.returncode = -signal.SIGKILL
            self._reply.close()

    def poll(self) -> int | None:
        """The exit code once the step ended (negative: killed by that signal), else None."""
        self._read_status(0.0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the end; raises subprocess.TimeoutExpired after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(str(self.pid), timeout or 0.0)
            self._read_status(left)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        """Signal the step's own process (unless it already ended)."""
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass


def _venv_fingerprint(python: Path) -> tuple[Any, ...]:
    """Changes when the venv of `python` is rebuilt in place or its SDK link changes."""
    venv = python.parent.parent
    parts: list[Any] = []
    try:
        parts.append(os.stat(venv / _MARKER_NAME).st_ino)
    except OSError:
        parts.append(None)
    for pth in sorted(venv.glob("lib/python*/site-packages/zz_conveyor_sdk.pth")):
        try:
            parts.append(pth.read_text())
        except OSError:
            parts.append(None)
    return tuple(parts)


class ForkServer:
    """One running fork server (agent side): start, launch steps, stop."""

    def __init__(self, python: Path, env: Mapping[str, str], preload: tuple[str, ...]) -> None:
        self.python = python
        self.preload = preload
        self.fingerprint = _venv_fingerprint(python)
        self._lock = threading.Lock()
        control, server_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        errors = tempfile.TemporaryFile()  # noqa: SIM115 - read if the server fails to start
        started = time.monotonic()
        try:
            self.process = subprocess.Popen(
                [str(python), "-m", "agent.forkserver", str(server_end.fileno()), *preload],
                env=dict(env),
                cwd=str(python.parent.parent),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=errors,
                pass_fds=[server_end.fileno()],
                start_new_session=True,
            )
        finally:
            server_end.close()
        self.errors = errors
        self.control = control
        control.settimeout(START_TIMEOUT_S)
        try:
            hello = control.recv(MAX_MESSAGE_BYTES)
        except OSError:
            hello = b""
        if not hello:
            self.process.kill()
            self.process.wait(10)
            control.close()
            errors.seek(0)
            text = errors.read().decode(errors="replace")[-500:]
            errors.close()
            raise OSError(f"fork server did not start: {text}")
        control.settimeout(None)
        self.hello: dict[str, Any] = json.loads(hello)
        self.start_ms = (time.monotonic() - started) * 1000
        from agent.watchdog import guard_process

        try:
            import psutil

            guard_process(self.process.pid, psutil.Process(self.process.pid).create_time())
        except Exception:  # noqa: BLE001 - it also exits by itself when the agent dies
            pass

    def alive(self) -> bool:
        """True while the server process runs."""
        return self.process.poll() is None

    def mismatch(self) -> str | None:
        """Why a step forked now would not start like a cold one (None: it would)."""
        if self.hello.get("umask") is not None and self.hello["umask"] != current_umask():
            return "the agent's umask changed"
        if self.hello.get("rlimits") != current_rlimits():
            return "the agent's resource limits changed"
        return None

    def launch(self, argv: list[str], cwd: Path, env: Mapping[str, str]) -> ForkedStep:
        """Fork one step; raises OSError if the server cannot."""
        reply, reply_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        out_read, out_write = os.pipe()
        err_read, err_write = os.pipe()
        stdin = os.open(os.devnull, os.O_RDONLY)
        try:
            request = json.dumps({"argv": argv, "cwd": str(cwd), "env": dict(env)}).encode()
            with self._lock:
                socket.send_fds(self.control, [request], [reply_end.fileno(), stdin, out_write, err_write])
        except OSError:
            for fd in (out_read, err_read):
                os.close(fd)
            reply.close()
            raise
        finally:
            reply_end.close()
            for fd in (stdin, out_write, err_write):
                os.close(fd)
        reply.settimeout(START_TIMEOUT_S)
        try:
            answer = json.loads(reply.recv(MAX_MESSAGE_BYTES) or b'{"error": "the fork server closed"}')
        except (OSError, ValueError) as exc:
            answer = {"error": str(exc)}
        if "pid" not in answer:
            reply.close()
            os.close(out_read)
            os.close(err_read)
            raise OSError(f"fork server: {answer.get('error')}")
        return ForkedStep(int(answer["pid"]), reply, open(out_read, "rb", buffering=0),  # noqa: SIM115
                          open(err_read, "rb", buffering=0))  # noqa: SIM115

    def stop(self, wait_s: float = 0.0) -> None:
        """Let the server finish its running steps and exit (waiting up to `wait_s`)."""
        try:
            with self._lock:
                self.control.send(b'{"stop": true}')
        except OSError:
            pass
        self.control.close()
        from agent.watchdog import release_process

        release_process(self.process.pid)
        if wait_s:
            try:
                self.process.wait(wait_s)
            except subprocess.TimeoutExpired:
                pass
        self.errors.close()


class ForkServers:
    """The fork servers of one agent daemon: one per (venv interpreter, start-up
    environment, preloaded modules), started at the first step that needs one."""

    def __init__(self, api_url: str) -> None:
        self.preload = preload_for(api_url)
        self._servers: dict[tuple[Any, ...], ForkServer] = {}
        self._lock = threading.Lock()
        self._closed = False

    def launch(
        self, python: Path, argv: list[str], cwd: Path, env: Mapping[str, str], say: Callable[[str], None]
    ) -> ForkedStep | None:
        """Fork the step `argv` from the server of `python`; None: start it cold (`say` tells why)."""
        if len(argv) < 2 or Path(argv[0]) != python:
            return None
        if argv[1].startswith("-") and not (argv[1] == "-m" and len(argv) > 2):
            return None  # interpreter options: only a cold start honours them
        if argv[1] != "-m" and not (cwd / argv[1]).is_file():
            return None  # a directory or zip file to run: a cold start
        key = (str(python), tuple(sorted(startup_variables(env).items())))
        try:
            server = self._server(key, python, env)
        except OSError as exc:
            say(f"starting cold: {exc}")
            return None
        if server is None:
            return None
        reason = server.mismatch()
        if reason:
            say(f"starting cold: {reason} since its fork server started")
            return None
        try:
            step = server.launch(argv, cwd, env)
        except OSError as exc:
            say(f"starting cold: {exc}")
            return None
        say(f"forked by the fork server of {python.parent.parent} (pid {server.process.pid})")
        return step

    def _server(self, key: tuple[Any, ...], python: Path, env: Mapping[str, str]) -> ForkServer | None:
        with self._lock:
            if self._closed:
                return None
            server = self._servers.get(key)
            if server is not None and (not server.alive() or server.fingerprint != _venv_fingerprint(python)):
                log.info("fork server of %s replaced (%s)", python,
                         "venv changed" if server.alive() else "it ended")
                server.stop()
                server = None
            if server is None:
                server = self._servers[key] = ForkServer(python, env, self.preload)
                log.info("fork server of %s started in %.0f ms (preloaded %d modules%s)", python,
                         server.start_ms, len(server.hello.get("preloaded", [])),
                         f"; failed: {', '.join(server.hello['failed'])}" if server.hello.get("failed") else "")
            return server

    def stop_all(self, wait_s: float = 5.0) -> None:
        """Stop every server (each finishes its running steps first); no new ones start."""
        with self._lock:
            self._closed = True
            servers, self._servers = list(self._servers.values()), {}
        for server in servers:
            server.stop(wait_s)


# ----------------------------------------------------------------- server side
@dataclass
class StepRequest:
    """What a forked child runs (server side, after the fork)."""

    argv: list[str]
    cwd: str
    env: dict[str, str]


def _preload(modules: list[str]) -> tuple[list[str], list[str]]:
    loaded, failed = [], []
    for name in modules:
        try:
            importlib.import_module(name)
            loaded.append(name)
        except Exception:  # noqa: BLE001 - the step imports it itself (and sees the error)
            failed.append(name)
    return loaded, failed


def open_store_before_fork() -> bool:
    """Open the embedded SQLite store of `CONVEYOR_API` once, in the server, the way a
    step's `get_backend()` would (engines, schema check), run a read, an edit and a
    status change of a task that does not exist (they change nothing), then close its
    connections: every forked step finds it opened and makes its own connections.
    Only for SQLite (a PostgreSQL store keeps a listener of its own); False if skipped."""
    url = os.environ.get("CONVEYOR_API", "")
    if not url.startswith("sqlite:") or "controller.connect" not in sys.modules:
        return False
    try:
        from controller.connect import get_backend
        backend = get_backend()
    except Exception:  # noqa: BLE001 - each step opens the store itself (and sees the error)
        return False
    missing = "forkserver-warm-up"  # no such task: each call changes nothing
    try:
        # The statements every step runs first, on each of the store's engines (their
        # first connection initializes the dialect; ~6 ms of CPU a step need not repeat).
        for call in (lambda: backend.get_task(missing),
                     lambda: backend.edit_task(missing, {"runtime": {}}, force=True),
                     lambda: backend.set_status(missing, "completed")):
            try:
                call()
            except Exception:  # noqa: BLE001, S110 - NotFoundError expected; a step sees any other
                pass
    finally:
        backend.close()  # no connection crosses a fork
    return True


def _send(sock: socket.socket, message: dict[str, Any]) -> None:
    try:
        sock.send(json.dumps(message).encode())
    except OSError:
        pass


def _prctl() -> Callable[..., int] | None:
    """libc's prctl, looked up once in the server (importing ctypes in every child cost
    ~8 ms of CPU per step); None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    return ctypes.CDLL(None, use_errno=True).prctl


def _become_step(request: StepRequest, fds: list[int], server_pid: int,
                 prctl: Callable[..., int] | None) -> None:
    """In the child: the process a cold start of the step would have been."""
    os.setsid()
    if prctl is not None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != server_pid:  # the server died before prctl took effect
            os._exit(1)
    for target, fd in zip((0, 1, 2), fds, strict=True):
        os.dup2(fd, target)
    for fd in fds:
        if fd > 2:
            os.close(fd)
    os.chdir(request.cwd)
    os.environ.clear()
    os.environ.update(request.env)
    time.tzset()  # TZ as the step's environment says


def serve(control_fd: int, modules: list[str]) -> StepRequest | None:
    """The fork server's loop. Returns only in a forked child, with the step to run."""
    control = socket.socket(fileno=control_fd)
    server_pid = os.getpid()
    loaded, failed = _preload(modules)
    store_opened = open_store_before_fork()
    prctl = _prctl()
    gc.collect()
    gc.freeze()
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_read, False)
    os.set_blocking(wake_write, False)
    signal.signal(signal.SIGCHLD, lambda _sig, _frame: None)
    signal.set_wakeup_fd(wake_write)
    _send(control, {"ready": True, "pid": os.getpid(), "umask": current_umask(),
                    "rlimits": current_rlimits(), "preloaded": loaded, "failed": failed,
                    "store_opened": store_opened})
    selector = selectors.DefaultSelector()
    selector.register(control, selectors.EVENT_READ)
    selector.register(wake_read, selectors.EVENT_READ)
    children: dict[int, socket.socket] = {}
    accepting = True
    while accepting or children:
        for key, _ in selector.select(timeout=1.0):
            if key.fileobj is control:
                try:
                    data, fds, _flags, _addr = socket.recv_fds(control, MAX_MESSAGE_BYTES, 4)
                except OSError:
                    data, fds = b"", []
                message = json.loads(data) if data else {}
                if not data or message.get("stop"):
                    if not data:  # the agent died: its steps go with it, as cold ones would
                        for pid in children:
                            try:
                                os.killpg(pid, signal.SIGKILL)
                            except OSError:
                                pass
                    accepting = False
                    selector.unregister(control)
                    continue
                request = _fork(message, fds, children)
                if request is not None:  # the child
                    selector.close()
                    control.close()
                    signal.set_wakeup_fd(-1)
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    os.close(wake_read)
                    os.close(wake_write)
                    for reply in children.values():
                        reply.close()
                    _become_step(request, fds[1:], server_pid, prctl)
                    return request
            else:
                try:
                    while os.read(wake_read, 512):
                        pass
                except BlockingIOError:
                    pass
        _reap(children)
    return None


def _fork(message: dict[str, Any], fds: list[int], children: dict[int, socket.socket]) -> StepRequest | None:
    """Fork the child for one request (returns the request in the child, None in the server)."""
    if len(fds) != 4:
        for fd in fds:
            os.close(fd)
        return None
    reply = socket.socket(fileno=fds[0])
    if threading.active_count() != 1:
        _send(reply, {"error": f"the fork server runs {threading.active_count()} threads"})
        reply.close()
    else:
        pid = os.fork()
        if pid == 0:
            reply.close()
            return StepRequest(list(message["argv"]), str(message["cwd"]), dict(message["env"]))
        children[pid] = reply
        _send(reply, {"pid": pid})
    for fd in fds[1:]:
        os.close(fd)
    return None


def _reap(children: dict[int, socket.socket]) -> None:
    while children:
        try:
            pid, status, usage = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        reply = children.pop(pid, None)
        if reply is not None:
            _send(reply, {"exit": os.waitstatus_to_exitcode(status), "cpu_s": usage.ru_utime + usage.ru_stime})
            reply.close()


def _step_traceback(tb: TracebackType | None) -> TracebackType | None:
    """`tb` without the frames of this module and runpy (as a cold start shows it)."""
    ours = (__file__, runpy.__file__, "<frozen runpy>")
    while tb is not None and tb.tb_frame.f_code.co_filename in ours:
        tb = tb.tb_next
    return tb


def run_step_in_child(request: StepRequest) -> None:
    """Run the step's script or module as `__main__`, as `python argv[1:]` would."""
    args = request.argv[1:]
    try:
        if args[0] == "-m":
            sys.argv = [args[1], *args[2:]]
            sys.path[0] = os.getcwd()
            runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(args)
            path = os.path.abspath(args[0])
            sys.path[0] = os.path.dirname(path)
            main = types.ModuleType("__main__")
            main.__file__ = path
            main.__loader__ = importlib.machinery.SourceFileLoader("__main__", path)
            main.__builtins__ = builtins
            sys.modules["__main__"] = main
            with open(path, "rb") as source:
                code = compile(source.read(), path, "exec")
            exec(code, main.__dict__)  # noqa: S102 - what `python script.py` does
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - reported the way the interpreter would
        trimmed = _step_traceback(exc.__traceback__)
        sys.excepthook(type(exc), exc.with_traceback(trimmed), trimmed)
        raise SystemExit(1) from None


def flush_open_files() -> None:
    """Flush what a forked step's interpreter teardown would have flushed: stdout, stderr
    and every file object the step created and left open (its buffers). Objects from
    before the fork are frozen (`gc.freeze`) and so not walked: only the step's own."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except Exception:  # noqa: BLE001, S110 - closed or broken: nothing to flush
            pass
    for obj in gc.get_objects():
        if isinstance(obj, io.IOBase):
            try:
                if not obj.closed:
                    obj.flush()
            except Exception:  # noqa: BLE001, S110 - as a teardown would, ignore it
                pass


def exit_status(code: object) -> int:
    """The exit status `raise SystemExit(code)` gives an interpreter (None: 0, an int:
    itself modulo 256, anything else: 1, after it was printed)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    return 1


def main() -> None:
    """`python -m agent.forkserver CONTROL_FD MODULE...` (started by `ForkServer`)."""
    global _forked_exit_code
    request = serve(int(sys.argv[1]), sys.argv[2:])
    if request is None:
        return
    lifecycle = sys.modules.get("controller.sdk.lifecycle")
    if lifecycle is not None:
        lifecycle.ends_without_teardown()
    _forked_exit_code = 0  # from here on this process ends in `_end_forked_step`
    try:
        run_step_in_child(request)
    except SystemExit as exc:
        _forked_exit_code = exit_status(exc.code)
        raise


if __name__ == "__main__":
    main()
