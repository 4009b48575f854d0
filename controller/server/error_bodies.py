"""Bodies of error responses, shared by the FastAPI exception handlers.

Every error body is `{"error": <code>, "message": <one line>, ["field": ..., "detail": ...]}`
so that `controller.errors.error_from_json` turns it back into the exception it stands for.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from typing import Any

import pydantic

from controller.errors import ConveyorError

log = logging.getLogger("conveyor.server")
_MAX_MESSAGE_ERRORS = 3


def one_line(text: str) -> str:
    """`text` with every run of whitespace (newlines too) made one space."""
    return " ".join(text.split())


def _dotted(loc: Sequence[Any]) -> str:
    return ".".join(str(part) for part in loc)


def json_safe(value: Any) -> Any:
    """`value` if it is a JSON scalar, else its (shortened) text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    text = str(value)
    return text if len(text) <= 200 else text[:200] + "…"


def validation_body(errors: Sequence[Any], prefix: Sequence[str] = ()) -> dict[str, Any]:
    """The 422 body for pydantic/FastAPI validation errors.

    `message` names the field(s) at fault in one line (`body.name: String should have at
    most 256 characters`), `field` is the dotted path of the first, `detail` lists every
    error (loc, msg, type, ctx) without echoing the input, which may be huge.
    """
    detail: list[dict[str, Any]] = []
    parts: list[str] = []
    for err in errors:
        loc = [*prefix, *err.get("loc", ())]
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        kind = str(err.get("type", ""))
        ctx = err.get("ctx") or {}
        if kind == "json_invalid":
            pos = f" at character {loc[-1]}" if loc and isinstance(loc[-1], int) else ""
            reason = ctx.get("error", "JSON decode error")
            msg = f"malformed JSON ({reason}{pos})"
            loc = loc[:1]
        item: dict[str, Any] = {"loc": [json_safe(p) for p in loc], "msg": msg, "type": kind}
        if ctx:
            item["ctx"] = {str(k): json_safe(v) for k, v in ctx.items()}
        detail.append(item)
        if len(parts) < _MAX_MESSAGE_ERRORS:
            parts.append(f"{_dotted(loc) or 'input'}: {msg}")
    message = "; ".join(parts) or "invalid input"
    if len(detail) > _MAX_MESSAGE_ERRORS:
        message += f" (and {len(detail) - _MAX_MESSAGE_ERRORS} more errors)"
    body: dict[str, Any] = {
        "error": "invalid_input",
        "message": one_line(message),
        "detail": detail,
    }
    if detail and detail[0]["loc"]:
        body["field"] = _dotted(detail[0]["loc"])
    return body


#: What a 5xx ConveyorError's body says, by its code (its own message may name server
#: paths, hosts or SQL: it goes to the log only).
_SERVER_ERROR_MESSAGES = {
    "unavailable": "the server's store is unavailable; try again later",
}


def _error_id() -> str:
    return uuid.uuid4().hex[:16]


def server_error_body(method: str, path: str, exc: ConveyorError) -> dict[str, Any]:
    """The body of a ConveyorError answered with a 5xx (the store is unavailable): its
    code (so the client raises the same class), a generic message and an error id; the
    error's own message and traceback go to the server log under that id."""
    error_id = _error_id()
    log.error("error %s on %s %s: %s", error_id, method, path, exc.message, exc_info=exc)
    generic = _SERVER_ERROR_MESSAGES.get(exc.code, "the server failed")
    return {
        "error": exc.code,
        "message": f"{generic} (error id {error_id}: the server log has the details)",
        "error_id": error_id,
    }


def conveyor_error_body(exc: ConveyorError) -> dict[str, Any]:
    """The body of a ConveyorError (its `to_json()`, made JSON-safe); for a 4xx error only
    (see `server_error_body`)."""
    body = exc.to_json()
    if "detail" in body and not isinstance(body["detail"], (dict, list, str, int, float, bool)):
        body["detail"] = json_safe(body["detail"])
    return body


def value_error_body(exc: ValueError | OverflowError) -> dict[str, Any]:
    """422 body for bad input a Backend let through unwrapped: a ValueError, or an
    OverflowError (a number too large for the database)."""
    if isinstance(exc, pydantic.ValidationError):
        return validation_body(exc.errors())
    message = one_line(str(exc)) or type(exc).__name__
    if isinstance(exc, OverflowError):
        message = f"a number is out of range: {message}"
    return {"error": "invalid_input", "message": message}


def internal_error_body(method: str, path: str, exc: BaseException) -> dict[str, Any]:
    """500 body for a bug: a generic message and an error id; never the exception's text
    (it may hold server paths or SQL). The id is logged with the traceback, so an operator
    finds the details of what a user reports."""
    error_id = _error_id()
    log.error("internal error %s on %s %s", error_id, method, path, exc_info=exc)
    return {
        "error": "internal",
        "message": f"internal server error (error id {error_id}: the server log has the details)",
        "error_id": error_id,
    }
