"""Pure-ASGI middlewares of the API server: bearer-token auth, the body size limit, and
the answer to a bug (500 with an error id)."""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qsl, urlencode

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from controller.server.error_bodies import internal_error_body

#: Largest request body the server reads (64 MiB).
MAX_BODY_BYTES = 64 * 1024 * 1024
TOKEN_COOKIE = "conveyor_token"
TOKEN_QUERY_PARAM = "token"


async def send_json(
    send: Send, status: int, body: dict[str, Any], headers: list | None = None
) -> None:
    """Send a complete JSON response straight through ASGI."""
    payload = json.dumps(body).encode()
    raw_headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        *(headers or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": payload})


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value
    return None


class TokenAuthMiddleware:
    """Refuse every request without the API token (401).

    The token is accepted as `Authorization: Bearer <token>` or as the cookie
    `conveyor_token`, compared in constant time (`hmac.compare_digest`). A `?token=` query
    parameter counts only on the dashboard's entry pages (`entry_paths`, by default `/`),
    and only to be traded for the cookie: a GET with the right `?token=` is redirected to
    the same URL without it, setting the cookie (HttpOnly, SameSite=Strict, for this
    browser session), so the token leaves the address bar and the history after one
    visit. Anywhere else (the API, its schema, the assets) a token in the URL is ignored:
    URLs end up in proxy and access logs.

    Paths for which `is_page(path)` is true (the dashboard) are for browsers: without the
    token they get an HTML page (`unauthorized_page(wrong_token)`) saying how to pass it
    instead of the JSON error.
    """

    def __init__(
        self,
        app: ASGIApp,
        token: str,
        *,
        is_page: Callable[[str], bool] | None = None,
        unauthorized_page: Callable[[bool, str], bytes] | None = None,
        entry_paths: tuple[str, ...] = ("/",),
    ) -> None:
        self.app = app
        self._token = token.encode()
        self._is_page = is_page
        self._unauthorized_page = unauthorized_page
        self._entry_paths = entry_paths if is_page is not None else ()

    def _presented(self, scope: Scope) -> list[tuple[str, bytes]]:
        """(where, token) pairs the request carries: header, cookie, and (on an entry
        page only) query."""
        found: list[tuple[str, bytes]] = []
        auth = _header(scope, b"authorization")
        if auth:
            scheme, _, value = auth.partition(b" ")
            if scheme.lower() == b"bearer":
                found.append(("header", value.strip()))
        cookie = _header(scope, b"cookie")
        if cookie:
            try:
                morsel = SimpleCookie(cookie.decode("latin-1")).get(TOKEN_COOKIE)
            except Exception:  # a malformed cookie header is just no token
                morsel = None
            if morsel is not None:
                found.append(("cookie", morsel.value.encode()))
        query = scope.get("query_string", b"")
        if (
            query
            and scope.get("path", "") in self._entry_paths
            and scope.get("method") in ("GET", "HEAD")
            and TOKEN_QUERY_PARAM.encode() + b"=" in query
        ):
            for key, value in parse_qsl(query.decode("latin-1")):
                if key == TOKEN_QUERY_PARAM:
                    found.append(("query", value.encode()))
        return found

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        presented = self._presented(scope)
        valid = {where for where, t in presented if hmac.compare_digest(t, self._token)}
        is_page = (
            scope["type"] == "http"
            and self._is_page is not None
            and self._is_page(scope.get("path", ""))
        )
        if valid:
            if "query" in valid:
                await self._redirect_setting_cookie(scope, send)
                return
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 4401})
            return
        if is_page and self._unauthorized_page is not None:
            host = (_header(scope, b"host") or b"HOST:PORT").decode("latin-1")
            scheme = "https" if scope.get("scheme") == "https" else "http"
            page = self._unauthorized_page(bool(presented), f"{scheme}://{host}/")
            await send({"type": "http.response.start", "status": 401, "headers": [
                (b"content-type", b"text/html; charset=utf-8"),
                (b"content-length", str(len(page)).encode()),
                (b"cache-control", b"no-store"),
            ]})
            await send({"type": "http.response.body", "body": page})
            return
        await send_json(
            send,
            401,
            {
                "error": "unauthorized",
                "message": "missing or wrong API token: send 'Authorization: Bearer <token>' "
                "(a ?token= in the URL is not accepted here)",
            },
            [(b"www-authenticate", b'Bearer realm="conveyor"')],
        )

    async def _redirect_setting_cookie(self, scope: Scope, send: Send) -> None:
        cookie: SimpleCookie = SimpleCookie()
        cookie[TOKEN_COOKIE] = self._token.decode()
        morsel = cookie[TOKEN_COOKIE]
        morsel["path"] = "/"
        morsel["httponly"] = True
        morsel["samesite"] = "Strict"
        if scope.get("scheme") == "https":
            morsel["secure"] = True
        rest = [
            (k, v)
            for k, v in parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
            if k != TOKEN_QUERY_PARAM
        ]
        # Relative, so the redirect also works behind a proxy serving under a prefix.
        location = "./" + scope.get("path", "/").rsplit("/", 1)[-1]
        if rest:
            location += "?" + urlencode(rest)
        await send({"type": "http.response.start", "status": 303, "headers": [
            (b"location", location.encode("latin-1")),
            (b"set-cookie", morsel.OutputString().encode("latin-1")),
            (b"cache-control", b"no-store"),
            (b"content-length", b"0"),
        ]})
        await send({"type": "http.response.body", "body": b""})


