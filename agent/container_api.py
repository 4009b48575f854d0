"""How a step in a container reaches the control plane: the `CONVEYOR_API` it gets.

`ContainerApi.endpoint_for(api_url, token, client, network_mode)` says what a container
gets as `CONVEYOR_API` / `CONVEYOR_API_TOKEN`, and which `--add-host` entry makes that
URL resolve. Everything here is a standard mechanism: the agent never enters a
container's namespaces and never serves the store from inside its own process.

Decisions:

- **An http(s) API on another host** is handed over as it is: containers route to it
  like the agent does. Nothing to serve or relay.
- **A database URL** (the embedded SQLite store, or PostgreSQL): the agent starts the
  public API server, `python -m controller.server` (what `controller serve` runs), as a
  child process over the same store URL, once per agent at its first container step. It
  listens on the docker bridge's gateway address (the host's side of `docker0`, see
  `bridge_gateway`) on a free port, with a random token (passed in the child's
  environment, never on its command line) that only this agent's containers get; the
  agent waits for its `/health` before any container uses it. The database is not
  mounted into containers: SQLite over a bind mount breaks with a lost agent, and the
  server keeps the same contract as every other transport. Artifacts of such steps go
  to the files area the agent mounts (see `agent.environments.docker`). The server runs
  in its own session (a Ctrl-C to the agent's terminal does not cut running steps off),
  is registered with the agent's watchdog (an agent killed by SIGKILL takes it along)
  and is stopped and reaped when the agent process exits (`close`, run at exit). If it
  dies, the next container step starts a new one. Its output goes to
  `CONVEYOR_HOME/logs/container-api-<agent pid>.log`.
- **An http(s) API on the host's loopback** (`http://127.0.0.1:8008`, the default of
  `controller serve`) cannot be reached from a container's network namespace. The agent
  forwards it: a TCP relay listening on the bridge gateway address (a free port, shared
  by the agent's containers, bytes copied as they are, so tokens, long polls and the
  files endpoint behave as on the host). This keeps `controller serve` with its default
  `--host` working for container steps. The container's URL names the relay
  (`http://host.docker.internal:<relay port>`). Artifacts and models such a step stores
  on the files endpoint are recorded as `conveyor://files/...` references, not by that
  address, so other machines and the host read them through their own `CONVEYOR_API`.
- **The name.** Containers get `--add-host host.docker.internal:<gateway address>` (the
  address the agent's server or relay listens on, not the engine's `host-gateway`
  setting, which may name another one) and `CONVEYOR_API=http://host.docker.internal:PORT`.
  Containers on user-defined networks reach the gateway address through the host too.
- **`--network host`**: the host's loopback is the container's, so a loopback API is
  handed over as it is; a database URL gets the agent's server as above.
  **`--network container:<id>`** cannot take `--add-host`: the URL names the gateway
  address itself. **`--network none`** fails the task (setup_failed) naming the option:
  such a step could not reach the control plane.
- **Exposure.** The server and the relays listen on the bridge address, reachable from
  the host and from every container on the engine's networks (normally not from other
  machines).
  The agent's server requires its token; a relayed API is exactly as open as the API
  the agent was given.
"""

from __future__ import annotations

import atexit
import ipaddress
import logging
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import psutil

import controller
from agent.environments.errors import ContainerError
from agent.watchdog import guard_process_group, release_process_group
from controller.connect import backend_from_url, conveyor_home
from controller.errors import ConveyorError

log = logging.getLogger(__name__)

#: The name containers use for the host (an `--add-host` entry naming the gateway address).
HOST_NAME = "host.docker.internal"
#: Seconds the agent's API server gets to answer /health after it starts.
SERVER_START_TIMEOUT_S = 30.0
#: Seconds the agent's API server gets to exit after SIGTERM before SIGKILL.
SERVER_STOP_TIMEOUT_S = 10.0
#: Times the server is started on a new port when the one picked was taken meanwhile.
_SERVER_START_ATTEMPTS = 3
_LOOPBACK_NAMES = {"localhost", "ip6-localhost"}
_RELAY_BUFFER_BYTES = 64 * 1024


class ContainerApiError(ContainerError):
    """The control plane cannot be made reachable from a container."""

    code = "container_api_unavailable"


@dataclass(frozen=True)
class ApiEndpoint:
    """What a container gets: its API URL and token, and `--add-host` entries for it."""

    url: str
    token: str | None
    extra_hosts: tuple[tuple[str, str], ...] = ()


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


def _free_port(host: str) -> int:
    """A TCP port on `host` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class Relay:
    """Accepts on `sock` and copies each connection's bytes to and from `target`."""

    def __init__(self, sock: socket.socket, target: tuple[str, int]) -> None:
        self.sock = sock
        self.target = target
        self.port = int(sock.getsockname()[1])
        self._closed = False
        threading.Thread(target=self._accept, name="api-relay", daemon=True).start()

    def close(self) -> None:
        """Stop accepting (open connections end with their container)."""
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
            while data := src.recv(_RELAY_BUFFER_BYTES):
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


