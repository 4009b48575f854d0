"""The state machine (`controller.transitions`) rendered as SQL.

A transition becomes ONE guarded UPDATE of `tasks`: the guard is `status IN (the
transition's sources)`, the SET clause is the transition's effects (worker, lease,
timestamps, attempt, queue place) plus the history line appended to `tasks.history`.
Values are bind parameters named `v_<column>`, so each transition compiles to one
statement text that SQLAlchemy's compiled cache (and the database's prepared statements)
reuse.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa

from controller.models import DEFAULT_LEASE_S
from controller.store.schema import history_line, tasks
from controller.transitions import Count, Stamp, Transition

T = tasks
_TIMESTAMPS = ("queued_at", "started_at", "finished_at")


def status_columns(
    step: Transition,
    reason: str,
    message: str,
    *,
    worker_id: str | None = None,
    lease_s: float | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """The values of the columns `step` sets, by column name (see `set_clause`).

    `history` is the line to append to the history column. A worker and lease are only
    set when the transition sets them and a worker is named (a local script's own start
    has none)."""
    now = time.time() if now is None else now
    target = step.target.value
    values: dict[str, Any] = dict(
        status=target, status_reason=reason, status_message=message, updated_at=now,
        history=history_line(target, reason, message, now),
    )
    effects = step.effects
    for column in _TIMESTAMPS:
        stamp = getattr(effects, column)
        if stamp is not Stamp.keep:
            values[column] = now if stamp is Stamp.set else None
    if effects.worker is Stamp.clear:
        values["worker"] = None
    elif effects.worker is Stamp.set and worker_id:
        values["worker"] = worker_id
    if effects.lease is Stamp.clear:
        values["lease_expires_at"] = None
    elif effects.lease is Stamp.set and worker_id:
        values["lease_expires_at"] = now + (lease_s or DEFAULT_LEASE_S)
    if effects.attempt is Count.zero:
        values["attempt"] = 0
    if effects.clears_outputs:
        values["log_lines"] = 0
    return values


def set_clause(step: Transition, keys: Iterable[str]) -> dict[str, Any]:
    """UPDATE values for the columns `keys`, each from the bind parameter `v_<key>`;
    `history` appends its parameter to the column instead of replacing it, and the
    attempt counter counts up where the transition says so."""
    values: dict[str, Any] = {}
    for key in keys:
        param = sa.bindparam(f"v_{key}", type_=sa.Text if key == "history" else None)
        values[key] = T.c.history + param if key == "history" else param
    if step.effects.attempt is Count.increment:
        values["attempt"] = T.c.attempt + sa.literal_column("1")
    return values


def status_in(statuses: Iterable[Any]) -> sa.ColumnElement[bool]:
    """`status IN (...)` with the statuses as literals (our own constants), so the
    statement text is fixed and partial-index predicates match."""
    literals = [sa.literal_column(f"'{_identifier(s)}'") for s in sorted(str(getattr(s, "value", s)) for s in statuses)]
    return T.c.status == literals[0] if len(literals) == 1 else T.c.status.in_(literals)


def guard(step: Transition) -> sa.ColumnElement[bool]:
    """The status rule of `step`: the task is in one of its sources."""
    return status_in(step.sources)


def _identifier(value: str) -> str:
    if not value.isidentifier():
        raise ValueError(f"not a status constant: {value!r}")
    return value
