"""Durable final reports: what a task's end must tell the control plane, kept on disk until told.

A task's final report (status, reason, message, runtime figures such as the exit code,
and the log lines not yet delivered) is written to the outbox before it is sent, one
small JSON file per task under `CONVEYOR_HOME/outbox/<worker id>/<task id>.json`
(temp file, fsync, `os.replace`, fsync of the directory), then delivered:

1. all log chunks but the last (rare: a report has several chunks only when the step's
   last output was large or the control plane was unreachable for a while), oldest
   first, with `append_log`, each with the batch id it got when it was formed
   (`form_chunks`): the store appends a chunk once however often it is sent, so a chunk
   stored by a server that died before it answered is not doubled by the retry; once
   acknowledged the entry is rewritten without the chunk;
2. the rest in ONE store operation (`finish_task`: one HTTP request, one transaction):
   the last chunk with its batch id, the runtime figures (merged into the task's
   runtime) and the status, as the worker that holds the task (`worker_id`). It is
   written all or nothing: a refused status change stores neither the lines nor the
   runtime; the lines are then appended alone (`append_log`, by their batch ids), so a
   late report (the task was failed as lost meanwhile) still leaves the step's last
   output in the log.

Every report has a last chunk, empty if no line was left (`FinalReport` adds one, also
to an entry an older agent wrote without any), so every final report carries a batch
id: a retry of a report that the store applied before its answer was lost finds that
batch id stored and the task already in the reported status, and is acknowledged
without writing anything again. (The empty chunk of an older entry gets its id when the
entry is read: a replay in a later start after a lost answer is refused as a second
report of a finished status would be, and dropped, having been stored.) Chunks stay as
they were formed; they are not merged into the final call, since each was sized to fit
one call (`agent.output.chunk_batch`) and the store deduplicates by one batch id per
call.

Delivery retries with backoff (0.5 s doubling to 5 s) while the control plane is
unreachable (`BackendUnavailableError`, or any error that is not a Conveyor answer);
an answer that refuses the report (illegal transition, task not found, held by another
worker, invalid) drops the entry with a log line: retrying cannot change it. The
entry's file is removed once the report is acknowledged or refused; a daemon that
restarts with the same worker id and CONVEYOR_HOME replays what is left (`pending`).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from agent.output import chunk_batch
from controller.backend import Backend
from controller.errors import BackendUnavailableError, ConflictError, ConveyorError
from controller.models import TaskStatus

log = logging.getLogger(__name__)

#: First and longest wait between two delivery attempts.
FIRST_RETRY_S = 0.5
MAX_RETRY_S = 5.0


def form_chunks(lines: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Split log lines into the chunks they will be sent in, `{"batch_id", "lines"}`.

    Each chunk gets its batch id (uuid4 hex) here, once: every retry sends the same
    lines with the same id, so the store appends the chunk once.
    """
    return [
        {"batch_id": uuid.uuid4().hex, "lines": chunk}
        for chunk in chunk_batch([dict(line) for line in lines])
    ]


@dataclass
class FinalReport:
    """One task's final report as stored in the outbox."""

    task_id: str
    worker_id: str
    status: str
    reason: str
    message: str
    runtime: dict[str, Any] = field(default_factory=dict)
    #: Undelivered log chunks, oldest first: `{"batch_id": str, "lines": [...]}`; at
    #: least one (the last goes with the status: its batch id identifies the report).
    log_chunks: list[dict[str, Any]] = field(default_factory=list)
    written_at: float = field(default_factory=time.time)
    #: Unchunked lines of an entry written by an older agent (chunked when read).
    log_lines: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.log_lines:
            self.log_chunks = [*self.log_chunks, *form_chunks(self.log_lines)]
            self.log_lines = []
        if not self.log_chunks:  # the final call's batch id: a retry is recognised by it
            self.log_chunks = [{"batch_id": uuid.uuid4().hex, "lines": []}]


def outbox_dir(home: Path, worker_id: str) -> Path:
    """The outbox of one worker id under CONVEYOR_HOME."""
    return home / "outbox" / quote(worker_id, safe="")