class ApiServerProcess:
    """`python -m controller.server` over `db_url` on `host`, as a child of the agent."""

    def __init__(self, db_url: str, host: str) -> None:
        self.db_url = db_url
        self.host = host
        self.token = secrets.token_urlsafe(24)
        self.log_path = conveyor_home() / "logs" / f"container-api-{os.getpid()}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log: IO[bytes] = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        try:
            for attempt in range(_SERVER_START_ATTEMPTS):
                if self._start(_free_port(host)):
                    return
                log.warning("the agent's API server for containers exited at start "
                            "(attempt %d); retrying on another port", attempt + 1)
        except BaseException:
            self.stop()
            raise
        self.stop()
        raise ContainerApiError(
            f"the agent's API server for containers did not start (see {self.log_path})"
        )

    @property
    def url(self) -> str:
        """Where the server answers, from the host and from containers."""
        return f"http://{self.host}:{self.port}"

    def alive(self) -> bool:
        """True while the server process runs."""
        return self.proc is not None and self.proc.poll() is None

    def _start(self, port: int) -> bool:
        """Run the server on `port`; True once it answers /health, False if it exited."""
        sdk_root = str(Path(controller.__file__).resolve().parent.parent)  # the agent's own
        env = dict(os.environ, CONVEYOR_API_TOKEN=self.token)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [sdk_root, env.get("PYTHONPATH")]))
        self.port = port
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "controller.server", "--host", self.host, "--port", str(port),
             "--db", self.db_url, "--log-level", "warning"],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,  # the agent's terminal signals must not stop it early
        )
        guard_process_group(self.proc.pid)  # removed with the agent, even on SIGKILL
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        backend = backend_from_url(self.url, token=self.token)
        try:
            while self.proc.poll() is None:
                try:  # a cheap TCP connect until it listens, then its /health
                    socket.create_connection((self.host, port), timeout=1).close()
                    backend.health()
                    return True
                except (OSError, ConveyorError):
                    pass
                if time.monotonic() > deadline:
                    raise ContainerApiError(
                        f"the agent's API server for containers did not answer within "
                        f"{SERVER_START_TIMEOUT_S:g} s (see {self.log_path})"
                    )
                time.sleep(0.05)
        finally:
            backend.close()
        release_process_group(self.proc.pid)
        return False

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after `SERVER_STOP_TIMEOUT_S`; reaped, log closed."""
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(SERVER_STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            release_process_group(proc.pid)
        self._log.close()


class ContainerApi:
    """The API server and relays one agent process runs for its containers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._servers: dict[str, ApiServerProcess] = {}
        self._relays: dict[tuple[str, int], tuple[str, Relay]] = {}  # target: (gateway, relay)
        self._at_exit = False

    def endpoint_for(
        self, api_url: str, token: str | None, client: Any, network_mode: str | None = None
    ) -> ApiEndpoint:
        """The API a container on `network_mode` gets for the agent's `api_url`.

        `client` is the docker SDK client (for the bridge address). See the module
        docstring; ContainerApiError when the API cannot be made reachable.
        """
        if network_mode == "none":
            raise ContainerApiError(
                "docker_args --network none: the step could not reach the Conveyor API; "
                "use the default bridge network or a network of your own"
            )
        parsed = urllib.parse.urlsplit(api_url)
        if parsed.scheme in ("http", "https"):
            host = parsed.hostname or ""
            if not is_loopback_host(host) or network_mode == "host":
                return ApiEndpoint(api_url, token)
            target = (host, parsed.port or (443 if parsed.scheme == "https" else 80))
            with self._lock:
                gateway, port = self._relay(target, client)
        else:
            with self._lock:
                server = self._server(api_url, client)
                gateway, port, token = server.host, server.port, server.token
            parsed = urllib.parse.urlsplit(server.url)
        if network_mode is not None and network_mode.startswith("container:"):
            return ApiEndpoint(urllib.parse.urlunsplit(parsed._replace(
                netloc=f"{gateway}:{port}")), token)
        url = urllib.parse.urlunsplit(parsed._replace(netloc=f"{HOST_NAME}:{port}"))
        return ApiEndpoint(url, token, ((HOST_NAME, gateway),))

    def close(self) -> None:
        """Stop the relays and the API server (run at exit of the agent process)."""
        with self._lock:
            relays, self._relays = [relay for _, relay in self._relays.values()], {}
            servers, self._servers = list(self._servers.values()), {}
        for relay in relays:
            relay.close()
        for server in servers:
            server.stop()

    def _stop_at_exit(self) -> None:
        if not self._at_exit:
            self._at_exit = True
            atexit.register(self.close)

    def _server(self, db_url: str, client: Any) -> ApiServerProcess:
        server = self._servers.get(db_url)
        if server is not None and server.alive():
            return server
        if server is not None:
            log.warning("the agent's API server for containers exited (code %s); starting "
                        "a new one", server.proc.returncode if server.proc else None)
            server.stop()
        self._stop_at_exit()
        server = self._servers[db_url] = ApiServerProcess(db_url, bridge_gateway(client))
        log.info("serving the store to containers on %s (pid %s)", server.url,
                 server.proc.pid if server.proc else None)
        return server

    def _relay(self, target: tuple[str, int], client: Any) -> tuple[str, int]:
        if target in self._relays:
            gateway, relay = self._relays[target]
            return gateway, relay.port
        gateway = bridge_gateway(client)
        try:
            sock = socket.create_server((gateway, 0))
        except OSError as exc:
            raise ContainerApiError(
                f"cannot listen on the docker bridge address {gateway}: {exc}"
            ) from None
        self._stop_at_exit()
        relay = Relay(sock, target)
        self._relays[target] = (gateway, relay)
        log.info("relaying %s:%d to containers on %s:%d", *target, gateway, relay.port)
        return gateway, relay.port
