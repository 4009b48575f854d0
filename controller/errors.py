"""Errors every Backend raises, identical over SQL and HTTP.

Each error carries the HTTP status the server answers with, so the HTTP client can
turn an error response back into the same exception the SQL store raised.
"""

from __future__ import annotations

from typing import Any


class ConveyorError(Exception):
    """Base of every error Conveyor raises on purpose."""

    http_status = 500
    code = "error"

    def __init__(self, message: str, *, field: str | None = None, detail: Any = None):
        super().__init__(message)
        self.message = message
        self.field = field
        self.detail = detail

    def to_json(self) -> dict[str, Any]:
        """The body of the HTTP error response."""
        body: dict[str, Any] = {"error": self.code, "message": self.message}
        if self.field:
            body["field"] = self.field
        if self.detail is not None:
            body["detail"] = self.detail
        return body


class NotFoundError(ConveyorError):
    """An unknown task id, queue name or worker id."""

    http_status = 404
    code = "not_found"


class ConflictError(ConveyorError):
    """The request is well formed but the record's state forbids it."""

    http_status = 409
    code = "conflict"


class IllegalTransitionError(ConflictError):
    """A status change the status rules forbid."""

    code = "illegal_transition"

    def __init__(self, current: str, requested: str, task_id: str | None = None):
        who = f"task {task_id}" if task_id else "task"
        super().__init__(
            f"cannot change {who} from status '{current}' to '{requested}'",
            field="status",
            detail={"current": current, "requested": requested},
        )
        self.current = current
        self.requested = requested


class InvalidInputError(ConveyorError):
    """Input that does not fit the contract: wrong type, missing field, too large."""

    http_status = 422
    code = "invalid_input"


class AuthError(ConveyorError):
    """Missing or wrong API token."""

    http_status = 401
    code = "unauthorized"


class BackendUnavailableError(ConveyorError):
    """The store or the API server cannot be reached."""

    http_status = 503
    code = "unavailable"


ERRORS_BY_CODE: dict[str, type[ConveyorError]] = {
    cls.code: cls
    for cls in (
        NotFoundError,
        ConflictError,
        IllegalTransitionError,
        InvalidInputError,
        AuthError,
        BackendUnavailableError,
    )
}


def error_from_json(status: int, body: dict[str, Any]) -> ConveyorError:
    """Rebuild the exception an HTTP error response stands for."""
    code = body.get("error", "")
    message = body.get("message") or str(body)
    if code == IllegalTransitionError.code:
        detail = body.get("detail") or {}
        err = IllegalTransitionError(detail.get("current", "?"), detail.get("requested", "?"))
        err.message = message
        err.args = (message,)
        return err
    cls = ERRORS_BY_CODE.get(code)
    if cls is None:
        cls = {404: NotFoundError, 409: ConflictError, 401: AuthError, 422: InvalidInputError}.get(
            status, ConveyorError
        )
    return cls(message, field=body.get("field"), detail=body.get("detail"))