def write_atomically(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so a crash leaves the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class Outbox:
    """The final reports one worker has not delivered yet (files under `outbox_dir`)."""

    def __init__(self, home: Path, worker_id: str) -> None:
        self.path = outbox_dir(home, worker_id)
        self._lock = threading.Lock()

    def _file(self, task_id: str) -> Path:
        return self.path / f"{quote(task_id, safe='')}.json"

    def save(self, report: FinalReport) -> None:
        """Write (or rewrite) a task's report durably."""
        data = json.dumps(asdict(report), separators=(",", ":")).encode()
        with self._lock:
            write_atomically(self._file(report.task_id), data)

    def remove(self, task_id: str) -> None:
        """Forget a task's report (delivered or refused)."""
        with self._lock:
            self._file(task_id).unlink(missing_ok=True)

    def pending(self) -> list[FinalReport]:
        """Reports still to deliver, oldest first (unreadable files are logged and dropped)."""
        reports = []
        for path in sorted(self.path.glob("*.json")):
            try:
                reports.append(FinalReport(**json.loads(path.read_bytes())))
            except (OSError, ValueError, TypeError) as exc:
                log.error("dropping unreadable outbox entry %s: %s: %s", path, type(exc).__name__, exc)
                path.unlink(missing_ok=True)
        reports.sort(key=lambda r: r.written_at)
        return reports

    def deliver(
        self, backend: Backend, report: FinalReport, give_up: Callable[[], bool] = lambda: False
    ) -> TaskStatus | None:
        """Send `report` until acknowledged or refused; the status reported, else None.

        Retries with backoff while the control plane is unreachable; returns None
        without removing the entry when `give_up()` turns true (a later start replays it).
        """
        wait_s = FIRST_RETRY_S
        while True:
            try:
                return self._send(backend, report)
            except ConveyorError as exc:
                if not isinstance(exc, BackendUnavailableError):
                    log.warning("task %s: report %s refused, dropped: %s: %s",
                                report.task_id, report.status, type(exc).__name__, exc)
                    if isinstance(exc, ConflictError):  # (IllegalTransitionError is one)
                        self._keep_lines_of_refused(backend, report)
                    self.remove(report.task_id)
                    return None
                error = exc
            except Exception as exc:  # noqa: BLE001 - e.g. a raw database error: retry
                error = exc
            if give_up():
                log.warning("task %s: report %s still pending (kept in %s): %s: %s",
                            report.task_id, report.status, self.path, type(error).__name__, error)
                return None
            log.warning("task %s: cannot deliver report %s yet (retrying in %.1f s): %s: %s",
                        report.task_id, report.status, wait_s, type(error).__name__, error)
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and not give_up():
                time.sleep(min(0.1, wait_s))
            wait_s = min(wait_s * 2, MAX_RETRY_S)

    @staticmethod
    def _keep_lines_of_refused(backend: Backend, report: FinalReport) -> None:
        """A late report's status was refused (the task was failed as lost meanwhile, or
        another run holds it): its last lines still go into the task's log, as the
        step printed them (each chunk once, by its batch id). One attempt each."""
        for chunk in report.log_chunks:
            if not chunk["lines"]:
                continue
            try:
                backend.append_log(report.task_id, chunk["lines"], batch_id=chunk["batch_id"])
            except Exception as exc:  # noqa: BLE001 - the report is dropped either way
                log.warning("task %s: cannot keep the refused report's log lines: %s: %s",
                            report.task_id, type(exc).__name__, exc)
                return

    def _send(self, backend: Backend, report: FinalReport) -> TaskStatus:
        while len(report.log_chunks) > 1:
            chunk = report.log_chunks[0]
            backend.append_log(report.task_id, chunk["lines"], batch_id=chunk["batch_id"])
            report.log_chunks = report.log_chunks[1:]
            try:
                self.save(report)  # a retry need not send this chunk again
            except OSError as exc:
                log.error("task %s: cannot update %s: %s", report.task_id, self.path, exc)
        last = report.log_chunks[0]
        status = TaskStatus(report.status)
        backend.finish_task(report.task_id, status, reason=report.reason, message=report.message,
                            worker_id=report.worker_id, runtime=report.runtime or None,
                            log_lines=last["lines"], log_batch_id=last["batch_id"])
        self.remove(report.task_id)
        log.info("task %s: report %s delivered", report.task_id, report.status)
        return status


def make_report(
    task_id: str,
    worker_id: str,
    status: TaskStatus,
    reason: str,
    message: str,
    runtime: Mapping[str, Any] | None = None,
    log_chunks: Sequence[Mapping[str, Any]] = (),
) -> FinalReport:
    """A FinalReport from the executor's figures; `log_chunks` as `form_chunks` made them."""
    return FinalReport(task_id=task_id, worker_id=worker_id, status=status.value, reason=reason,
                       message=message, runtime=dict(runtime or {}),
                       log_chunks=[{"batch_id": c["batch_id"], "lines": [dict(x) for x in c["lines"]]}
                                   for c in log_chunks])
