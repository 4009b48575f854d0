"""Logs and scalars of tasks."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from controller.backend import check_log_batch_id
from controller.errors import (
    InvalidInputError,
    NotFoundError,
)
from controller.models import (
    MAX_INT64,
    MAX_LOG_LINES_PER_CALL,
    LogLine,
    Scalar,
)
from controller.store import schema
from controller.store.core import StoreCore
from controller.store.records import validate

T = schema.tasks
B = schema.log_batches


class LogOperations(StoreCore):
    """A task's log lines and reported scalars."""

    def append_log(
        self,
        task_id: str,
        lines: Sequence[LogLine | Mapping[str, Any] | str],
        *,
        batch_id: str | None = None,
    ) -> int:
        """Append lines to a task's log; returns the log's new length in lines.

        With `batch_id`, a chunk already appended under that id appends nothing and
        returns the current length (see `Backend.append_log`).
        """
        parsed = parse_log_lines(lines, batch_id)
        with self._write() as conn:
            return write_log_lines(conn, task_id, parsed, batch_id).length

    def get_log(
        self, task_id: str, *, offset: int = 0, limit: int | None = None, tail: int | None = None
    ) -> list[LogLine]:
        """Lines from line number `offset` on (at most `limit`), or the last `tail` lines."""
        L = schema.log_lines
        for name, value in (("offset", offset), ("limit", limit), ("tail", tail)):
            if value is not None and not (isinstance(value, int) and 0 <= value <= MAX_INT64):
                raise InvalidInputError(f"{name} must be an integer >= 0, got {value!r}", field=name)
        with self._read() as conn:
            total = conn.execute(sa.select(T.c.log_lines).where(T.c.id == task_id)).scalar()
            if total is None:
                raise NotFoundError(f"no task with id {task_id!r}", field="task_id")
            if tail is not None:
                offset = max(offset, total - tail)
            query = sa.select(L).where(L.c.task_id == task_id, L.c.n >= offset).order_by(L.c.n)
            if limit is not None:
                query = query.limit(limit)
            return [
                LogLine(line=r.line, stream=r.stream, timestamp=r.timestamp, n=r.n)
                for r in conn.execute(query)
            ]

    def report_scalars(self, task_id: str, scalars: Sequence[Scalar | Mapping[str, Any]]) -> None:
        """Record scalar values (title, series, iteration, value)."""
        if not isinstance(scalars, Sequence):
            raise InvalidInputError("scalars must be a list", field="scalars")
        now = time.time()
        parsed = [validate(Scalar, s, what=f"scalars.{i}") for i, s in enumerate(scalars)]
        with self._write() as conn:
            self._row(conn, task_id)
            if parsed:
                conn.execute(
                    schema.scalars.insert(),
                    [dict(task_id=task_id, title=s.title, series=s.series, iteration=s.iteration,
                          value=None if math.isnan(s.value) else s.value,  # SQL stores NaN as NULL
                          timestamp=s.timestamp or now) for s in parsed],
                )

    def get_scalars(
        self, task_id: str, *, title: str | None = None, series: str | None = None
    ) -> list[Scalar]:
        """Scalars of a task, ordered by title, series, iteration."""
        S = schema.scalars
        query = sa.select(S).where(S.c.task_id == task_id)
        if title is not None:
            query = query.where(S.c.title == title)
        if series is not None:
            query = query.where(S.c.series == series)
        query = query.order_by(S.c.title, S.c.series, S.c.iteration, S.c.id)
        with self._read() as conn:
            self._row(conn, task_id)
            return [
                Scalar(title=r.title, series=r.series, iteration=r.iteration,
                       value=math.nan if r.value is None else r.value, timestamp=r.timestamp)
                for r in conn.execute(query)
            ]


def parse_log_lines(
    lines: Any,
    batch_id: str | None,
    *,
    lines_field: str = "lines",
    batch_field: str = "batch_id",
) -> list[LogLine]:
    """Check the input of a log append (at most MAX_LOG_LINES_PER_CALL lines, a usable
    batch id) and parse the lines; InvalidInputError naming `lines_field` (line by line:
    `lines.3.line`) or `batch_field` otherwise. Done before any transaction starts."""
    if isinstance(lines, str | bytes) or not isinstance(lines, Sequence):
        raise InvalidInputError(f"{lines_field} must be a list", field=lines_field)
    if len(lines) > MAX_LOG_LINES_PER_CALL:
        raise InvalidInputError(
            f"at most {MAX_LOG_LINES_PER_CALL} log lines per call, got {len(lines)}",
            field=lines_field,
        )
    if batch_id is not None:
        try:
            check_log_batch_id(batch_id)
        except ValueError as exc:
            raise InvalidInputError(str(exc), field=batch_field) from exc
    return [
        validate(LogLine, {"line": item} if isinstance(item, str) else item, what=f"{lines_field}.{i}")
        for i, item in enumerate(lines)
    ]


@dataclass(frozen=True)
class LogAppend:
    """What `write_log_lines` did: the log's length after it, and whether it appended
    (False: the batch id was stored already, so the chunk was not appended again)."""

    length: int
    appended: bool


def write_log_lines(
    conn: sa.Connection, task_id: str, parsed: Sequence[LogLine], batch_id: str | None
) -> LogAppend:
    """Append `parsed` to a task's log inside the write transaction `conn` (the one
    place that does): with `batch_id`, a chunk already stored under that id appends
    nothing. NotFoundError if the task does not exist."""
    now = time.time()
    if batch_id is not None:
        # Lock the task's row first (SQLite: the write transaction already
        # serializes writers), so the check and the insert of the batch id cannot
        # race a concurrent append of the same chunk.
        length = conn.execute(
            sa.select(T.c.log_lines).where(T.c.id == task_id).with_for_update()
        ).scalar()
        if length is None:
            raise NotFoundError(f"no task with id {task_id!r}", field="task_id")
        seen = conn.execute(
            sa.select(B.c.batch_id).where(B.c.task_id == task_id, B.c.batch_id == batch_id)
        ).first()
        if seen is not None:
            return LogAppend(int(length), appended=False)
        conn.execute(B.insert().values(task_id=task_id, batch_id=batch_id))
    total = conn.execute(
        T.update()
        .where(T.c.id == task_id)
        .values(log_lines=T.c.log_lines + len(parsed))
        .returning(T.c.log_lines)
    ).scalar()
    if total is None:
        raise NotFoundError(f"no task with id {task_id!r}", field="task_id")
    if parsed:
        first = total - len(parsed)
        conn.execute(
            schema.log_lines.insert(),
            [
                dict(
                    task_id=task_id,
                    n=first + i,
                    timestamp=item.timestamp or now,
                    stream=item.stream[:16],
                    line=item.line,
                )
                for i, item in enumerate(parsed)
            ],
        )
    return LogAppend(int(total), appended=True)
