"""The status of a task started by `Task.init` outside an agent follows its process.

Decisions:

- The task is in_progress while the script runs. When the interpreter exits normally
  (atexit) it is marked completed, after the Logger's last flush. An uncaught exception
  (sys.excepthook) marks it failed with `Type: message` as status_message and the
  traceback appended to the task's log (stream "stderr"); KeyboardInterrupt and SIGTERM
  mark it stopped (reason "aborted").
- `sys.exit(code)` with a non-zero code (or a message) marks it failed: atexit handlers
  are not told the exit code, so `watch` wraps `sys.exit` to remember it. A bare
  `raise SystemExit(code)` or `os._exit` is not seen (the first counts as completed).
- A SIGTERM handler is only installed when the script has none of its own (and only
  from the main thread); after recording the status it re-raises the signal, so the
  process still ends the way the sender asked. SIGKILL cannot be seen: such a task stays
  in_progress until someone stops it.
- Under an agent none of this is installed: the agent reports the status it observed.
  What is installed there is `freeze_at_exit`: a step's process skips the interpreter's
  final garbage collections, which cost a short step more CPU than its own work.
- The process's stdout/stderr are not captured into the task log outside an agent
  (under an agent they are, by the agent).
"""

from __future__ import annotations

import atexit
import gc
import os
import signal
import sys
import threading
import traceback
from types import TracebackType
from typing import TYPE_CHECKING

from controller.errors import ConveyorError
from controller.models import StatusReason, TaskStatus

if TYPE_CHECKING:
    from controller.sdk.task import Task

_lock = threading.Lock()
_task: Task | None = None
_settled = False
_previous_excepthook = sys.excepthook
_exit_code: object = None
_original_exit = sys.exit
_freeze_registered = False


def _recording_exit(code: object = None) -> None:
    """sys.exit that remembers its code for the exit handler."""
    global _exit_code
    _exit_code = code
    _original_exit(code)


def watch(task: Task) -> None:
    """Tie `task`'s status to this process (see the module docstring)."""
    global _task, _settled, _previous_excepthook
    with _lock:
        _task, _settled = task, False
    atexit.register(_at_exit)
    sys.exit = _recording_exit
    _previous_excepthook = sys.excepthook
    sys.excepthook = _excepthook
    if threading.current_thread() is threading.main_thread():
        try:
            if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
                signal.signal(signal.SIGTERM, _on_sigterm)
        except (ValueError, OSError):  # not allowed here: leave signals alone
            pass


def freeze_at_exit() -> None:
    """At exit, after the exit handlers registered from now on (the Logger's last flush
    among them), move every object alive into the garbage collector's permanent
    generation (`gc.freeze`), so the interpreter's final collections do not walk them.

    With pydantic and SQLAlchemy loaded those collections take ~200 ms of CPU per
    process, more than a short step's own work. Objects are still released when the
    modules holding them are cleared, and exit handlers registered earlier still run
    (after the freeze); only objects kept alive by reference cycles are left to the
    operating system, as Python already allows at exit. Registered once per process.
    """
    global _freeze_registered
    with _lock:
        if _freeze_registered:
            return
        _freeze_registered = True
    atexit.register(gc.freeze)


def ends_without_teardown() -> None:
    """This process ends with `os._exit` right after its exit handlers (a step forked by
    an agent's fork server, `agent.forkserver`): there are no final collections to skip,
    so `freeze_at_exit` does nothing here (it would hide the step's own objects from the
    fork server's last flush of the files the step left open)."""
    global _freeze_registered
    with _lock:
        _freeze_registered = True


def settle() -> None:
    """The task's status is decided elsewhere (execute_remotely, close, mark_*)."""
    global _settled
    with _lock:
        _settled = True


def is_watched(task: Task) -> bool:
    """True if `task` is the one this process's exit will report."""
    return _task is not None and _task.id == task.id and not _settled


def finish(status: TaskStatus, reason: str, message: str) -> None:
    """Flush the task's reports and set its final status, once."""
    global _settled
    with _lock:
        if _settled or _task is None:
            return
        _settled = True
        task = _task
    try:
        task.get_logger().flush()
    except Exception as exc:  # noqa: BLE001 - still try to report the status
        print(f"conveyor: could not flush the reports of task {task.id}: {exc}", file=sys.stderr)
    try:
        task._backend.set_status(task.id, status, reason=reason, message=message)
    except ConveyorError as exc:
        print(f"conveyor: could not mark task {task.id} {status.value}: {exc}", file=sys.stderr)


def _at_exit() -> None:
    code = _exit_code
    if code is None or code == 0:
        finish(TaskStatus.completed, StatusReason.completed, "the script finished")
    elif isinstance(code, int):
        finish(TaskStatus.failed, StatusReason.exit_code, f"the script exited with code {code}")
    else:
        finish(TaskStatus.failed, StatusReason.exit_code, f"the script exited: {code}"[:2000])


def _excepthook(
    exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
) -> None:
    try:
        if _task is not None and not _settled:
            lines = "".join(traceback.format_exception(exc_type, exc, tb)).splitlines()
            try:
                _task._backend.append_log(_task.id, [{"line": line, "stream": "stderr"} for line in lines])
            except ConveyorError:
                pass
            if issubclass(exc_type, KeyboardInterrupt):
                finish(TaskStatus.stopped, StatusReason.aborted, "interrupted (KeyboardInterrupt)")
            else:
                message = f"{exc_type.__name__}: {exc}".strip()
                finish(TaskStatus.failed, StatusReason.exception, message[:2000])
    finally:
        _previous_excepthook(exc_type, exc, tb)


def _on_sigterm(signum: int, frame: object) -> None:
    finish(TaskStatus.stopped, StatusReason.aborted, "terminated by SIGTERM")
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)
