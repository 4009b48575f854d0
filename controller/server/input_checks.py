"""One request-level check of text the databases cannot store, for every API route.

PostgreSQL refuses NUL characters in text and JSON (`DataError`), SQLite stores them;
neither stores a lone UTF-16 surrogate (`"\\ud800"` in JSON), which cannot be encoded
as UTF-8. So that both stores give the same answer, such text is refused here, before
any route runs: 422 `invalid_input` naming the field (`path.task_id`, `query.name`,
`body.changes.name`), the body shape of every other 422 (`error_bodies.validation_body`).

`refuse_unstorable_text` is a FastAPI dependency the app adds to every route
(`FastAPI(dependencies=...)`): it sees the route's path parameters by name, the query
parameters, and the JSON body (read once by FastAPI and cached on the request; it is
decoded again only when its raw bytes hold a `\\u0000` or surrogate escape, so ordinary
requests pay one regex search). The streamed files endpoint has no body model: its
body is never read here.
"""

from __future__ import annotations

import json
import re
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError

#: JSON escapes that may decode to unstorable text: NUL, or a UTF-16 surrogate
#: (a valid pair is fine; it is checked after decoding).
_SUSPECT_ESCAPE = re.compile(rb"\\u(?:0000|[dD][89a-fA-F][0-9a-fA-F]{2})")
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def unstorable_reason(text: str) -> str | None:
    """Why a database cannot store `text` (a NUL or a lone surrogate), or None."""
    if "\x00" in text:
        return "text must not contain NUL characters (\\u0000)"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "text must be valid Unicode (no lone surrogates such as \\ud800)"
    return None


def _error(loc: list[Any], reason: str) -> dict[str, Any]:
    return {"loc": loc, "msg": reason, "type": "string_unstorable"}


def find_unstorable(value: Any, loc: list[Any]) -> dict[str, Any] | None:
    """The first string (dict keys included) in a decoded JSON value that a database
    cannot store, as a validation error at its location; None if there is none."""
    if isinstance(value, str):
        reason = unstorable_reason(value)
        return _error(loc, reason) if reason else None
    if isinstance(value, dict):
        for key, item in value.items():
            reason = unstorable_reason(key)
            if reason:
                return _error([*loc, key.encode("utf-8", "backslashreplace").decode()], reason)
            found = find_unstorable(item, [*loc, key])
            if found:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = find_unstorable(item, [*loc, index])
            if found:
                return found
    return None


async def refuse_unstorable_text(request: Request) -> None:
    """FastAPI dependency: RequestValidationError (422) for a path parameter, query
    parameter or JSON body string holding text the databases cannot store."""
    errors: list[dict[str, Any]] = []
    for name, value in request.path_params.items():
        reason = unstorable_reason(value) if isinstance(value, str) else None
        if reason:
            errors.append(_error(["path", name], reason))
    for name, value in request.query_params.multi_items():
        reason = unstorable_reason(name) or unstorable_reason(value)
        if reason:
            shown = name if not unstorable_reason(name) else name.replace("\x00", "\\x00")
            errors.append(_error(["query", shown], reason))
    # Only routes with a JSON body model (FastAPI has read and cached that body already);
    # never the streamed files endpoint, whose body may be gigabytes.
    route = request.scope.get("route")
    if request.method in _BODY_METHODS and getattr(route, "body_field", None) is not None:
        raw = await request.body()
        if _SUSPECT_ESCAPE.search(raw):
            try:
                decoded = json.loads(raw)
            except ValueError:
                decoded = None  # malformed JSON: FastAPI's own 422 names it
            found = find_unstorable(decoded, ["body"])
            if found:
                errors.append(found)
    if errors:
        raise RequestValidationError(errors)
