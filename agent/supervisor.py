"""Run one step as a child process: stream its output, enforce its time limit, stop it.

Decisions:

- **Process tree.** The step runs in its own session and process group
  (`start_new_session=True`) with `PR_SET_PDEATHSIG=SIGKILL` (Linux, set via ctypes in
  `preexec_fn`), so the step dies with the agent. The death signal fires when the
  *thread* that spawned the step ends; `run_step` blocks that thread until the step
  ends, so that is the same moment. Descendants are tracked by scanning the process
  table (one pass, psutil) every 0.5 s and right before every signal; the set is
  cumulative, so a descendant that left the group (`setsid`) and whose parent already
  died is still known. The step's group and every descendant seen are registered with
  the agent's watchdog (`agent.watchdog`), which SIGKILLs them if the agent dies, even
  by SIGKILL. Stopping = SIGTERM to the group and to every known descendant,
  wait `grace_s`, then SIGKILL to the group and every known descendant still alive.
  After a normal exit, leftovers (group members or known descendants still running)
  are stopped the same way, so nothing of a step outlives it, and no background child
  can keep its pipes open forever.
- **Warm start.** `run_step(launch=...)` lets a launcher start the step instead (the
  fork server of its venv, `agent.forkserver`); it returns a `StepProcess` (pid, poll,
  wait, send_signal, returncode, stdout/stderr pipes) or None, and then the step starts
  cold as above. Everything below is the same for both; the time limit counts from the
  moment the step's process exists.
- **Output.** One reader thread multiplexes stdout and stderr (selectors, non-blocking
  reads), so it can be stopped even if an unknown process still holds a pipe. Splitting
  into lines, progress-bar folding and batched delivery (every 0.25 s) are
  `agent.output`'s; a failing or slow `on_output` never delays the time limit or
  aborts (this thread does those), and its first error is `StepOutcome.output_error`.
- **Environment.** `PYTHONUNBUFFERED=1` is added unless set, so Python steps stream.
- **Outcome.** `exit_code` is the return code (negative signal number when killed by
  a signal); `reason` is a `StatusReason` value: completed / exit_code / signal /
  time_limit / the string `should_abort()` returned / setup_failed (cannot start).
- **Failure message.** `LastExceptionLine` watches the stderr lines as they stream by
  and keeps the last line of the last Python traceback ("ValueError: bad input");
  `with_exception` appends it to an `exit_code` outcome's message, so a failed step
  says "exited with code 1: ValueError: bad input" (host and container steps alike).
"""

from __future__ import annotations

import ctypes
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any, Protocol

import psutil

from agent.output import (
    DEFAULT_MAX_PENDING_CHARS,
    OutputCallback,
    PendingLines,
    StreamSplitter,
    deliver_batches,
)
from agent.watchdog import (
    guard_process,
    guard_process_group,
    release_process,
    release_process_group,
)
from controller.models import MAX_LOG_LINE_CHARS, StatusReason

_PR_SET_PDEATHSIG = 1
_READ_SIZE = 64 * 1024
_POLL_S = 0.2
_SNAPSHOT_EVERY_S = 0.5
_TRACEBACK_START = "Traceback (most recent call last):"
#: Longest exception line kept for a status message (characters).
MAX_EXCEPTION_LINE_CHARS = 300


class StepProcess(Protocol):
    """The running step as the supervisor sees it: a `subprocess.Popen` (cold start) or
    an `agent.forkserver.ForkedStep` (forked by a warm interpreter of the venv)."""

    pid: int
    returncode: int | None
    stdout: IO[bytes] | None
    stderr: IO[bytes] | None

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def send_signal(self, sig: int) -> None: ...


#: Starts a step another way (argv, cwd, env); None: start it as a child process here.
Launcher = Callable[[list[str], Path, dict[str, str]], StepProcess | None]


