"""Pre-serialized JSON responses (pydantic's Rust serializer, no re-validation)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, TypeAdapter
from starlette.responses import Response

from controller.models import LogLine, QueueInfo, Scalar, TaskRecord, WorkerInfo

JSON = "application/json"
_ADAPTERS: dict[Any, TypeAdapter] = {
    TaskRecord: TypeAdapter(list[TaskRecord]),
    LogLine: TypeAdapter(list[LogLine]),
    Scalar: TypeAdapter(list[Scalar]),
    QueueInfo: TypeAdapter(list[QueueInfo]),
    WorkerInfo: TypeAdapter(list[WorkerInfo]),
    str: TypeAdapter(list[str]),
}
NULL = b"null"


def record(obj: BaseModel | None, status_code: int = 200) -> Response:
    """One record (or JSON null) as a response."""
    content = NULL if obj is None else obj.model_dump_json().encode()
    return Response(content=content, status_code=status_code, media_type=JSON)


def records(items: list, item_type: type) -> Response:
    """A list of records of `item_type` as a response."""
    return Response(content=_ADAPTERS[item_type].dump_json(items), media_type=JSON)


def no_content() -> Response:
    """204, for operations that return nothing."""
    return Response(status_code=204)
