"""A watchdog process that kills step process groups and containers if the agent dies.

PR_SET_PDEATHSIG only reaches a step's own process, not its children, and a container
is not the agent's child at all. So each agent process starts one small watchdog
(lazily, at its first step) connected by a pipe, and tells it the process group of
every step and the id of every container it starts. If the agent dies, even by
SIGKILL, the kernel closes the pipe; the watchdog reads end-of-file, SIGKILLs every
group still registered and force-removes every container still registered (docker
SDK, same engine settings as the agent), so no step outlives its agent. The daemon
also removes leftover containers of its worker id when it starts (the watchdog itself
may have been killed too, e.g. by the OOM killer or a reboot).

Protocol on the watchdog's stdin: `+PGID` / `-PGID` register and forget a process
group, `+cID` / `-cID` a container.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

_lock = threading.Lock()
_watchdog: subprocess.Popen[bytes] | None = None


def _send(line: str) -> None:
    global _watchdog
    with _lock:
        if _watchdog is None or _watchdog.poll() is not None:
            _watchdog = subprocess.Popen(
                [sys.executable, "-m", "agent.watchdog"],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                start_new_session=True,  # a signal to the agent's group must not reach it
                close_fds=True,
            )
        assert _watchdog.stdin is not None
        try:
            _watchdog.stdin.write(f"{line}\n".encode())
            _watchdog.stdin.flush()
        except BrokenPipeError:
            _watchdog = None


def guard_process_group(pgid: int) -> None:
    """Have the group killed if this process dies before `release_process_group`."""
    _send(f"+{pgid}")


def release_process_group(pgid: int) -> None:
    """The group ended normally; stop guarding it."""
    _send(f"-{pgid}")


def guard_container(container_id: str) -> None:
    """Have the container removed if this process dies before `release_container`."""
    _send(f"+c{container_id}")


def release_container(container_id: str) -> None:
    """The container was removed normally; stop guarding it."""
    _send(f"-c{container_id}")


def _remove_containers(ids: set[str]) -> None:
    try:
        import docker

        client = docker.from_env(timeout=30)
    except Exception:  # noqa: BLE001 - no SDK or no engine: nothing we can do
        return
    for container_id in ids:
        try:
            client.api.remove_container(container_id, force=True, v=True)
        except Exception:  # noqa: BLE001 - already gone, or the engine is down
            pass


def _main() -> None:
    """Watchdog process: track groups and containers until stdin closes, then kill."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    groups: set[int] = set()
    containers: set[str] = set()
    for raw in sys.stdin.buffer:
        line = raw.strip().decode(errors="replace")
        if line[:2] == "+c" and line[2:].isalnum():
            containers.add(line[2:])
        elif line[:2] == "-c":
            containers.discard(line[2:])
        elif line[:1] == "+" and line[1:].isdigit():
            groups.add(int(line[1:]))
        elif line[:1] == "-" and line[1:].isdigit():
            groups.discard(int(line[1:]))
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass
    if containers:
        _remove_containers(containers)


if __name__ == "__main__":
    _main()
