"""Open the Backend a URL names: the one place that picks an implementation.

`CONVEYOR_API` selects the transport:

- unset → the embedded SQLite store `sqlite:///$CONVEYOR_HOME/conveyor.db`
  (`CONVEYOR_HOME` defaults to `~/.conveyor`);
- `sqlite:///path` or `postgresql://...` → `SqlBackend`, straight to the database;
- `http://host:port` → `HttpBackend`, to a `controller serve` process
  (token from `CONVEYOR_API_TOKEN`).

The implementations are imported when a URL asks for one, so importing this module
(or `controller.backend`, the interface) loads neither the store nor the HTTP client.
"""

from __future__ import annotations

import os
from pathlib import Path

from controller.backend import Backend
from controller.errors import InvalidInputError

#: URL schemes served by `SqlBackend` (straight to the database).
SQL_SCHEMES = ("sqlite:", "postgresql:", "postgresql+psycopg:", "postgres:")
#: URL schemes served by `HttpBackend` (a `controller serve` process).
HTTP_SCHEMES = ("http://", "https://")


def conveyor_home() -> Path:
    """The folder of the embedded store, caches and logs (`CONVEYOR_HOME`)."""
    return Path(os.environ.get("CONVEYOR_HOME") or Path.home() / ".conveyor").expanduser()


def default_api_url() -> str:
    """`CONVEYOR_API`, else the embedded SQLite file under CONVEYOR_HOME."""
    url = os.environ.get("CONVEYOR_API", "").strip()
    if url:
        return url
    return f"sqlite:///{conveyor_home() / 'conveyor.db'}"


def backend_from_url(url: str | None = None, *, token: str | None = None) -> Backend:
    """Open the Backend a URL names (default: `default_api_url()`).

    `token` (default `CONVEYOR_API_TOKEN`) is the bearer token of an http(s) URL.
    InvalidInputError for a URL no implementation serves, or an http(s) URL without a
    host or with a bad port.
    """
    url = url or default_api_url()
    if url.startswith(HTTP_SCHEMES):
        from controller.http_session import check_api_url

        check_api_url(url)
        from controller.client import HttpBackend

        return HttpBackend(url, token=token if token is not None else os.environ.get("CONVEYOR_API_TOKEN"))
    if url.startswith(SQL_SCHEMES):
        from controller.store import SqlBackend

        return SqlBackend(url)
    raise InvalidInputError(
        f"unsupported CONVEYOR_API {url!r}: use sqlite:///path, postgresql://... or http://host:port",
        field="CONVEYOR_API",
    )


_backends: dict[tuple[str, str | None], Backend] = {}


def get_backend() -> Backend:
    """The process-wide Backend for the current `CONVEYOR_API` (opened once, reused)."""
    key = (default_api_url(), os.environ.get("CONVEYOR_API_TOKEN"))
    backend = _backends.get(key)
    if backend is None:
        backend = _backends[key] = backend_from_url(key[0], token=key[1])
    return backend
