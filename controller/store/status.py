"""The columns a status change writes, and the status rules turned around for SQL."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa

from controller.models import DEFAULT_LEASE_S, LEGAL_TRANSITIONS, TaskStatus
from controller.store.schema import history_line, tasks

#: status → the statuses it may be reached from (inverse of LEGAL_TRANSITIONS).
PREDECESSORS: dict[TaskStatus, tuple[str, ...]] = {
    target: tuple(s.value for s, targets in LEGAL_TRANSITIONS.items() if target in targets)
    for target in TaskStatus
}


def status_columns(
    status: TaskStatus,
    reason: str,
    message: str,
    *,
    worker_id: str | None = None,
    lease_s: float | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """The task columns a change to `status` sets (besides the status rule itself).

    `history` is the line to append to the history column (see `set_clause`)."""
    now = time.time() if now is None else now
    values: dict[str, Any] = dict(
        status=status.value, status_reason=reason, status_message=message, updated_at=now,
        history=history_line(status.value, reason, message, now),
    )
    if status == TaskStatus.in_progress:
        values.update(started_at=now, finished_at=None)
        if worker_id:
            values.update(worker=worker_id, lease_expires_at=now + (lease_s or DEFAULT_LEASE_S))
    elif status.is_terminal:
        values.update(finished_at=now, lease_expires_at=None)
    elif status == TaskStatus.queued:
        values.update(queued_at=now, started_at=None, finished_at=None, lease_expires_at=None, worker=None)
    elif status == TaskStatus.created:
        values.update(lease_expires_at=None)
    return values


def set_clause(keys: Iterable[str]) -> dict[str, Any]:
    """UPDATE values for the columns `keys`, each from the bind parameter `v_<key>`;
    `history` appends its parameter to the column instead of replacing it."""
    values: dict[str, Any] = {}
    for key in keys:
        param = sa.bindparam(f"v_{key}", type_=sa.Text if key == "history" else None)
        values[key] = tasks.c.history + param if key == "history" else param
    return values
