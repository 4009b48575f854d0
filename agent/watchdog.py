"""A watchdog process that kills step process groups if the agent dies.

PR_SET_PDEATHSIG only reaches a step's own process, not its children. So each agent
process starts one small watchdog (lazily, at its first step) connected by a pipe, and
tells it the process group of every step it starts. If the agent dies, even by
SIGKILL, the kernel closes the pipe; the watchdog reads end-of-file and SIGKILLs every
group still registered, so no step process outlives its agent.

Protocol on the watchdog's stdin: `+PGID` registers a group, `-PGID` forgets it.
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


def _main() -> None:
    """Watchdog process: track groups until stdin closes, then kill the survivors."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    groups: set[int] = set()
    for raw in sys.stdin.buffer:
        line = raw.strip().decode(errors="replace")
        if line[:1] == "+" and line[1:].isdigit():
            groups.add(int(line[1:]))
        elif line[:1] == "-" and line[1:].isdigit():
            groups.discard(int(line[1:]))
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass


if __name__ == "__main__":
    _main()