def _too_large(size: int | None, limit: int) -> dict[str, Any]:
    got = f" ({size} bytes)" if size is not None else ""
    return {
        "error": "invalid_input",
        "message": f"request body too large{got}: the limit is {limit // (1024 * 1024)} MiB",
        "field": "body",
    }


class BodyLimitMiddleware:
    """Answer 413 to request bodies larger than `limit` bytes, before the app sees them.

    A declared Content-Length over the limit is refused without reading the body; a
    chunked body is buffered up to the limit and replayed to the app. Paths under
    `exempt_prefixes` (the streamed files endpoint, which has its own limit) pass as is.
    """

    def __init__(
        self, app: ASGIApp, limit: int = MAX_BODY_BYTES, exempt_prefixes: tuple[str, ...] = ()
    ) -> None:
        self.app = app
        self.limit = limit
        self.exempt_prefixes = exempt_prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (
            self.exempt_prefixes and scope.get("path", "").startswith(self.exempt_prefixes)
        ):
            await self.app(scope, receive, send)
            return
        length = _header(scope, b"content-length")
        if length is not None:
            try:
                size = int(length)
            except ValueError:
                size = -1
            if size > self.limit:
                await send_json(
                    send, 413, _too_large(size, self.limit), [(b"connection", b"close")]
                )
                return
            await self.app(scope, receive, send)
            return
        if scope.get("method") in ("GET", "HEAD", "DELETE", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        # No Content-Length (chunked): buffer the body up to the limit.
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body = message.get("body", b"")
            total += len(body)
            if total > self.limit:
                await send_json(
                    send, 413, _too_large(None, self.limit), [(b"connection", b"close")]
                )
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class InternalErrorMiddleware:
    """Answer an exception no handler took (a bug) with 500: a generic message and an
    error id, logged once with the traceback (`error_bodies.internal_error_body`).

    Outermost of the app's middlewares, so it also covers the others. The exception is
    not raised on to the server, which would log a second, id-less traceback; if the
    response had started already, it is (the server then drops the connection).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_noting_start(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_noting_start)
        except Exception as exc:
            body = internal_error_body(scope.get("method", ""), scope.get("path", ""), exc)
            if started:
                raise
            await send_json(send, 500, body)
