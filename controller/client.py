"""`HttpBackend`: the Backend interface over the HTTP API of `controller serve`.

Same methods, same records, same exceptions as `SqlBackend`: error responses are turned
back into their exception class with `error_from_json`. Input is validated by the server
(422 → InvalidInputError), so both transports accept and refuse the same input.

Transport: one `requests.Session` per backend, built by `controller.http_session`
(keep-alive connection pool shared by the caller's threads, the token set once, only
connection errors retried with backoff: a request the server may have received is never
sent twice). Bodies are encoded and answers decoded with pydantic-core (already what
the records are validated with). Long polls (`claim`, `wait_for_status_change` with a
`wait_s`) get a read timeout of their wait plus `timeout_s`.

Errors a user sees say what to fix: an unreachable server names the URL and
`CONVEYOR_API`, a 401 names `CONVEYOR_API_TOKEN`, a malformed URL is refused when the
backend is made.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from enum import Enum
from typing import Any
from urllib.parse import quote

import pydantic_core
import requests
from pydantic import BaseModel, TypeAdapter

from controller.backend import _UNSET, MAX_CLAIM_WAIT_S, Backend
from controller.errors import (
    AuthError,
    BackendUnavailableError,
    ConveyorError,
    InvalidInputError,
    error_from_json,
)
from controller.http_session import (
    API_ENV,
    CONNECT_BACKOFF_S,
    CONNECT_RETRIES,
    build_session,
    check_api_url,
    failure_reason,
    is_connect_failure,
    token_refused_message,
)
from controller.models import (
    DEFAULT_LEASE_S,
    HeartbeatReply,
    LogLine,
    QueueInfo,
    Scalar,
    TaskRecord,
    TaskSpec,
    TaskStatus,
    WorkerInfo,
)

#: Largest request body the server accepts (see controller.server.middleware).
MAX_BODY_BYTES = 64 * 1024 * 1024
_TASKS = TypeAdapter(list[TaskRecord])
_LOG = TypeAdapter(list[LogLine])
_SCALARS = TypeAdapter(list[Scalar])
_QUEUES = TypeAdapter(list[QueueInfo])
_WORKERS = TypeAdapter(list[WorkerInfo])
_IDS = TypeAdapter(list[str])


def _p(segment: str) -> str:
    """A path segment, percent-encoded (ids and names never change the route)."""
    return quote(str(segment), safe="")


def _strip_body_prefix(body: dict[str, Any]) -> dict[str, Any]:
    """Name fields as the SQL store does: `name`, not the server's `body.name`."""
    body = dict(body)
    field = body.get("field")
    if isinstance(field, str) and field.startswith("body."):
        body["field"] = field[len("body.") :]
    message = body.get("message")
    if isinstance(message, str):
        body["message"] = re.sub(r"(^|; )body\.", r"\1", message)
    return body


def _long_poll_timeout_s(wait_s: Any, timeout_s: float) -> float:
    """Read timeout of a call that may wait `wait_s` on the server before answering."""
    try:
        wait = float(wait_s)
    except (TypeError, ValueError):
        return timeout_s  # the server refuses the bad wait_s
    if wait != wait:  # NaN: refused by the server too
        return timeout_s
    return min(max(wait, 0.0), MAX_CLAIM_WAIT_S) + timeout_s


