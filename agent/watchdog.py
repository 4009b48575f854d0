"""A watchdog process that kills step processes and containers if the agent dies.

PR_SET_PDEATHSIG only reaches a step's own process, not its children, and a container
is not the agent's child at all. So each agent process starts one small watchdog
(lazily, at its first step) connected by a pipe, and tells it the process group of
every step, every descendant process the step supervisor has seen (it re-scans the
step's tree every second, so a grandchild that called `setsid` and left the group is
known before the agent dies), and the id of every container it starts. If the agent
dies, even by SIGKILL, the kernel closes the pipe; the watchdog reads end-of-file,
SIGKILLs every group still registered and every registered process still alive (only
if its start time matches, so a reused PID is left alone) together with that
process's own descendants, and force-removes every container still registered
(docker SDK, same engine settings as the agent), so no step process outlives its
agent. The daemon also removes leftover containers of its worker id when it starts
(the watchdog itself may have been killed too, e.g. by the OOM killer or a reboot).

A cgroup per step would be exact, but needs a writable cgroup v2 hierarchy, which
hosts with a hybrid or read-only /sys/fs/cgroup (containers, CI) do not give; PID
tracking works everywhere psutil does.

Protocol on the watchdog's stdin: `+PGID` / `-PGID` register and forget a process
group, `+pPID:START` / `-pPID` a process (START: its psutil create_time), `+cID` /
`-cID` a container.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from typing import Any

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


def guard_process(pid: int, create_time: float) -> None:
    """Have process `pid` (started at `create_time`) killed if this process dies first."""
    _send(f"+p{pid}:{create_time!r}")


def release_process(pid: int) -> None:
    """The process is done with; stop guarding it."""
    _send(f"-p{pid}")


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


#: Two create_time readings of the same process differ by less than this.
_START_TOLERANCE_S = 0.05


def _find_processes(processes: dict[int, float]) -> list[Any]:
    """Registered processes still alive as registered (psutil.Process), with their descendants."""
    import psutil

    victims: dict[int, psutil.Process] = {}
    for pid, started in processes.items():
        try:
            proc = psutil.Process(pid)
            if abs(proc.create_time() - started) > _START_TOLERANCE_S:
                continue  # the PID was reused by an unrelated process
            victims[pid] = proc
            for child in proc.children(recursive=True):
                victims[child.pid] = child
        except psutil.Error:
            continue
    return list(victims.values())


def _main() -> None:
    """Watchdog process: track groups, processes and containers until stdin closes, then kill."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    groups: set[int] = set()
    processes: dict[int, float] = {}
    containers: set[str] = set()
    for raw in sys.stdin.buffer:
        line = raw.strip().decode(errors="replace")
        if line[:2] == "+p":
            pid, _, started = line[2:].partition(":")
            try:
                processes[int(pid)] = float(started)
            except ValueError:
                continue
        elif line[:2] == "-p" and line[2:].isdigit():
            processes.pop(int(line[2:]), None)
        elif line[:2] == "+c" and line[2:].isalnum():
            containers.add(line[2:])
        elif line[:2] == "-c":
            containers.discard(line[2:])
        elif line[:1] == "+" and line[1:].isdigit():
            groups.add(int(line[1:]))
        elif line[:1] == "-" and line[1:].isdigit():
            groups.discard(int(line[1:]))
    victims = _find_processes(processes) if processes else []  # before their parents die
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass
    for proc in victims:
        try:
            proc.kill()
        except Exception:  # noqa: BLE001 - gone already
            pass
    if containers:
        _remove_containers(containers)


if __name__ == "__main__":
    _main()