@dataclass(frozen=True)
class StepOutcome:
    """How a step ended."""

    exit_code: int | None
    signal_name: str | None
    reason: str
    message: str
    duration_s: float
    output_error: str | None = None


# ----------------------------------------------------------------- output
class LastExceptionLine:
    """The last line of the last Python traceback seen in a step's stderr.

    `feed` takes the batches a supervisor delivers (LogLine-like dicts) and costs one
    string check per stderr line: after a "Traceback (most recent call last):" line,
    the first line that is not indented is the exception ("ValueError: bad input").
    """

    def __init__(self) -> None:
        self.line: str | None = None
        self._in_traceback = False

    def feed(self, batch: list[dict[str, Any]]) -> None:
        """Look at one batch of output lines (only the stderr ones matter)."""
        for entry in batch:
            if entry.get("stream") != "stderr":
                continue
            text = str(entry.get("line", ""))
            if text.startswith(_TRACEBACK_START):
                self._in_traceback = True
            elif self._in_traceback and text.strip() and not text[0].isspace():
                self.line = text.strip()[:MAX_EXCEPTION_LINE_CHARS]
                self._in_traceback = False

    def watching(self, on_output: OutputCallback) -> OutputCallback:
        """`on_output`, with every batch looked at first."""

        def watched(batch: list[dict[str, Any]]) -> None:
            self.feed(batch)
            on_output(batch)

        return watched


def with_exception(outcome: StepOutcome, exception_line: str | None) -> StepOutcome:
    """`outcome` with `exception_line` appended to its message when it failed by exit code."""
    if not exception_line or outcome.reason != StatusReason.exit_code:
        return outcome
    return replace(outcome, message=f"{outcome.message}: {exception_line}")


def _read_pipes(
    pipes: dict[str, Any], output: PendingLines, max_line_chars: int, stop: threading.Event
) -> None:
    """Reader thread: read both pipes until EOF or `stop`, splitting into lines."""
    selector = selectors.DefaultSelector()
    splitters = {}
    for name, pipe in pipes.items():
        os.set_blocking(pipe.fileno(), False)
        splitters[pipe.fileno()] = StreamSplitter(name, output, max_line_chars)
        selector.register(pipe.fileno(), selectors.EVENT_READ)
    try:
        while selector.get_map() and not stop.is_set():
            for key, _ in selector.select(timeout=0.1):
                try:
                    data = os.read(key.fd, _READ_SIZE)
                except BlockingIOError:
                    continue
                if data:
                    splitters[key.fd].feed(data)
                else:
                    selector.unregister(key.fd)
            output.wait_for_room(stop)
    finally:
        for splitter in splitters.values():
            splitter.feed(b"", final=True)
        selector.close()
        for pipe in pipes.values():
            pipe.close()


# ----------------------------------------------------------------- process tree
class _Tree:
    """Every process seen descending from the step (cumulative, identity-checked)."""

    def __init__(self, root_pid: int):
        try:
            self.root: psutil.Process | None = psutil.Process(root_pid)
        except psutil.NoSuchProcess:
            self.root = None
        self.known: dict[int, psutil.Process] = {}
        self.guarded: set[int] = set()

    def guard_new(self) -> None:
        """Register every known descendant not registered yet with the watchdog."""
        for pid, proc in list(self.known.items()):
            if pid in self.guarded:
                continue
            try:
                guard_process(pid, proc.create_time())
            except psutil.Error:
                continue
            self.guarded.add(pid)

    def release_all(self) -> None:
        """Stop guarding every registered descendant (the step is over)."""
        for pid in self.guarded:
            release_process(pid)
        self.guarded.clear()

    def snapshot(self) -> None:
        roots = {p.pid for p in self.alive()}
        if self.root is not None and self.root.is_running():  # not a reused pid
            roots.add(self.root.pid)
        children: dict[int, list[int]] = {}
        for proc in psutil.process_iter(["ppid"]):
            children.setdefault(proc.info["ppid"], []).append(proc.pid)
        todo = list(roots)
        while todo:
            for pid in children.get(todo.pop(), []):
                if pid not in self.known:
                    try:
                        self.known[pid] = psutil.Process(pid)
                    except psutil.NoSuchProcess:
                        continue
                    todo.append(pid)

    def alive(self) -> list[psutil.Process]:
        out = []
        for proc in self.known.values():
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    out.append(proc)
            except psutil.Error:
                continue
        return out


