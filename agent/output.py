"""A step's output as log lines: split byte streams into lines, deliver them in batches.

Used by both ways a step runs: the host supervisor (`agent.supervisor`, reading pipes)
and containers (`agent.environments.docker`, reading the engine's attach stream).

Decisions:

- **Lines.** Bytes are decoded incrementally as UTF-8 (bad bytes → U+FFFD). `\\n`,
  `\\r\\n` and a lone `\\r` end a line; a line longer than `max_line_chars` (1 MiB, the
  store's limit) is cut into chunks. Carriage-return progress bars: a `\\r`-terminated
  line that is still waiting for delivery is *replaced* by the next line of the same
  stream, so a tqdm bar yields at most one update per delivery interval instead of
  hundreds, and the final state (the `\\n`-terminated line) is always kept. Empty
  `\\r`-terminated segments are dropped. A partial line without a terminator is
  delivered when the stream ends.
- **Delivery.** A delivery thread calls `on_output(batch)` every `flush_interval_s`
  (0.25 s), in batches of at most 10,000 lines and ~4 MiB, with dicts `{"line",
  "stream", "timestamp"}` (fields of `controller.models.LogLine`). The lines still
  pending once the streams ended may go to another callback (`on_final_output`: the
  agent keeps them for the task's final report instead of one more store write). A failing or slow
  callback never delays the time limit or aborts (the supervising thread does those);
  an exception is remembered and reported once the step ends. If the callback falls
  far behind (`max_pending_chars`), readers pause (`wait_for_room`), so the step
  blocks on a full pipe instead of the agent's memory growing without bound.
"""

from __future__ import annotations

import codecs
import re
import threading
import time
from collections.abc import Callable
from typing import Any

from controller.models import MAX_LOG_LINE_CHARS, MAX_LOG_LINES_PER_CALL

OutputCallback = Callable[[list[dict[str, Any]]], None]

#: Characters handed to one on_output call (one line may exceed it alone).
MAX_CALL_CHARS = 4 * 1024 * 1024
DEFAULT_FLUSH_INTERVAL_S = 0.25
DEFAULT_MAX_PENDING_CHARS = 64 * 1024 * 1024
_LINE_END_RE = re.compile(r"\r\n|\n|\r")


class PendingLines:
    """Lines waiting for delivery, shared by readers and the delivery thread."""

    def __init__(self, max_pending_chars: int):
        self.cond = threading.Condition()
        self.pending: list[dict[str, Any] | None] = []  # None: a superseded \r line
        self.pending_chars = 0
        self.max_pending_chars = max_pending_chars
        self._cr_index: dict[str, int] = {}  # stream → index of its undelivered \r line

    def add(self, stream: str, text: str, cr_terminated: bool) -> None:
        """Queue one line of `stream` (a `\\r`-terminated one may be superseded)."""
        if cr_terminated and not text:
            return
        entry = {"line": text, "stream": stream, "timestamp": time.time()}
        with self.cond:
            index = self._cr_index.pop(stream, None)
            if index is not None:  # a progress update superseded before delivery
                superseded = self.pending[index]
                self.pending_chars -= len(superseded["line"]) if superseded else 0
                self.pending[index] = None
            if cr_terminated:
                self._cr_index[stream] = len(self.pending)
            self.pending.append(entry)
            self.pending_chars += len(text)

    def take(self) -> list[dict[str, Any]]:
        """Everything pending, in order; the queue is empty afterwards."""
        with self.cond:
            batch, self.pending, self.pending_chars = self.pending, [], 0
            self._cr_index.clear()
            self.cond.notify_all()
        return [entry for entry in batch if entry is not None]

    def wait_for_room(self, stop: threading.Event) -> None:
        """Block a reader while too much is pending (until delivered or `stop`)."""
        with self.cond:
            while self.pending_chars > self.max_pending_chars and not stop.is_set():
                self.cond.wait(0.1)


