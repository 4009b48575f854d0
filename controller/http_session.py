"""How Conveyor talks HTTP to a `controller serve` process: one session builder, one
auth header, one way to say what went wrong.

Used by `HttpBackend` (the API, controller/client.py) and by the SDK's transfers to
and from the files endpoint (controller/sdk/storage.py), so both send the same token
the same way, retry the same failures and explain them in the same words.

- **Session.** A `requests.Session` with one `HTTPAdapter`: a pool of keep-alive
  connections per host (`POOL_SIZE`, enough for an agent's threads: slots, heartbeat,
  log pumps, pipeline launches; more threads at once still work, their extra
  connections are closed after use) and a `urllib3.util.Retry` that retries
  *connection* errors only, with exponential backoff. A request that reached the
  server is never sent twice: no read, status or redirect retries (claims and status
  reports are not idempotent).
- **Environment.** Proxy variables and the CA bundle (`REQUESTS_CA_BUNDLE`) are read
  once, when the session is built, instead of on every request; `~/.netrc` is not
  consulted, so it can never replace the API token.
- **Auth.** `Authorization: Bearer <token>` from `CONVEYOR_API_TOKEN` (or the token
  given), set once on the session.
- **Errors.** `failure_reason` turns a requests/urllib3 exception chain into a short
  human reason ("Connection refused"); `token_refused_message` says which variable to
  set when the server answers 401.
"""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError
from urllib3.util.retry import Retry

from controller.errors import InvalidInputError

#: Environment variable naming the API (`http://host:port`) or the store URL.
API_ENV = "CONVEYOR_API"
#: Environment variable holding the API token of an http(s) `CONVEYOR_API`.
TOKEN_ENV = "CONVEYOR_API_TOKEN"
#: Keep-alive connections kept per host (threads beyond it open short-lived ones).
POOL_SIZE = 16
#: Connection attempts retried before a request gives up.
CONNECT_RETRIES = 3
#: First backoff between connection attempts (doubles on each retry).
CONNECT_BACKOFF_S = 0.1
USER_AGENT = "conveyor-client"


def auth_header(token: str | None) -> dict[str, str]:
    """The header that carries an API token (empty without a token)."""
    return {"Authorization": f"Bearer {token}"} if token else {}


def connect_retry(retries: int = CONNECT_RETRIES, backoff_s: float = CONNECT_BACKOFF_S) -> Retry:
    """Retry connection errors `retries` times with backoff; never anything else."""
    return Retry(
        total=None,
        connect=retries,
        read=False,  # a read error means the server may have the request: re-raise it
        status=0,
        other=0,
        redirect=0,
        backoff_factor=backoff_s,
        raise_on_status=False,
        raise_on_redirect=False,
    )


def build_session(
    base_url: str,
    token: str | None = None,
    *,
    retries: int = CONNECT_RETRIES,
    backoff_s: float = CONNECT_BACKOFF_S,
    pool_size: int = POOL_SIZE,
) -> requests.Session:
    """A session for requests to `base_url`'s server, sending `token` as a Bearer token.

    The session is shared by threads (its connection pool is thread-safe); close it
    with `close()` or use it as a context manager.
    """
    session = requests.Session()
    adapter = HTTPAdapter(pool_connections=4, pool_maxsize=pool_size,
                          max_retries=connect_retry(retries, backoff_s))
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    # Proxies and CA bundle from the environment, once (see the module docstring).
    settings = session.merge_environment_settings(base_url, {}, None, None, None)
    session.trust_env = False
    session.proxies.update(settings["proxies"])
    session.verify = settings["verify"]
    session.cert = settings["cert"]
    session.headers.update({"User-Agent": USER_AGENT, "Accept": "application/json"})
    session.headers.update(auth_header(token))
    return session


def check_api_url(url: str) -> str:
    """`url` without trailing slashes if it is a usable http(s)://host[:port][/path] URL.

    Raises InvalidInputError naming the bad value (and `CONVEYOR_API`) otherwise.
    """
    def bad(problem: str) -> InvalidInputError:
        return InvalidInputError(
            f"invalid Conveyor API URL {url!r} ({API_ENV}): {problem}; use http://host:port",
            field=API_ENV,
        )

    if not url.startswith(("http://", "https://")):
        raise bad("not an http:// or https:// URL")
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # "Invalid IPv6 URL"
        raise bad(str(exc)) from None
    try:
        port = parts.port
    except ValueError:  # not a number, or out of range
        port_text = parts.netloc.rpartition("@")[2].rpartition(":")[2]
        raise bad(f"the port {port_text!r} is not a number from 1 to 65535") from None
    if not parts.hostname:
        raise bad("no host")
    if port == 0:
        raise bad("the port '0' is not a number from 1 to 65535")
    try:  # what requests itself refuses (invalid characters in the host, ...)
        requests.Request("GET", url).prepare()
    except (requests.RequestException, ValueError) as exc:
        raise bad(str(exc)) from None
    return url.rstrip("/")


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc` and the errors it wraps (args, `reason`, causes), outermost first."""
    found: list[BaseException] = []
    todo = [exc]
    while todo:
        err = todo.pop(0)
        if any(err is seen for seen in found):
            continue
        found.append(err)
        inner = [getattr(err, "reason", None), err.__cause__, err.__context__]
        inner += [arg for arg in err.args if isinstance(arg, BaseException)]
        todo += [e for e in inner if isinstance(e, BaseException)]
    return found


def is_connect_failure(exc: BaseException) -> bool:
    """True if the request never reached the server (no connection was made)."""
    return isinstance(exc, requests.ConnectTimeout) or any(
        isinstance(e, (NewConnectionError, ConnectTimeoutError)) for e in _chain(exc)
    )


def failure_reason(exc: BaseException) -> str:
    """The innermost, human-readable cause of a failed request, in one line."""
    chain = _chain(exc)
    for err in reversed(chain):
        if isinstance(err, socket.gaierror):
            return f"host name not found ({err.strerror or err})"
        if isinstance(err, OSError) and err.strerror:
            return err.strerror
    if isinstance(exc, requests.ReadTimeout):
        return "no answer in time"
    if isinstance(exc, requests.ConnectTimeout):
        return "connection timed out"
    text = str(chain[-1]) or type(chain[-1]).__name__
    return " ".join(text.split())


def token_refused_message(url: str, token_sent: bool) -> str:
    """What to do when the server at `url` answers 401 (missing or wrong token)."""
    problem = "refused the API token" if token_sent else "needs an API token"
    return (
        f"the Conveyor API at {url} {problem}: "
        f"set {TOKEN_ENV} to the token the server was started with"
    )