def _group_alive(pgid: int) -> bool:
    """True while the process group has a member that is not a zombie.

    Zombies are dead already; they count because their new parent (often PID 1 in a
    container) may take a while to reap them.
    """
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if not os.path.isdir("/proc/self"):
        return True
    for pid in psutil.pids():
        try:
            with open(f"/proc/{pid}/stat", "rb") as stat:
                fields = stat.read().rpartition(b")")[2].split()
        except OSError:
            continue
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            return True
    return False


def _signal_all(proc: StepProcess, tree: _Tree, sig: signal.Signals) -> None:
    tree.snapshot()
    if proc.poll() is None or _group_alive(proc.pid):  # the group id is still ours
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass
    for member in tree.alive():
        try:
            member.send_signal(sig)
        except psutil.Error:
            pass


def _all_gone(proc: StepProcess, tree: _Tree) -> bool:
    return proc.poll() is not None and not _group_alive(proc.pid) and not tree.alive()


def _wait_gone(proc: StepProcess, tree: _Tree, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not _all_gone(proc, tree):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _stop_tree(proc: StepProcess, tree: _Tree, grace_s: float) -> None:
    """SIGTERM everything, wait `grace_s`, SIGKILL whatever is left."""
    _signal_all(proc, tree, signal.SIGTERM)
    if _wait_gone(proc, tree, grace_s):
        return
    _signal_all(proc, tree, signal.SIGKILL)
    _wait_gone(proc, tree, 5.0)


def _pdeathsig_preexec() -> Callable[[], None] | None:
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the agent died before prctl took effect
            os._exit(1)

    return preexec


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _format_seconds(seconds: float) -> str:
    return f"{seconds:g}"


# ----------------------------------------------------------------- entry point
def run_step(
    argv: list[str],
    cwd: Path,
    env: Mapping[str, str] | None,
    time_limit_s: float | None,
    on_output: OutputCallback,
    should_abort: Callable[[], str | None],
    grace_s: float = 10.0,
    *,
    flush_interval_s: float = 0.25,
    max_line_chars: int = MAX_LOG_LINE_CHARS,
    max_pending_chars: int = DEFAULT_MAX_PENDING_CHARS,
    launch: Launcher | None = None,
    on_final_output: OutputCallback | None = None,
) -> StepOutcome:
    """Run `argv` in `cwd` until it ends, its time limit passes or `should_abort()` says so.

    `env` is the step's whole environment (None: the agent's). Output goes to
    `on_output` in batches of LogLine-like dicts. Never raises for the step's own
    failures; returns a StepOutcome (reason `setup_failed` if it cannot start).
    `launch` may start it instead (a fork server, `agent.forkserver`); when it returns
    None the step starts as a child process of this one (a cold start).
    `on_final_output` (default: `on_output`) gets the lines still undelivered when the
    step's streams ended.
    """
    child_env = dict(os.environ if env is None else env)
    child_env.setdefault("PYTHONUNBUFFERED", "1")
    try:
        proc = (launch(argv, cwd, child_env) if launch is not None else None) or subprocess.Popen(
            argv,
            cwd=cwd,
            env=child_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=_pdeathsig_preexec(),
        )
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        return StepOutcome(
            None,
            None,
            StatusReason.setup_failed,
            f"cannot start {argv[0] if argv else 'step'}: {exc}",
            0.0,
        )
    assert proc.stdout is not None and proc.stderr is not None
    started = time.monotonic()  # the time limit counts from here (not a fork server's own start)

    output = PendingLines(max_pending_chars)
    stop_reading, reader_done = threading.Event(), threading.Event()
    errors: list[str] = []

    def reader() -> None:
        try:
            _read_pipes(
                {"stdout": proc.stdout, "stderr": proc.stderr}, output, max_line_chars, stop_reading
            )
        finally:
            reader_done.set()

    threads = [
        threading.Thread(target=reader, name=f"step-{proc.pid}-reader", daemon=True),
        threading.Thread(
            target=deliver_batches,
            args=(output, on_output, flush_interval_s, reader_done, errors, on_final_output),
            name=f"step-{proc.pid}-delivery",
            daemon=True,
        ),
    ]
    for thread in threads:
        thread.start()

    guard_process_group(proc.pid)  # killed by the watchdog if the agent dies
    tree = _Tree(proc.pid)
    deadline = started + time_limit_s if time_limit_s else None
    stop_reason: str | None = None
    ended_at: float | None = None
    try:
        next_snapshot = started + _SNAPSHOT_EVERY_S
        while proc.poll() is None:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                stop_reason = StatusReason.time_limit
                break
            try:
                abort = should_abort()
            except Exception:  # a broken callback must not leave the step unsupervised
                abort = None
            if abort:
                stop_reason = abort
                break
            if now >= next_snapshot:
                tree.snapshot()
                tree.guard_new()  # known to the watchdog before the agent may die
                next_snapshot = now + _SNAPSHOT_EVERY_S
            wait = _POLL_S if deadline is None else max(0.0, min(_POLL_S, deadline - now))
            try:
                proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                pass
        if stop_reason is None:
            ended_at = time.monotonic()
        if stop_reason is not None or not _all_gone(proc, tree):
            _stop_tree(proc, tree, grace_s)
    finally:
        if proc.poll() is None:  # interrupted (e.g. KeyboardInterrupt): leave nothing behind
            _stop_tree(proc, tree, 0.0)
        release_process_group(proc.pid)
        tree.release_all()
        reader_done.wait(2.0)  # pipes close once every writer is gone
        stop_reading.set()
        for thread in threads:
            thread.join(30.0)
        leftover = output.take()  # delivery gave up on them (it took too long): hand them over
        if leftover:
            try:
                (on_final_output or on_output)(leftover)
            except Exception as exc:  # noqa: BLE001 - reported like any delivery error
                errors.append(f"{type(exc).__name__}: {exc}")

    duration = (ended_at or time.monotonic()) - started
    return step_outcome(
        proc.returncode, stop_reason, time_limit_s, duration, errors[0] if errors else None
    )


def step_outcome(
    code: int | None,
    stop_reason: str | None,
    time_limit_s: float | None,
    duration_s: float,
    output_error: str | None = None,
) -> StepOutcome:
    """The outcome of a step that exited with `code` (negative: killed by that signal).

    `stop_reason` (time_limit, aborted, agent_shutdown) wins over the exit code: the
    step was stopped on purpose. Shared by host and container steps, so both report
    the same reasons and messages.
    """
    signal_name = _signal_name(-code) if code is not None and code < 0 else None
    if stop_reason == StatusReason.time_limit:
        reason, message = (
            stop_reason,
            f"time limit exceeded: the step ran longer than its limit of "
            f"{_format_seconds(time_limit_s or 0)} s",
        )
    elif stop_reason is not None:
        reason, message = stop_reason, f"stopped: {stop_reason.replace('_', ' ')}"
    elif code == 0:
        reason, message = StatusReason.completed, "exited with code 0"
    elif signal_name is not None:
        reason, message = StatusReason.signal, f"killed by {signal_name}"
    else:
        reason, message = StatusReason.exit_code, f"exited with code {code}"
    return StepOutcome(code, signal_name, reason, message, duration_s, output_error)
