"""Conversion between table rows and records, and input validation helpers."""

from __future__ import annotations

import json
from collections.abc import Mapping
from operator import itemgetter
from typing import Any, TypeVar

import pydantic_core
from pydantic import BaseModel, ValidationError

from controller.errors import ConveyorError, InvalidInputError
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


_encoder = json.JSONEncoder(separators=(",", ":"), default=str)


def dumps(value: Any) -> str:
    """Compact JSON for storage."""
    return _encoder.encode(value)


# Columns of `tasks` that are fields of TaskRecord as they are.
_RECORD_COLUMNS = (
    "id",
    "name",
    "project",
    "type",
    "parent",
    "status",
    "status_reason",
    "status_message",
    "created_at",
    "updated_at",
    "queued_at",
    "started_at",
    "finished_at",
    "lease_expires_at",
)


_pickers: dict[tuple[str, ...], Any] = {}


def row_to_record(row: Any) -> TaskRecord:
    """Build a TaskRecord from a row of `tasks` (a named tuple of its columns).

    The body and the record columns are joined as JSON text and validated in one pass by
    pydantic's JSON parser (about twice as fast as json.loads + model_validate, which
    remains the fallback for bodies the strict JSON parser refuses, such as NaN). A row
    that is no valid record (a damaged body) raises `corrupt_record_error`: the fault is
    the store's, not the caller's.
    """
    pick = _pickers.get(row._fields)
    if pick is None:
        pick = _pickers[row._fields] = itemgetter(*(row._fields.index(c) for c in _RECORD_COLUMNS))
    columns = pydantic_core.to_json(dict(zip(_RECORD_COLUMNS, pick(row), strict=True)))
    body: bytes = row.body.encode()
    try:
        record = _validator.validate_json(columns if len(body) <= 2 else body[:-1] + b"," + columns[1:])
    except ValidationError:
        try:
            data: dict[str, Any] = json.loads(body)
            data.update(json.loads(columns))
            record = TaskRecord.model_validate(data)
        except (ValueError, TypeError, AttributeError) as exc:  # ValidationError is a ValueError
            raise corrupt_record_error(f"task {row.id}", exc) from exc
    # Columns are the truth for these (their copies in the body may be stale). Set
    # without pydantic's __setattr__: the values come from typed columns.
    runtime = record.runtime.__dict__
    runtime["worker"] = row.worker or ""
    runtime["attempt"] = row.attempt
    execution = record.execution.__dict__
    execution["queue"] = row.queue or ""
    execution["priority"] = row.priority
    return record


_validator = TaskRecord.__pydantic_validator__


def corrupt_record_error(what: str, exc: BaseException) -> ConveyorError:
    """The error for a stored row that cannot be read back (`what`: e.g. "task <id>"):
    a server-side ConveyorError (HTTP 500), never a 422 blaming the caller's input."""
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return ConveyorError(f"the stored record of {what} is damaged and cannot be read: {first_line}")


def body_of(record_data: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a (json-mode) record dump stored in tasks.body."""
    body = {key: record_data[key] for key in BODY_KEYS if key in record_data}
    runtime = dict(body.get("runtime") or {})
    runtime.pop("worker", None)  # columns are the truth for these
    runtime.pop("attempt", None)
    body["runtime"] = runtime
    if isinstance(body.get("execution"), Mapping):
        body["execution"] = {k: v for k, v in body["execution"].items() if k not in ("queue", "priority")}
    return body
