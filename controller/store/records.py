"""Conversion between table rows and records, and input validation helpers."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, TypeVar

import sqlalchemy as sa
from pydantic import BaseModel, ValidationError

from controller.errors import InvalidInputError
from controller.models import TaskRecord

# Keys of TaskRecord kept in tasks.body (everything that is not a column).
BODY_KEYS = (
    "tags",
    "comment",
    "script",
    "packages",
    "container",
    "hyperparams",
    "configuration",
    "execution",
    "runtime",
    "artifacts",
    "models",
)

M = TypeVar("M", bound=BaseModel)


def validate(model: type[M], data: Any, *, what: str = "") -> M:
    """Validate input against a model; InvalidInputError naming the field otherwise."""
    if isinstance(data, model):
        return data
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid_input(exc, prefix=what) from None


def invalid_input(exc: ValidationError, *, prefix: str = "") -> InvalidInputError:
    """One clear line naming each field at fault."""
    parts = []
    fields = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()))
        if prefix:
            loc = f"{prefix}.{loc}" if loc else prefix
        fields.append(loc)
        parts.append(f"{loc or 'value'}: {err.get('msg', 'invalid')}")
    more = len(exc.errors()) - 5
    message = "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")
    return InvalidInputError(message, field=fields[0] if fields else None)


def dumps(value: Any) -> str:
    """Compact JSON for storage."""
    return json.dumps(value, separators=(",", ":"), default=str)


def row_to_record(row: sa.Row) -> TaskRecord:
    """Build a TaskRecord from a row of `tasks`."""
    data: dict[str, Any] = json.loads(row.body)
    runtime = data.setdefault("runtime", {})
    runtime["worker"] = row.worker or ""
    runtime["attempt"] = row.attempt
    data.update(
        id=row.id,
        name=row.name,
        project=row.project,
        type=row.type,
        parent=row.parent,
        status=row.status,
        status_reason=row.status_reason,
        status_message=row.status_message,
        created_at=row.created_at,
        updated_at=row.updated_at,
        queued_at=row.queued_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        lease_expires_at=row.lease_expires_at,
    )
    return TaskRecord.model_validate(data)


def body_of(record_data: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a (json-mode) record dump stored in tasks.body."""
    body = {key: record_data[key] for key in BODY_KEYS if key in record_data}
    runtime = dict(body.get("runtime") or {})
    runtime.pop("worker", None)  # columns are the truth for these
    runtime.pop("attempt", None)
    body["runtime"] = runtime
    return body