class StreamSplitter:
    """Turns one stream's bytes into lines (see the module docstring)."""

    def __init__(self, name: str, output: PendingLines, max_line_chars: int):
        self.name = name
        self.output = output
        self.max_line_chars = max_line_chars
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.rest = ""

    def feed(self, data: bytes, final: bool = False) -> None:
        """Add bytes; `final=True` flushes a last line without a terminator."""
        buf = self.rest + self.decoder.decode(data, final=final)
        start = 0
        for match in _LINE_END_RE.finditer(buf):
            if match.group() == "\r" and match.end() == len(buf) and not final:
                break  # maybe the first half of \r\n
            self._emit(buf[start : match.start()], match.group() == "\r")
            start = match.end()
        rest = buf[start:]
        while len(rest) > self.max_line_chars:
            self.output.add(self.name, rest[: self.max_line_chars], False)
            rest = rest[self.max_line_chars :]
        if final and rest:
            self._emit(rest, False)
            rest = ""
        self.rest = rest

    def _emit(self, text: str, cr: bool) -> None:
        while len(text) > self.max_line_chars:
            self.output.add(self.name, text[: self.max_line_chars], False)
            text = text[self.max_line_chars :]
        self.output.add(self.name, text, cr)


def chunk_batch(batch: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Split a batch into calls of at most 10,000 lines and about MAX_CALL_CHARS."""
    chunks: list[list[dict[str, Any]]] = []
    current: list[dict[str, Any]] = []
    chars = 0
    for entry in batch:
        if current and (
            len(current) >= MAX_LOG_LINES_PER_CALL or chars + len(entry["line"]) > MAX_CALL_CHARS
        ):
            chunks.append(current)
            current, chars = [], 0
        current.append(entry)
        chars += len(entry["line"])
    if current:
        chunks.append(current)
    return chunks


def deliver_batches(
    output: PendingLines,
    on_output: OutputCallback,
    interval_s: float,
    readers_done: threading.Event,
    errors: list[str],
    on_final_output: OutputCallback | None = None,
) -> None:
    """Delivery thread: hand batches to `on_output` until readers are done and drained;
    what is taken once they are done goes to `on_final_output` when given."""
    while True:
        finished = readers_done.wait(interval_s)
        deliver = on_final_output if finished and on_final_output is not None else on_output
        for chunk in chunk_batch(output.take()):
            try:
                deliver(chunk)
            except Exception as exc:  # keep the step running; report at the end
                errors.append(f"{type(exc).__name__}: {exc}")
        if finished and not output.pending:
            return


class OutputPump:
    """Bytes of named streams in, batches of log lines out (on a delivery thread).

    `feed(stream, data)` from one reader thread; `close()` once the streams ended
    flushes partial lines, waits for the last delivery and returns the first callback
    error (None if every delivery worked).
    """

    def __init__(
        self,
        on_output: OutputCallback,
        *,
        flush_interval_s: float = DEFAULT_FLUSH_INTERVAL_S,
        max_line_chars: int = MAX_LOG_LINE_CHARS,
        max_pending_chars: int = DEFAULT_MAX_PENDING_CHARS,
    ) -> None:
        self.lines = PendingLines(max_pending_chars)
        self._max_line_chars = max_line_chars
        self._splitters: dict[str, StreamSplitter] = {}
        self._done = threading.Event()
        self._stop = threading.Event()
        self._errors: list[str] = []
        self._thread = threading.Thread(
            target=deliver_batches,
            args=(self.lines, on_output, flush_interval_s, self._done, self._errors),
            name="output-delivery",
            daemon=True,
        )
        self._thread.start()

    def feed(self, stream: str, data: bytes) -> None:
        """Add bytes of `stream`; blocks while delivery is far behind."""
        splitter = self._splitters.get(stream)
        if splitter is None:
            splitter = self._splitters[stream] = StreamSplitter(
                stream, self.lines, self._max_line_chars
            )
        splitter.feed(data)
        self.lines.wait_for_room(self._stop)

    def close(self, timeout_s: float = 30.0) -> str | None:
        """Flush, deliver what is left, stop the thread; the first delivery error."""
        self._stop.set()
        for splitter in self._splitters.values():
            splitter.feed(b"", final=True)
        self._done.set()
        self._thread.join(timeout_s)
        return self._errors[0] if self._errors else None
