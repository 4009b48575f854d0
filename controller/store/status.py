"""The columns a status change writes, and the status rules turned around for SQL."""

from __future__ import annotations

import time
from typing import Any

from controller.models import DEFAULT_LEASE_S, LEGAL_TRANSITIONS, TaskStatus

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
    """The task columns a change to `status` sets (besides the status rule itself)."""
    now = time.time() if now is None else now
    values: dict[str, Any] = dict(
        status=status.value, status_reason=reason, status_message=message, updated_at=now
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
