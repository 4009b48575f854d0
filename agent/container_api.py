"""How a step in a container reaches the control plane through an `http://` URL.

`ContainerApi.endpoint_for(api_url, token)` says what a container gets as
`CONVEYOR_API` / `CONVEYOR_API_TOKEN`; `ContainerApi.open_relay(pid, endpoint)` makes
that URL work inside the started container. Decisions:

- **An http(s) API on another host** is handed over as it is: containers route to it
  like the agent does. Nothing to relay.
- **A database URL** (the embedded SQLite store, or PostgreSQL): the agent serves it.
  `controller.server.create_app` over a SqlBackend of that URL runs in a uvicorn server
  on a thread of the agent, on the host's loopback (random port), with a random bearer
  token that only this agent's containers get. The database is not mounted into
  containers: SQLite over a bind mount breaks with a lost agent, and the server keeps
  the same contract as every other transport. Artifacts of such steps go to the files
  area the agent mounts (see `agent.environments.docker`), not to this ephemeral server.
- **An API on the host's loopback** (`http://127.0.0.1:8008`, or the server above)
  cannot be reached from a container's own network namespace. The agent opens a
  listening socket *inside the container's network namespace* on the very same
  loopback address and port (a short-lived thread `setns`-es into
  `/proc/<container pid>/ns/net`, binds, and ends; the socket stays in that namespace)
  and forwards each connection to the host's loopback, byte for byte. So the step sees
  exactly the agent's URL: tokens, long polls, the files endpoint and the URLs of
  uploaded artifacts are the same inside and outside, nothing is exposed on the docker
  bridge (other containers cannot reach it), and it works with any `--network`
  (`none` included; `host` needs no relay). The relay lives as long as the container.
  The container's bootstrap waits for `run/api-ready` before running anything, so the
  step never races the relay.
- **Without CAP_SYS_ADMIN** (an agent that is not root but in the docker group) `setns`
  is refused; then a relay on the docker bridge's gateway address (the host's side of
  `docker0`, a random port, shared by the agent's containers) forwards instead, and the
  container's URL names that address. Artifact URLs of the files endpoint then name it
  too: run agents as root, or use an API URL containers can reach.
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import os
import secrets
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

import psutil

from agent.environments.errors import ContainerError

log = logging.getLogger(__name__)

_LOOPBACK_NAMES = {"localhost", "ip6-localhost"}
_CLONE_NEWNET = 0x40000000
#: Seconds the embedded server gets to start answering.
SERVER_START_TIMEOUT_S = 30.0
_RELAY_BUFFER = 64 * 1024


class ContainerApiError(ContainerError):
    """The control plane cannot be made reachable from a container."""

    code = "container_api_unavailable"


@dataclass(frozen=True)
class ApiEndpoint:
    """What a container gets, and the host loopback address to relay (None: nothing)."""

    url: str
    token: str | None
    relay_to: tuple[str, int] | None = None


def is_loopback_host(host: str) -> bool:
    """True for localhost names and loopback addresses."""
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bridge_gateway(client: Any) -> str:
    """The host's address on the engine's default bridge network."""
    try:
        configs = client.networks.get("bridge").attrs.get("IPAM", {}).get("Config") or []
    except Exception as exc:  # noqa: BLE001 - any engine error means: no bridge here
        raise ContainerApiError(f"cannot read the docker bridge network: {exc}") from None
    local = {a.address for addrs in psutil.net_if_addrs().values() for a in addrs
             if a.family == socket.AF_INET}
    for config in configs:
        gateway = (config.get("Gateway") or "").split("/")[0]
        if gateway in local:
            return gateway
        try:
            subnet = ipaddress.ip_network(config.get("Subnet", ""), strict=False)
        except ValueError:
            continue
        for address in sorted(local):
            if ipaddress.ip_address(address) in subnet:
                return address
    raise ContainerApiError(
        "the docker bridge network has no address on this machine (is the engine remote?): "
        "set CONVEYOR_API to an http:// URL the containers can reach"
    )


def _setns_allowed() -> bool:
    """True if this process may enter network namespaces (CAP_SYS_ADMIN)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open("/proc/self/ns/net", os.O_RDONLY)
    except OSError:
        return False
    try:
        return libc.setns(fd, _CLONE_NEWNET) == 0  # entering our own namespace: a no-op
    finally:
        os.close(fd)


