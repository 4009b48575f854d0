"""Logger: scalars, text and tables a step reports on its task.

Decisions:

- Scalars and text lines are buffered and sent in batches by one background thread,
  at least every `FLUSH_INTERVAL_S` seconds, on `flush()` and when the process exits
  (before a local `Task.init` task is marked completed), so a loop reporting every
  iteration costs no round trip per value. Scalars are read back with
  `backend.get_scalars(task_id)` (or `controller tasks show`).
- `report_text` lines go to the task's log with stream "logger". Outside an agent they
  are printed too; under an agent they are not (the agent already sends the step's
  stdout to the same log, the line would appear twice).
- `report_table` stores the table as an artifact named `table: <title> - <series>`:
  a DataFrame as a pandas artifact (`.get()` returns it), a list of rows or a local csv
  file as a .csv file artifact, a `url` as a link. Title, series and iteration are in
  the artifact's metadata; a later report of the same title and series replaces it.
- A report that cannot be sent (store unreachable) is kept and retried at the next
  flush, up to `MAX_PENDING` items; beyond that the oldest are dropped. A report the
  store refuses (e.g. a title over 256 characters) is dropped with a warning.
"""

from __future__ import annotations

import atexit
import csv as csv_module
import logging
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controller.errors import BackendUnavailableError, ConveyorError

if TYPE_CHECKING:
    from controller.sdk.task import Task

#: Longest a reported value waits in the buffer, in seconds.
FLUSH_INTERVAL_S = 1.0
#: Most buffered reports kept while the store cannot be reached.
MAX_PENDING = 100_000
LOG_STREAM = "logger"

_loggers: dict[str, Logger] = {}
_registry_lock = threading.Lock()
_atexit_registered = False


def flush_all() -> None:
    """Flush every Logger of this process (run at exit)."""
    for logger in list(_loggers.values()):
        logger.flush()