class HttpBackend(Backend):
    """Backend over HTTP: `HttpBackend("http://host:8008", token=...)`."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        timeout_s: float = 30.0,
        connect_timeout_s: float = 5.0,
        retries: int = CONNECT_RETRIES,
        backoff_s: float = CONNECT_BACKOFF_S,
    ) -> None:
        """`timeout_s` bounds each answer (long polls add their `wait_s`); `retries` is
        how often a failed *connection* is retried, with exponential backoff from
        `backoff_s`. A malformed `url` raises InvalidInputError naming it."""
        self.url = check_api_url(url)
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.retries = retries
        self._api_url = self.url + "/api/v1"
        self._token_sent = bool(token)
        # One session for every thread of the process using this backend.
        self._session = build_session(self.url, token, retries=retries, backoff_s=backoff_s)
        # Every body the API takes is JSON. Set once on the session, not per request:
        # merging per-request headers into the session's costs ~0.1 ms of client CPU.
        self._session.headers["Content-Type"] = "application/json"

    def __repr__(self) -> str:
        return f"HttpBackend({self.url!r})"

    # ------------------------------------------------------------- transport
    def _call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        params: Mapping[str, Any] | None = None,
        read_timeout_s: float | None = None,
    ) -> bytes | None:
        """Send one request; the response content, None for 204; raise mapped errors."""
        data = None
        if body is not None:
            try:
                data = pydantic_core.to_json(body)
            except pydantic_core.PydanticSerializationError as exc:
                raise InvalidInputError(f"input is not JSON-serializable: {exc}") from None
            if len(data) > MAX_BODY_BYTES:
                raise InvalidInputError(
                    f"request too large ({len(data)} bytes): the limit is "
                    f"{MAX_BODY_BYTES // (1024 * 1024)} MiB",
                    field="body",
                )
        read_timeout_s = read_timeout_s or self.timeout_s
        try:
            response = self._session.request(
                method,
                self._api_url + path,
                params=params,
                data=data,
                timeout=(self.connect_timeout_s, read_timeout_s),
                allow_redirects=False,
            )
        except requests.RequestException as exc:
            raise BackendUnavailableError(self._unreachable(exc, read_timeout_s)) from None
        status = response.status_code
        if status == 204:
            return None
        if status < 300:
            return response.content
        self._raise(response)
        return None  # unreachable

    def _unreachable(self, exc: requests.RequestException, read_timeout_s: float) -> str:
        """The one-line message of a request that got no answer."""
        if is_connect_failure(exc):
            tries = self.retries + 1
            suffix = f" (tried {tries} times)" if tries > 1 else ""
            return (
                f"cannot reach the Conveyor API at {self.url}: {failure_reason(exc)}{suffix}; "
                f"check that `controller serve` runs there and that {API_ENV} names it"
            )
        if isinstance(exc, requests.ReadTimeout):
            reason = f"no answer within {read_timeout_s:g}s"
        else:
            reason = f"connection lost before the answer ({failure_reason(exc)})"
        return f"cannot reach the Conveyor API at {self.url}: {reason}"

    def _raise(self, response: requests.Response) -> None:
        """Raise the Conveyor exception an error (or unexpected redirect) answer stands for."""
        status, content = response.status_code, response.content
        if status < 400:  # 3xx: the URL points at something that is not the API
            where = response.headers.get("Location", "?")
            raise ConveyorError(
                f"the Conveyor API at {self.url} answered HTTP {status}, redirecting to "
                f"{where}: set {API_ENV} to the server's own URL"
            )
        if status == 401:
            raise AuthError(token_refused_message(self.url, self._token_sent))
        try:
            body = pydantic_core.from_json(content) if content else None
        except ValueError:
            body = None
        if not isinstance(body, dict) or "error" not in body:
            text = " ".join(content.decode(errors="replace").split())[:300]
            message = (
                f"HTTP {status} from the Conveyor API at {self.url}: "
                f"{text or response.reason or ''}"
            )
            if status in (502, 503, 504):
                raise BackendUnavailableError(message)
            body = {"message": message}
        elif body.get("error") == InvalidInputError.code:
            body = _strip_body_prefix(body)
        raise error_from_json(status, body)

    @staticmethod
    def _plain(obj: Any) -> Any:
        """Mappings and models become plain JSON-able values (sequences become lists)."""
        if isinstance(obj, BaseModel):
            return obj.model_dump(mode="json")
        if isinstance(obj, Mapping):
            return dict(obj)
        return obj

    # ----------------------------------------------------------------- tasks
    def create_task(self, spec: TaskSpec | Mapping[str, Any]) -> TaskRecord:
        """Create a task in status created and return it."""
        body = (
            spec.model_dump(mode="json", exclude_unset=True)
            if isinstance(spec, BaseModel)
            else dict(spec)
        )
        return TaskRecord.model_validate_json(self._call("POST", "/tasks", body))

    def get_task(self, task_id: str) -> TaskRecord:
        """Return one task; NotFoundError if there is none with that id."""
        return TaskRecord.model_validate_json(self._call("GET", f"/tasks/{_p(task_id)}"))

    def query_tasks(
        self,
        *,
        project: str | None = None,
        name: str | None = None,
        status: Sequence[TaskStatus | str] | TaskStatus | str | None = None,
        tags: Sequence[str] | None = None,
        parent: str | None = None,
        type: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[TaskRecord]:
        """Tasks matching every given filter (all `tags` present), newest first."""
        if isinstance(status, (str, TaskStatus)):
            status = [status]
        if isinstance(tags, str):
            tags = [tags]
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        for key, value in (
            ("project", project),
            ("name", name),
            ("parent", parent),
            ("type", type),
        ):
            if value is not None:
                params[key] = value.value if isinstance(value, Enum) else value
        if status is not None:
            params["status"] = [s.value if isinstance(s, Enum) else s for s in status]
        if tags is not None:
            params["tags"] = list(tags)
        return _TASKS.validate_json(self._call("GET", "/tasks", params=params))

    def edit_task(
        self, task_id: str, changes: Mapping[str, Any], *, force: bool = False
    ) -> TaskRecord:
        """Change definition fields of a task (see Backend.edit_task)."""
        body = {"changes": dict(changes), "force": force}
        return TaskRecord.model_validate_json(self._call("PATCH", f"/tasks/{_p(task_id)}", body))

    def clone_task(
        self,
        task_id: str,
        *,
        name: str | None = None,
        project: str | None = None,
        parent: str | None = _UNSET,
    ) -> TaskRecord:
        """A copy of the task's definition with a new id, in status created."""
        body: dict[str, Any] = {"name": name, "project": project}
        if parent is not _UNSET:
            body["parent"] = parent
        return TaskRecord.model_validate_json(
            self._call("POST", f"/tasks/{_p(task_id)}/clone", body)
        )

    def delete_task(self, task_id: str, *, force: bool = False) -> list[TaskRecord]:
        """Delete a task with its log and scalars; a pipeline with its steps. An active
        task or step needs `force`. Returns the records deleted (steps first)."""
        body = self._call(
            "DELETE", f"/tasks/{_p(task_id)}", params={"force": "true" if force else "false"}
        )
        return _TASKS.validate_json(body)

    def set_status(
        self,
        task_id: str,
        status: TaskStatus | str,
        *,
        reason: str = "",
        message: str = "",
        worker_id: str | None = None,
    ) -> TaskRecord:
        """Move a task to `status` if the status rules allow it."""
        body = {
            "status": status.value if isinstance(status, TaskStatus) else status,
            "reason": reason,
            "message": message,
            "worker_id": worker_id,
        }
        return TaskRecord.model_validate_json(
            self._call("POST", f"/tasks/{_p(task_id)}/status", body)
        )

    def finish_task(
        self,
        task_id: str,
        status: TaskStatus | str,
        *,
        reason: str = "",
        message: str = "",
        worker_id: str | None = None,
        runtime: Mapping[str, Any] | None = None,
        log_lines: Sequence[LogLine | Mapping[str, Any] | str] = (),
        log_batch_id: str | None = None,
    ) -> TaskRecord:
        """A run's final report (log lines, runtime, finished status) in one request,
        written all or nothing (`Backend.finish_task`)."""
        if isinstance(log_lines, (str, bytes)):
            log_lines = [log_lines]
        body: dict[str, Any] = {
            "status": status.value if isinstance(status, TaskStatus) else status,
            "reason": reason,
            "message": message,
            "worker_id": worker_id,
            "runtime": self._plain(runtime) if runtime is not None else None,
            "log_lines": [self._plain(line) for line in log_lines],
        }
        if log_batch_id is not None:
            body["log_batch_id"] = log_batch_id
        return TaskRecord.model_validate_json(
            self._call("POST", f"/tasks/{_p(task_id)}/finish", body)
        )

    # ----------------------------------------------------------- logs/metrics
    def append_log(
        self,
        task_id: str,
        lines: Sequence[LogLine | Mapping[str, Any] | str],
        *,
        batch_id: str | None = None,
    ) -> int:
        """Append lines to a task's log; returns the log's new length in lines.

        A chunk resent with the same `batch_id` is appended once (`Backend.append_log`).
        """
        if isinstance(lines, (str, bytes)):
            lines = [lines]
        body: dict[str, Any] = {"lines": [self._plain(line) for line in lines]}
        if batch_id is not None:
            body["batch_id"] = batch_id
        reply = self._call("POST", f"/tasks/{_p(task_id)}/log", body)
        return int(pydantic_core.from_json(reply)["length"])

    def get_log(
        self, task_id: str, *, offset: int = 0, limit: int | None = None, tail: int | None = None
    ) -> list[LogLine]:
        """Lines from line number `offset` on (at most `limit`), or the last `tail` lines."""
        params: dict[str, Any] = {"offset": offset}
        if limit is not None:
            params["limit"] = limit
        if tail is not None:
            params["tail"] = tail
        return _LOG.validate_json(self._call("GET", f"/tasks/{_p(task_id)}/log", params=params))

    def report_scalars(self, task_id: str, scalars: Sequence[Scalar | Mapping[str, Any]]) -> None:
        """Record scalar values (title, series, iteration, value)."""
        body = {"scalars": [self._plain(s) for s in scalars]}
        self._call("POST", f"/tasks/{_p(task_id)}/scalars", body)

    def get_scalars(
        self, task_id: str, *, title: str | None = None, series: str | None = None
    ) -> list[Scalar]:
        """Scalars of a task, ordered by title, series, iteration."""
        params = {k: v for k, v in (("title", title), ("series", series)) if v is not None}
        return _SCALARS.validate_json(
            self._call("GET", f"/tasks/{_p(task_id)}/scalars", params=params)
        )

    # ---------------------------------------------------------------- queues
    def create_queue(self, name: str) -> QueueInfo:
        """Create a queue (ConflictError if it exists)."""
        return QueueInfo.model_validate_json(self._call("POST", "/queues", {"name": name}))

    def list_queues(self) -> list[QueueInfo]:
        """Every queue with its length, by name."""
        return _QUEUES.validate_json(self._call("GET", "/queues"))

    def get_queue(self, name: str) -> QueueInfo:
        """One queue; NotFoundError if unknown."""
        return QueueInfo.model_validate_json(self._call("GET", f"/queues/{_p(name)}"))

    def delete_queue(self, name: str, *, force: bool = False) -> None:
        """Delete a queue; a non-empty queue needs `force`."""
        self._call("DELETE", f"/queues/{_p(name)}", params={"force": "true" if force else "false"})

    def enqueue(
        self, task_id: str, queue: str | None = None, *, priority: int | None = None
    ) -> TaskRecord:
        """Put a created (or finished) task on a queue."""
        body = {"queue": queue, "priority": priority}
        return TaskRecord.model_validate_json(
            self._call("POST", f"/tasks/{_p(task_id)}/enqueue", body)
        )

    def dequeue(self, task_id: str) -> TaskRecord:
        """Take a queued task off its queue, back to created."""
        return TaskRecord.model_validate_json(self._call("POST", f"/tasks/{_p(task_id)}/dequeue"))

    def queue_tasks(self, name: str) -> list[TaskRecord]:
        """The tasks waiting in a queue, in the order they will be claimed."""
        return _TASKS.validate_json(self._call("GET", f"/queues/{_p(name)}/tasks"))

    def wait_for_status_change(
        self, known: Mapping[str, TaskStatus | str], *, wait_s: float = 0.0
    ) -> list[TaskRecord]:
        """Tasks of `known` whose status differs from the one given; waits up to `wait_s`."""
        body = {
            "known": {k: (v.value if isinstance(v, TaskStatus) else v) for k, v in dict(known).items()}
            if isinstance(known, Mapping) else known,
            "wait_s": wait_s,
        }
        read_timeout_s = _long_poll_timeout_s(wait_s, self.timeout_s)
        return _TASKS.validate_json(
            self._call("POST", "/tasks/wait", body, read_timeout_s=read_timeout_s)
        )

    def claim(
        self,
        queues: Sequence[str],
        worker_id: str,
        *,
        wait_s: float = 0.0,
        lease_s: float = DEFAULT_LEASE_S,
    ) -> TaskRecord | None:
        """Take the next task of `queues`, waiting up to `wait_s` for one; None if none came."""
        if isinstance(queues, str):
            queues = [queues]
        body = {
            "queues": list(queues),
            "worker_id": worker_id,
            "wait_s": wait_s,
            "lease_s": lease_s,
        }
        read_timeout_s = _long_poll_timeout_s(wait_s, self.timeout_s)
        content = self._call("POST", "/claim", body, read_timeout_s=read_timeout_s)
        if content is None or content == b"null":
            return None
        return TaskRecord.model_validate_json(content)

    # --------------------------------------------------------------- workers
    def register_worker(
        self, worker_id: str, *, hostname: str = "", queues: Sequence[str] = (), slots: int = 1
    ) -> WorkerInfo:
        """Register (or re-register) a worker."""
        if isinstance(queues, str):
            queues = [queues]
        body = {
            "worker_id": worker_id,
            "hostname": hostname,
            "queues": list(queues),
            "slots": slots,
        }
        return WorkerInfo.model_validate_json(self._call("POST", "/workers", body))

    def heartbeat(
        self,
        worker_id: str,
        *,
        resources: Mapping[str, Any] | None = None,
        current_tasks: Sequence[str] | None = None,
        lease_s: float = DEFAULT_LEASE_S,
    ) -> HeartbeatReply:
        """Mark a worker alive, extend the leases of its tasks, return tasks to abort."""
        body = {
            "resources": dict(resources) if resources is not None else None,
            "current_tasks": list(current_tasks) if current_tasks is not None else None,
            "lease_s": lease_s,
        }
        reply = self._call("POST", f"/workers/{_p(worker_id)}/heartbeat", body)
        return HeartbeatReply.model_validate_json(reply)

    def unregister_worker(self, worker_id: str) -> None:
        """Forget a worker (its tasks keep their leases until they expire)."""
        self._call("DELETE", f"/workers/{_p(worker_id)}")

    def list_workers(self) -> list[WorkerInfo]:
        """Registered workers with last-seen time and current tasks."""
        return _WORKERS.validate_json(self._call("GET", "/workers"))

    # ------------------------------------------------------------- lifecycle
    def abort_task(self, task_id: str, *, message: str = "") -> TaskRecord:
        """Abort a task (queued/created → stopped, in_progress → stopping)."""
        body = {"message": message}
        return TaskRecord.model_validate_json(
            self._call("POST", f"/tasks/{_p(task_id)}/abort", body)
        )

    def reset_task(self, task_id: str) -> TaskRecord:
        """Bring a task that is not active back to created, clearing its outputs."""
        return TaskRecord.model_validate_json(self._call("POST", f"/tasks/{_p(task_id)}/reset"))

    def expire_leases(self) -> list[str]:
        """Fail every active task whose lease expired; returns their ids."""
        return _IDS.validate_json(self._call("POST", "/leases/expire"))

    def health(self) -> dict[str, Any]:
        """The server's /health answer ({"status": "ok", "version": ...})."""
        return pydantic_core.from_json(self._call("GET", "/health"))

    def close(self) -> None:
        """Close the pooled connections."""
        self._session.close()