def _listen_in_netns(pid: int, address: tuple[str, int]) -> socket.socket:
    """A listening socket on `address` inside the network namespace of process `pid`."""
    result: list[Any] = []

    def enter_and_bind() -> None:  # this thread never leaves the namespace: it just ends
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
            try:
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
            finally:
                os.close(fd)
            result.append(socket.create_server(address))
        except OSError as exc:
            result.append(exc)

    thread = threading.Thread(target=enter_and_bind, name="netns-bind", daemon=True)
    thread.start()
    thread.join(10)
    if not result or isinstance(result[0], Exception):
        why = result[0] if result else "timed out"
        raise ContainerApiError(
            f"cannot listen on {address[0]}:{address[1]} inside the container: {why}"
        )
    return result[0]


class Relay:
    """Accepts on `sock` and forwards each connection to `target` (threads per side)."""

    def __init__(self, sock: socket.socket, target: tuple[str, int]) -> None:
        self.sock = sock
        self.target = target
        self.port = sock.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, name="api-relay", daemon=True).start()

    def close(self) -> None:
        """Stop accepting (open connections end with the container)."""
        self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError as exc:
                log.warning("API relay cannot reach %s:%d: %s", *self.target, exc)
                client.close()
                continue
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(_RELAY_BUFFER):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            src.close()


class _EmbeddedServer:
    """`create_app` over a SqlBackend, served by uvicorn on a thread, on host loopback."""

    def __init__(self, db_url: str) -> None:
        import uvicorn

        from controller.server import create_app
        from controller.store import SqlBackend

        self.token = secrets.token_urlsafe(24)
        self.backend = SqlBackend(db_url)
        app = create_app(self.backend, self.token, lease_sweep_s=0)
        sock = socket.create_server(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", lifespan="on", access_log=False)
        self.server = uvicorn.Server(config)
        thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, name="api-server", daemon=True
        )
        thread.start()
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while not self.server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise ContainerApiError("the agent's API server for containers did not start")
            time.sleep(0.01)


class ContainerApi:
    """The embedded servers and relays of one agent process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._servers: dict[str, _EmbeddedServer] = {}
        self._bridge_relays: dict[tuple[str, int], Relay] = {}
        self._use_netns: bool | None = None

    def endpoint_for(self, api_url: str, token: str | None, client: Any) -> ApiEndpoint:
        """The API a container gets for the agent's `api_url` (see the module docstring)."""
        parsed = urllib.parse.urlsplit(api_url)
        with self._lock:
            if self._use_netns is None:
                self._use_netns = _setns_allowed()
                if not self._use_netns:
                    log.warning("cannot enter network namespaces (not root?): containers "
                                "reach the API through the docker bridge address")
            if parsed.scheme in ("http", "https"):
                host = parsed.hostname or ""
                if not is_loopback_host(host):
                    return ApiEndpoint(api_url, token)
                target = (host, parsed.port or (443 if parsed.scheme == "https" else 80))
                url = api_url
            else:
                server = self._servers.get(api_url)
                if server is None:
                    server = self._servers[api_url] = _EmbeddedServer(api_url)
                    log.info("serving %s to containers on 127.0.0.1:%d", api_url, server.port)
                target, token = ("127.0.0.1", server.port), server.token
                url = f"http://127.0.0.1:{server.port}"
                parsed = urllib.parse.urlsplit(url)
            if self._use_netns:
                return ApiEndpoint(url, token, target)
            relay = self._bridge_relays.get(target)
            if relay is None:
                gateway = bridge_gateway(client)
                try:
                    sock = socket.create_server((gateway, 0))
                except OSError as exc:
                    raise ContainerApiError(
                        f"cannot listen on the docker bridge address {gateway}: {exc}"
                    ) from None
                relay = self._bridge_relays[target] = Relay(sock, target)
            netloc = f"{bridge_gateway(client)}:{relay.port}"
            return ApiEndpoint(urllib.parse.urlunsplit(parsed._replace(netloc=netloc)), token)

    def open_relay(self, container_pid: int, endpoint: ApiEndpoint) -> Relay | None:
        """Make `endpoint.url` work inside the running container (None: nothing to do)."""
        if endpoint.relay_to is None:
            return None
        host, port = endpoint.relay_to
        bind_host = "127.0.0.1" if host.lower() in _LOOPBACK_NAMES else host
        return Relay(_listen_in_netns(container_pid, (bind_host, port)), endpoint.relay_to)
