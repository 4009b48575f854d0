"""`HttpBackend`: the Backend interface over the HTTP API of `controller serve`.

Same methods, same records, same exceptions as `SqlBackend`: error responses are turned
back into their exception class with `error_from_json`. Input is validated by the server
(422 → InvalidInputError), so both transports accept and refuse the same input.

Transport: a keep-alive urllib3 connection pool (urllib3 is what requests runs on; used
directly it costs about half as much CPU per call, which matters for agents that claim
and report at high rates). Only connection errors are retried (a bounded number of
times, with backoff): a request the server may have received is never sent twice. When
the server cannot be reached, BackendUnavailableError says so in one line naming the URL.

urllib3 opens every connection (TLS, connect timeout, retries, their error messages).
Once a pooled connection is open and idle, requests on it are written and read directly
on its socket (`_FastExchange`): one send for the head and body, a small HTTP/1.1
response reader (Content-Length, chunked, close-delimited). http.client and urllib3
cost ~200 µs of CPU a request (header parsing with the email package, buffered file
objects, retry and timeout bookkeeping); this costs ~20 µs. Its failures are reported as
urllib3's would be for the same request (same messages, no retry).
"""

from __future__ import annotations

import errno
import re
import zlib
from collections.abc import Mapping, Sequence
from enum import Enum
from http.client import BadStatusLine, IncompleteRead, RemoteDisconnected
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import pydantic_core
import urllib3
from pydantic import BaseModel, TypeAdapter
from urllib3.exceptions import (
    ConnectTimeoutError,
    MaxRetryError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
)
from urllib3.util.retry import Retry

from controller.backend import _UNSET, MAX_CLAIM_WAIT_S, Backend
from controller.errors import BackendUnavailableError, InvalidInputError, error_from_json
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


def _reason(exc: BaseException) -> str:
    """The innermost, human-readable cause of a urllib3 error, in one line."""
    err: BaseException = exc
    seen: set[int] = set()
    while id(err) not in seen:
        seen.add(id(err))
        inner = err.reason if isinstance(err, MaxRetryError) else None
        if inner is None and err.args and isinstance(err.args[0], BaseException):
            inner = err.args[0]
        if not isinstance(inner, BaseException):
            break
        err = inner
    text = str(err)
    for marker in ("Failed to establish a new connection: ", "Failed to resolve "):
        if marker in text:
            text = text.split(marker, 1)[1]
    text = re.sub(r"\[Errno -?\d+\]\s*", "", text)
    text = re.sub(r"^\S*Connection(Pool)?\([^)]*\):\s*", "", text)
    return " ".join(text.split()) or type(err).__name__


def _is_connect_error(exc: BaseException) -> bool:
    """True if the request never reached the server (safe to say "cannot connect")."""
    reason = exc.reason if isinstance(exc, MaxRetryError) else exc
    return isinstance(reason, (NewConnectionError, ConnectTimeoutError))


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


#: A request target sent as is (anything else goes through urllib3, which encodes it).
_PLAIN_TARGET = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/?%]+")
#: Methods urllib3 sends without a Content-Length when they have no body.
_NO_CONTENT_METHODS = frozenset({"GET", "HEAD", "DELETE", "TRACE", "OPTIONS", "CONNECT"})
#: Characters http.client refuses in a header value.
_ILLEGAL_HEADER_VALUE = re.compile(rb"\n(?![ \t])|\r(?![ \t\n])")
_MAX_HEAD_BYTES = 64 * 1024
_RECV_BYTES = 64 * 1024