class Logger:
    """Reports scalars, text and tables to one task (get it with `task.get_logger()`)."""

    def __init__(self, task: Task) -> None:
        """Use `task.get_logger()` or `Logger.current_logger()` rather than this."""
        self._task = task
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()  # one flush at a time keeps the log in order
        self._scalars: list[dict[str, Any]] = []
        self._lines: list[dict[str, Any]] = []
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned = False

    @classmethod
    def _for_task(cls, task: Task) -> Logger:
        global _atexit_registered
        with _registry_lock:
            logger = _loggers.get(task.id)
            if logger is None:
                logger = cls(task)
                _loggers[task.id] = logger
            if not _atexit_registered:
                atexit.register(flush_all)
                _atexit_registered = True
            return logger

    @classmethod
    def current_logger(cls) -> Logger:
        """The Logger of the current task (`Task.current_task()`).

        Raises RuntimeError when there is none: call `Task.init()` first, or run under
        an agent (which makes the task it runs current).
        """
        from controller.sdk.task import Task

        task = Task.current_task()
        if task is None:
            raise RuntimeError("no current task: call Task.init() first (or run the code under an agent)")
        return task.get_logger()

    # ------------------------------------------------------------------ reports
    def report_scalar(self, title: str, series: str, value: float, iteration: int) -> None:
        """Record `value` of the series `title`/`series` at `iteration` (NaN and ±inf kept).

        Raises ValueError at once for an empty title or series, or a value that is not a number.
        """
        if not title or not series:
            raise ValueError(f"report_scalar: title and series must not be empty (got {title!r}, {series!r})")
        entry = {"title": str(title), "series": str(series), "iteration": int(iteration),
                 "value": float(value), "timestamp": time.time()}
        with self._lock:
            self._scalars.append(entry)
        self._start()

    def report_single_value(self, name: str, value: float) -> None:
        """Record a single summary value (title "Summary", series `name`, iteration 0)."""
        self.report_scalar("Summary", name, value, 0)

    def report_text(self, msg: str, level: int = logging.INFO, print_console: bool = True) -> None:
        """Add `msg` to the task's log (stream "logger"); printed too outside an agent."""
        text = str(msg)
        if print_console and not self._task.running_remotely():
            print(text, flush=True)
        now = time.time()
        with self._lock:
            self._lines.extend(
                {"line": line, "stream": LOG_STREAM, "timestamp": now} for line in text.splitlines() or [""]
            )
        self._start()

    def report_table(
        self,
        title: str,
        series: str,
        iteration: int | None = None,
        table_plot: Any = None,
        csv: str | None = None,
        url: str | None = None,
        extra_layout: dict | None = None,
    ) -> None:
        """Store a table (a DataFrame, a list of rows, a local csv file or a csv URL).

        See the module docstring for where it goes; `extra_layout` is not used.
        """
        name = f"table: {title} - {series}".replace("/", "_").replace("\\", "_")
        metadata = {"title": title, "series": series, "iteration": iteration}
        if table_plot is not None and type(table_plot).__name__ == "DataFrame":
            self._task.upload_artifact(name, table_plot, metadata=metadata)
        elif table_plot is not None:
            rows = list(table_plot)
            with tempfile.TemporaryDirectory(prefix="conveyor-table-") as tmp:
                path = Path(tmp) / f"{_file_stem(title)}-{_file_stem(series)}.csv"
                with open(path, "w", newline="", encoding="utf-8") as f:
                    csv_module.writer(f).writerows(rows)
                self._task.upload_artifact(name, str(path), metadata=metadata)
        elif csv is not None:
            self._task.upload_artifact(name, Path(csv), metadata=metadata)
        elif url is not None:
            self._task.upload_artifact(name, url, metadata=metadata)
        else:
            raise ValueError(f"report_table({title!r}, {series!r}): give table_plot, csv or url")

    # -------------------------------------------------------------------- flush
    def flush(self, wait: bool = True) -> bool:
        """Send everything buffered now. True if nothing is left unsent."""
        with self._send_lock:
            return self._flush_locked()

    def _flush_locked(self) -> bool:
        with self._lock:
            scalars, self._scalars = self._scalars, []
            lines, self._lines = self._lines, []
        backend, task_id = self._task._backend, self._task.id
        ok = True
        for batch, send in ((lines, backend.append_log), (scalars, backend.report_scalars)):
            for start in range(0, len(batch), 5000):
                chunk = batch[start : start + 5000]
                try:
                    send(task_id, chunk)
                except BackendUnavailableError as exc:  # retried at the next flush
                    ok = False
                    self._keep(chunk, batch is scalars, exc)
                except ConveyorError as exc:  # refused: sending it again would not help
                    ok = False
                    print(f"conveyor: {len(chunk)} report(s) of task {task_id} refused: {exc}",
                          file=sys.stderr)
        return ok

    def _keep(self, chunk: list[dict[str, Any]], is_scalars: bool, exc: Exception) -> None:
        if not self._warned:
            self._warned = True
            print(f"conveyor: cannot send reports of task {self._task.id} yet (will retry): {exc}",
                  file=sys.stderr)
        with self._lock:
            target = self._scalars if is_scalars else self._lines
            target[:0] = chunk
            if len(target) > MAX_PENDING:
                del target[: len(target) - MAX_PENDING]

    def _start(self) -> None:
        if self._thread is not None:
            return
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(
                target=self._run, name=f"conveyor-logger-{self._task.id[:8]}", daemon=True
            )
            self._thread.start()

    def _run(self) -> None:
        while True:
            self._wake.wait(FLUSH_INTERVAL_S)
            self._wake.clear()
            try:
                self.flush()
            except Exception as exc:  # noqa: BLE001 - the reporter thread must not die
                print(f"conveyor: logger flush failed: {exc!r}", file=sys.stderr)


def _file_stem(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(text))[:60] or "table"