class _ExchangeError(Exception):
    """The fast exchange failed; `error` is what urllib3 would have raised for it."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(error)
        self.error = error


class _FastExchange:
    """Requests on the idle keep-alive connections of a urllib3 pool, read and written
    directly on their sockets. `exchange()` returns None when there is no open idle
    connection (the caller then uses `urlopen`, which connects, with its retries)."""

    def __init__(self, pool: urllib3.HTTPConnectionPool, headers: Mapping[str, str]) -> None:
        self.pool = pool
        host, port = pool.host.rstrip("."), pool.port  # as urllib3's connections send it
        default_port = pool.ConnectionCls.default_port
        try:
            host_enc = host.encode("ascii")
        except UnicodeEncodeError:
            host_enc = host.encode("idna")
        if ":" in host:
            host_enc = b"[" + host_enc + b"]"
        if port is not None and port != default_port:
            host_enc += b":%d" % port
        # The head urllib3 sends: Host and Accept-Encoding, [Content-Length], our headers.
        self._start = b"\r\nHost: " + host_enc + b"\r\nAccept-Encoding: identity\r\n"
        lines = []
        for name, value in headers.items():
            raw = value.encode("latin-1")
            if _ILLEGAL_HEADER_VALUE.search(raw):
                raise ValueError(f"Invalid header value {raw!r}")
            lines.append(name.encode("ascii") + b": " + raw + b"\r\n")
        self._headers = b"".join(lines) + b"\r\n"

    def exchange(
        self, method: str, url: str, data: bytes | None, read_timeout: float, send_timeout: float
    ) -> tuple[int, str, bytes] | None:
        """(status, reason, content) of one request, or None (use urlopen)."""
        if not _PLAIN_TARGET.fullmatch(url):
            return None
        pool = self.pool
        try:
            conn = pool._get_conn()  # drops a connection the server closed meanwhile
        except urllib3.exceptions.HTTPError:
            return None  # closed pool: urlopen says so
        sock = conn.sock
        if sock is None:
            pool._put_conn(conn)
            return None
        if data is not None:
            length = b"Content-Length: %d\r\n" % len(data)
        elif method in _NO_CONTENT_METHODS:
            length = b""
        else:
            length = b"Content-Length: 0\r\n"
        head = method.encode("ascii") + b" " + url.encode("ascii") + b" HTTP/1.1"
        message = head + self._start + length + self._headers
        try:
            try:
                sock.settimeout(send_timeout)
                if data is None:
                    sock.sendall(message)
                elif len(data) <= 64 * 1024:
                    sock.sendall(message + data)
                else:
                    sock.sendall(message)
                    sock.sendall(data)
            except BrokenPipeError:
                pass  # the server may have answered before closing (urllib3 reads it too)
            except OSError as exc:
                if exc.errno not in (errno.EPROTOTYPE, errno.ECONNRESET):
                    raise _ExchangeError(ProtocolError("Connection aborted.", exc)) from None
            sock.settimeout(read_timeout)
            status, reason, content, keep = _read_response(sock, method, pool, url, read_timeout)
        except BaseException:
            conn.close()
            pool._put_conn(conn)
            raise
        if not keep:
            conn.close()
        pool._put_conn(conn)
        return status, reason, content


def _read_response(
    sock: Any, method: str, pool: Any, url: str, read_timeout: float
) -> tuple[int, str, bytes, bool]:
    """(status, reason, content, keep-alive) of the response on `sock`."""
    buf = b""
    while True:  # 1xx interim answers are skipped, as http.client does
        try:
            while True:
                end = buf.find(b"\r\n\r\n")
                if end >= 0:
                    break
                if len(buf) > _MAX_HEAD_BYTES:
                    raise _ExchangeError(
                        ProtocolError("Connection aborted.", BadStatusLine("head too long"))
                    )
                chunk = sock.recv(_RECV_BYTES)
                if not chunk:
                    if buf:
                        raise _ExchangeError(
                            ProtocolError("Connection aborted.", BadStatusLine(repr(buf[:100])))
                        )
                    raise _ExchangeError(
                        ProtocolError(
                            "Connection aborted.",
                            RemoteDisconnected("Remote end closed connection without response"),
                        )
                    )
                buf += chunk
        except TimeoutError:
            raise _ExchangeError(
                ReadTimeoutError(pool, url, f"Read timed out. (read timeout={read_timeout})")
            ) from None
        except OSError as exc:
            raise _ExchangeError(ProtocolError("Connection aborted.", exc)) from None
        lines = buf[:end].split(b"\r\n")
        rest = buf[end + 4 :]
        parts = lines[0].split(None, 2)
        if (
            len(parts) < 2
            or not parts[0].startswith(b"HTTP/1.")
            or len(parts[1]) != 3
            or not parts[1].isdigit()
        ):
            bad = str(lines[0] + b"\r\n", "iso-8859-1")
            raise _ExchangeError(ProtocolError("Connection aborted.", BadStatusLine(bad)))
        status = int(parts[1])
        if 100 <= status < 200 and status != 101:
            buf = rest
            continue
        break
    reason = parts[2].decode("latin-1").strip() if len(parts) > 2 else ""
    length: int | None = None
    chunked = False
    close = parts[0] == b"HTTP/1.0"
    encoding = b""
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        name = name.strip().lower()
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                raise _ExchangeError(
                    ProtocolError("Connection aborted.", BadStatusLine(repr(line)))
                ) from None
            if length < 0:  # as http.client: no length, read to the end
                length = None
        elif name == b"transfer-encoding":
            chunked = value.strip().lower() == b"chunked"
        elif name == b"connection":
            tokens = {t.strip().lower() for t in value.split(b",")}
            if b"close" in tokens:
                close = True
            elif b"keep-alive" in tokens:
                close = False
        elif name == b"content-encoding":
            encoding = value.strip().lower()
    try:
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            content, rest = b"", rest
        elif chunked:
            content, rest = _read_chunked(sock, rest)
        elif length is not None:
            if len(rest) >= length:
                content, rest = rest[:length], rest[length:]
            else:  # read the rest straight into its place
                body = bytearray(length)
                got = len(rest)
                body[:got] = rest
                view = memoryview(body)
                while got < length:
                    n = sock.recv_into(view[got:], length - got)
                    if not n:
                        raise _ExchangeError(
                            ProtocolError(
                                f"Connection broken: IncompleteRead({got} bytes read, "
                                f"{length - got} more expected)",
                                IncompleteRead(bytes(body[:got]), length - got),
                            )
                        )
                    got += n
                view.release()
                content, rest = bytes(body), b""
        else:  # delimited by the end of the connection
            pieces = [rest]
            while chunk := sock.recv(_RECV_BYTES):
                pieces.append(chunk)
            content, rest, close = b"".join(pieces), b"", True
    except TimeoutError:
        raise _ExchangeError(
            ReadTimeoutError(pool, url, f"Read timed out. (read timeout={read_timeout})")
        ) from None
    except OSError as exc:
        raise _ExchangeError(ProtocolError(f"Connection broken: {exc!r}", exc)) from None
    if encoding in (b"gzip", b"x-gzip", b"deflate") and content:
        content = _decode(content, encoding)
    return status, reason, content, not close and not rest


def _read_chunked(sock: Any, first: bytes) -> tuple[bytes, bytes]:
    """The body of a chunked response whose first bytes are `first`; and what follows it."""
    pieces: list[bytes] = []
    buf = bytearray(first)

    def more() -> None:
        chunk = sock.recv(_RECV_BYTES)
        if not chunk:
            raise _ExchangeError(ProtocolError("Connection broken: incomplete chunked body"))
        buf.extend(chunk)

    def line() -> bytes:
        while (end := buf.find(b"\r\n")) < 0:
            more()
        got = bytes(buf[:end])
        del buf[: end + 2]
        return got

    while True:
        size_line = line().split(b";", 1)[0].strip()
        try:
            size = int(size_line, 16)
        except ValueError:
            raise _ExchangeError(
                ProtocolError(f"Connection broken: invalid chunk length {size_line!r}")
            ) from None
        if size == 0:
            while line():  # trailers, up to the empty line
                pass
            return b"".join(pieces), bytes(buf)
        while len(buf) < size + 2:
            more()
        pieces.append(bytes(buf[:size]))
        del buf[: size + 2]


def _decode(content: bytes, encoding: bytes) -> bytes:
    """A gzip or deflate body, decompressed (as urllib3 does)."""
    try:
        if encoding == b"deflate":
            try:
                return zlib.decompress(content)
            except zlib.error:
                return zlib.decompress(content, -zlib.MAX_WBITS)
        return zlib.decompress(content, 16 + zlib.MAX_WBITS)
    except zlib.error as exc:
        raise _ExchangeError(
            urllib3.exceptions.DecodeError(
                "Received response with content-encoding: "
                f"{encoding.decode('latin-1')}, but failed to decode it.",
                exc,
            )
        ) from None


class HttpBackend(Backend):
    """Backend over HTTP: `HttpBackend("http://host:8008", token=...)`."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        timeout_s: float = 30.0,
        connect_timeout_s: float = 5.0,
        retries: int = 3,
        backoff_s: float = 0.1,
    ) -> None:
        """`timeout_s` bounds each answer (claims add their `wait_s`); `retries` is how
        often a failed *connection* is retried, with exponential backoff from `backoff_s`."""
        if not url.startswith(("http://", "https://")):
            raise InvalidInputError(f"not an HTTP URL: {url!r} (use http://host:port)", field="url")
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.retries = retries
        retry = Retry(
            total=retries,
            connect=retries,
            read=0,
            status=0,
            other=0,
            redirect=0,
            backoff_factor=backoff_s,
            allowed_methods=None,
            raise_on_status=False,
            raise_on_redirect=False,
        )
        parts = urlsplit(self.url)
        if not parts.hostname:
            raise InvalidInputError(f"no host in the API URL {url!r}", field="url")
        self._base_path = parts.path.rstrip("/") + "/api/v1"
        # One pool per backend (thread-safe); extra connections beyond maxsize are
        # opened when many threads call at once and closed after use.
        self._pool = urllib3.connection_from_url(
            self.url, maxsize=16, block=False, retries=retry, headers=None
        )
        self._headers = {"Accept": "application/json", "User-Agent": "conveyor-client"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._json_headers = {**self._headers, "Content-Type": "application/json"}
        self._fast: _FastExchange | None = None
        self._fast_json: _FastExchange | None = None
        if hasattr(self._pool, "_get_conn") and hasattr(self._pool, "_put_conn"):
            try:
                self._fast = _FastExchange(self._pool, self._headers)
                self._fast_json = _FastExchange(self._pool, self._json_headers)
            except (ValueError, UnicodeError):
                self._fast = self._fast_json = None  # urllib3 says what is wrong, per call

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
        headers = self._headers
        fast = self._fast
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
            headers = self._json_headers
            fast = self._fast_json
        url = self._base_path + path
        if params:
            url += "?" + urlencode(params, doseq=True)
        read_timeout = read_timeout_s or self.timeout_s
        if fast is not None:
            try:
                answer = fast.exchange(method, url, data, read_timeout, self.connect_timeout_s)
            except _ExchangeError as exc:
                raise BackendUnavailableError(self._unreachable(exc.error, read_timeout)) from None
            if answer is not None:
                status, reason, content = answer
                if status == 204:
                    return None
                if status < 400:
                    return content
                self._raise(status, content, reason)
        timeout = urllib3.Timeout(connect=self.connect_timeout_s, read=read_timeout)
        try:
            resp = self._pool.urlopen(
                method,
                url,
                body=data,
                headers=headers,
                timeout=timeout,
                preload_content=True,
                assert_same_host=False,
            )
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise BackendUnavailableError(self._unreachable(exc, read_timeout)) from None
        status = resp.status
        if status == 204:
            return None
        if status < 400:
            return resp.data
        self._raise(status, resp.data, resp.reason)
        return None  # unreachable

    def _unreachable(self, exc: BaseException, read_timeout: float) -> str:
        """The one-line message of a request that got no answer."""
        reason = _reason(exc)
        inner = exc.reason if isinstance(exc, MaxRetryError) else exc
        if _is_connect_error(exc):
            tries = self.retries + 1
            suffix = f" (tried {tries} times)" if tries > 1 else ""
        elif isinstance(inner, ReadTimeoutError):
            reason, suffix = f"no answer within {read_timeout:g}s", ""
        else:
            reason, suffix = f"connection lost before the answer ({reason})", ""
        return f"cannot reach the Conveyor API at {self.url}: {reason}{suffix}"

    def _raise(self, status: int, content: bytes, reason: str | None) -> None:
        try:
            body = pydantic_core.from_json(content) if content else None
        except ValueError:
            body = None
        if not isinstance(body, dict) or "error" not in body:
            text = " ".join(content.decode(errors="replace").split())[:300]
            message = f"HTTP {status} from the Conveyor API at {self.url}: {text or reason or ''}"
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

    def delete_task(self, task_id: str, *, force: bool = False) -> None:
        """Delete a task with its log and scalars. An active task needs `force`."""
        self._call(
            "DELETE", f"/tasks/{_p(task_id)}", params={"force": "true" if force else "false"}
        )

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

    # ----------------------------------------------------------- logs/metrics
    def append_log(self, task_id: str, lines: Sequence[LogLine | Mapping[str, Any] | str]) -> int:
        """Append lines to a task's log; returns the log's new length in lines."""
        if isinstance(lines, (str, bytes)):
            lines = [lines]
        body = {"lines": [self._plain(line) for line in lines]}
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
        try:
            read_timeout = min(float(wait_s), MAX_CLAIM_WAIT_S) + self.timeout_s
        except (TypeError, ValueError):
            read_timeout = self.timeout_s
        return _TASKS.validate_json(self._call("POST", "/tasks/wait", body, read_timeout_s=read_timeout))

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
        try:
            read_timeout = min(float(wait_s), MAX_CLAIM_WAIT_S) + self.timeout_s
        except (TypeError, ValueError):
            read_timeout = self.timeout_s  # the server refuses the bad wait_s
        content = self._call("POST", "/claim", body, read_timeout_s=read_timeout)
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
        self._pool.close()
