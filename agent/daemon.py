"""The agent daemon: pull tasks from queues and run them, for months, unattended.

Read `AgentDaemon.run` top to bottom for the life of a daemon:

1. replay the outbox: final reports a previous run of this worker id (same
   CONVEYOR_HOME) wrote but could not deliver (`agent.outbox`); then register the
   worker (id `hostname:N`, see `default_worker_id`; retried while the control plane
   is unreachable), remove
   containers a killed predecessor of the same worker id left behind (with
   `--docker`), and start heartbeating;
2. while not asked to stop: wait for a free slot, long-poll `claim` on the queues (in
   the given order, or rotating with `order_fairness`), and hand each task to a thread
   running `executor.execute_task` (checkout → environment → run → report);
3. on SIGTERM/SIGINT: stop claiming, let running tasks finish for `shutdown_grace_s`,
   then stop them with reason "agent_shutdown"; a second signal stops them at once;
4. unregister. The fork servers (warm interpreters of the cached venvs,
   `agent.forkserver`, started by the first Python step of each venv) stop with it.

Heartbeats carry psutil resources and the current tasks: the tasks it runs, and the
tasks whose final report is still pending (a task's thread stays until its report is
acknowledged or refused, so both are `_running`); the store ends any other task it
holds for this worker. Their answer names tasks to abort (an abort requested through
the API), which the step supervisor notices within its 0.2 s poll. A heartbeat runs
every `HEARTBEAT_BUSY_S` while tasks run, so an abort is seen within 1 s, and every
`HEARTBEAT_IDLE_S` otherwise (a claim brings an idle wait forward, it does not send a
heartbeat of its own: the claim itself set the task's lease); after each, at most every `LEASE_SWEEP_EVERY_S`, the
daemon asks the store to fail tasks whose lease expired (`expire_leases`), so lost
agents are found even on an embedded store with no idle agent claiming.

Threads never die silently: the heartbeat and claim loops catch every error, log it in
one line with its type and go on with backoff; if a daemon thread dies anyway, the
daemon stops its tasks and `run` raises `DaemonThreadDiedError`, so the process exits
non-zero and systemd restarts it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import filelock
import psutil

from agent import forkserver
from agent.executor import ExecutionSettings, execute_task
from agent.outbox import Outbox
from controller.backend import Backend
from controller.errors import BackendUnavailableError, ConveyorError, NotFoundError
from controller.models import DEFAULT_LEASE_S, StatusReason, TaskRecord, TaskStatus

log = logging.getLogger("agent")

#: Longest single long-poll claim; bounds how long a stop request waits for the claim.
CLAIM_WAIT_S = 2.0
HEARTBEAT_BUSY_S = 0.5
HEARTBEAT_IDLE_S = 2.0
#: Longest wait between heartbeats while they fail (the back-off never exceeds it).
HEARTBEAT_MAX_BACKOFF_S = 3.0
#: A daemon sweeps expired leases at most this often (after a heartbeat).
LEASE_SWEEP_EVERY_S = 2.0
DEFAULT_SHUTDOWN_GRACE_S = 30.0
#: First and longest back-off while the control plane cannot be reached.
UNREACHABLE_RETRY_S = 0.5
UNREACHABLE_MAX_RETRY_S = 5.0


class DaemonThreadDiedError(ConveyorError):
    """A daemon thread (heartbeat) ended by an error: the daemon must be restarted."""


@dataclass
class RunningTask:
    """A task this daemon runs, and why it must stop (None: it need not)."""

    task: TaskRecord
    thread: threading.Thread | None = None
    abort_reason: str | None = None
    started: float = field(default_factory=time.monotonic)


def agents_dir(home: Path) -> Path:
    """Where running daemons leave their pid files."""
    return home / "agents"


def local_agents(home: Path) -> list[dict[str, Any]]:
    """Daemons of this CONVEYOR_HOME that are alive: [{worker_id, pid, queues, ...}]."""
    found = []
    for path in sorted(agents_dir(home).glob("*.json")):
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if psutil.pid_exists(info.get("pid", -1)):
            found.append(info)
        else:
            path.unlink(missing_ok=True)  # left by a daemon that was killed
    return found


#: Host-wide claims of home numbers (one file per number, naming its CONVEYOR_HOME).
HOST_REGISTRY_DIR = Path("/var/tmp/conveyor-worker-numbers")
#: Where a CONVEYOR_HOME keeps the number it was given.
HOME_NUMBER_FILE = "worker-number"


def _home_number_claims(registry: Path) -> Path:
    """The registry folder, writable by every user of the host (sticky, like /tmp);
    under the temp directory if `registry` cannot be made."""
    for folder in (registry, Path(tempfile.gettempdir()) / registry.name):
        try:
            if not folder.is_dir():
                folder.mkdir(parents=True, exist_ok=True)
                folder.chmod(0o1777)
            if os.access(folder, os.W_OK):
                return folder
        except OSError:
            continue
    raise ConveyorError(f"cannot make {registry} to number this host's agents: pass --worker-id")


def _claim_is_stale(claim: Path, number: int) -> bool:
    """True if the home named by `claim` is gone or no longer holds `number`."""
    try:
        home = Path(claim.read_text().strip())
        held = (home / HOME_NUMBER_FILE).read_text().strip()
    except OSError:
        return True
    return held != str(number)


def _claim(registry: Path, number: int, home: Path) -> bool:
    """Claim `number` for `home` in the host registry; False if another home holds it."""
    claim = registry / str(number)
    try:
        fd = os.open(claim, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        try:
            if Path(claim.read_text().strip()) == home:
                return True
        except OSError:
            return False
        if not _claim_is_stale(claim, number):
            return False
        tmp = registry / f".{number}.{os.getpid()}"
        tmp.write_text(str(home))
        os.replace(tmp, claim)  # a stale claim of a deleted home: take the number over
        return Path(claim.read_text().strip()) == home
    with os.fdopen(fd, "w") as out:
        out.write(str(home))
    return True


def home_number(home: Path, registry: Path = HOST_REGISTRY_DIR) -> int:
    """This CONVEYOR_HOME's number on this host: allocated once, then kept in the home.

    The first time, the lowest number no other home of this host holds is claimed in
    `registry` (a file per number naming its home; claims of deleted homes are taken
    over) and written to `home/worker-number`; later calls read it back (and renew the
    claim, e.g. after the registry was cleaned up).
    """
    home = Path(home).absolute()
    stored = home / HOME_NUMBER_FILE
    claims = _home_number_claims(registry)
    try:
        number = int(stored.read_text().strip())
    except (OSError, ValueError):
        number = None
    if number is not None:
        _claim(claims, number, home)  # renew; a clash after a cleanup keeps this home's id
        return number
    with filelock.FileLock(str(claims / ".lock"), timeout=30, mode=0o666):
        number = 0
        while not _claim(claims, number, home):
            number += 1
        home.mkdir(parents=True, exist_ok=True)
        stored.write_text(f"{number}\n")
    return number


def default_worker_id(home: Path, registry: Path = HOST_REGISTRY_DIR) -> str:
    """`hostname:N`, N being this CONVEYOR_HOME's number on this host (`home_number`).

    Agents of different homes on one host get different ids, and a daemon restarted
    with the same home gets its id back. A second daemon running at the same time in
    the same home gets `hostname:N.1` (then `.2`, ...: the lowest no live daemon uses).
    """
    base = f"{socket.gethostname()}:{home_number(home, registry)}"
    taken = {a["worker_id"] for a in local_agents(home)}
    candidate, extra = base, 0
    while candidate in taken or not _reserve(home, candidate):
        extra += 1
        candidate = f"{base}.{extra}"
    return candidate


def pid_file_path(home: Path, worker_id: str) -> Path:
    """The pid file of the daemon `worker_id` of this CONVEYOR_HOME."""
    return agents_dir(home) / f"{worker_id.replace(':', '_').replace('/', '_')}.json"


def _reserve(home: Path, worker_id: str) -> bool:
    """Take `worker_id` for this process by creating its pid file (False: already taken).

    Two daemons of one home starting at the same moment thus never pick the same id;
    the daemon overwrites the file with its details, and a file whose process is gone
    is removed by `local_agents`."""
    path = pid_file_path(home, worker_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as out:
        json.dump({"worker_id": worker_id, "pid": os.getpid(), "queues": []}, out)
    return True


def read_resources(home: Path) -> dict[str, Any]:
    """CPU, memory and disk figures for a heartbeat."""
    memory = psutil.virtual_memory()
    try:
        disk = psutil.disk_usage(str(home))
        disk_free_gb = round(disk.free / 2**30, 2)
        disk_percent = disk.percent
    except OSError:
        disk_free_gb = disk_percent = None
    return {
        "cpu_percent": psutil.cpu_percent(interval=None),
        "cpu_count": psutil.cpu_count(),
        "memory_percent": memory.percent,
        "memory_used_gb": round(memory.used / 2**30, 2),
        "memory_total_gb": round(memory.total / 2**30, 2),
        "disk_free_gb": disk_free_gb,
        "disk_percent": disk_percent,
        "load_avg": list(os.getloadavg()),
    }


class AgentDaemon:
    """A worker that claims tasks from queues and runs up to `concurrency` at once."""

    def __init__(
        self,
        backend: Backend,
        settings: ExecutionSettings,
        queues: Sequence[str],
        *,
        concurrency: int = 1,
        order_fairness: bool = False,
        shutdown_grace_s: float = DEFAULT_SHUTDOWN_GRACE_S,
        lease_s: float = DEFAULT_LEASE_S,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        self.backend = backend
        self.settings = settings
        self.queues = list(dict.fromkeys(queues))
        self.concurrency = concurrency
        self.order_fairness = order_fairness
        self.shutdown_grace_s = shutdown_grace_s
        self.lease_s = lease_s
        self._running: dict[str, RunningTask] = {}
        self._lock = threading.Lock()
        self._slot_free = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._immediate = threading.Event()
        self._heartbeat_wake = threading.Event()
        self._rotation = 0
        self._shutdown_deadline: float | None = None
        self._thread_died: str | None = None
        self._claim_retry_s = UNREACHABLE_RETRY_S
        self._last_sweep = 0.0

    @property
    def worker_id(self) -> str:
        """This daemon's worker id."""
        return self.settings.worker_id

    # ------------------------------------------------------------- the loop
    def run(self) -> None:
        """Replay the outbox, register, claim and run tasks until asked to stop, then
        shut down cleanly. Raises DaemonThreadDiedError if a daemon thread died."""
        self._replay_outbox()
        if not self._register_until_done():
            return
        if self.settings.fork_servers is None and forkserver.enabled():
            self.settings.fork_servers = forkserver.ForkServers(self.settings.api_url)
        self._remove_leftover_containers()
        heartbeat = self._guarded_thread(self._heartbeat_loop, "heartbeat")
        heartbeat.start()
        log.info("worker %s listening on queue(s) %s (concurrency %d)",
                 self.worker_id, ", ".join(self.queues), self.concurrency)
        try:
            while not self._stop.is_set():
                self._claim_and_start()
        finally:
            self._shutdown()
            if self.settings.fork_servers is not None:
                self.settings.fork_servers.stop_all()
            self._heartbeat_wake.set()
            heartbeat.join(timeout=5)
            self._unregister()
        if self._thread_died:
            raise DaemonThreadDiedError(f"daemon thread {self._thread_died} died: exiting so it is restarted")

    def register(self) -> None:
        """Register this worker (before it takes a task: registering ends the tasks a
        previous run of the same worker id still holds)."""
        self._register()

    def run_one(self, task: TaskRecord) -> TaskStatus | None:
        """Run one task this registered worker already holds, in the foreground
        (`agent execute`). Registering here would end the task (see `register`)."""
        heartbeat = self._guarded_thread(self._heartbeat_loop, "heartbeat")
        running = RunningTask(task=task)
        with self._lock:
            self._running[task.id] = running
        heartbeat.start()
        try:
            return execute_task(self.backend, task, self.settings, lambda: running.abort_reason,
                                give_up_report=lambda: running.abort_reason == StatusReason.agent_shutdown)
        finally:
            with self._lock:
                self._running.pop(task.id, None)
            self._stop.set()
            self._heartbeat_wake.set()
            heartbeat.join(timeout=5)
            self._unregister()

    def request_stop(self) -> None:
        """Stop claiming and shut down (first call), or stop running tasks now (second)."""
        if self._stop.is_set():
            log.warning("second stop request: stopping running tasks now")
            self._immediate.set()
            self._abort_all(StatusReason.agent_shutdown)
        else:
            log.info("stop requested: no new tasks; waiting up to %.0f s for running ones",
                     self.shutdown_grace_s)
            self._stop.set()
        with self._slot_free:
            self._slot_free.notify_all()

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT call `request_stop` (main thread only)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda _signum, _frame: self.request_stop())

    # ------------------------------------------------------------ claiming
    def _wait_for_free_slot(self) -> bool:
        with self._slot_free:
            if len(self._running) < self.concurrency:
                return True
            self._slot_free.wait(timeout=1.0)
            return False

    def _queue_order(self) -> list[str]:
        if not self.order_fairness or len(self.queues) < 2:
            return self.queues
        self._rotation = (self._rotation + 1) % len(self.queues)
        return self.queues[self._rotation :] + self.queues[: self._rotation]

    def _claim_and_start(self) -> None:
        """One turn of the claim loop: any error is logged in one line, then backed off."""
        try:
            if not self._wait_for_free_slot():
                return
            task = self._claim_next()
            if task is not None:
                self._start(task)
            self._claim_retry_s = UNREACHABLE_RETRY_S
            return
        except BackendUnavailableError as exc:
            log.warning("claim: %s (retrying in %.1f s)", exc, self._claim_retry_s)
        except NotFoundError as exc:
            log.error("claim: %s; waiting for it to be created (retrying in %.1f s)", exc, self._claim_retry_s)
        except Exception as exc:  # noqa: BLE001 - the claim loop must go on whatever happens
            log.error("claim failed: %s: %s (retrying in %.1f s)", type(exc).__name__, exc, self._claim_retry_s)
        self._stop.wait(self._claim_retry_s)
        self._claim_retry_s = min(self._claim_retry_s * 2, UNREACHABLE_MAX_RETRY_S)

    def _claim_next(self) -> TaskRecord | None:
        return self.backend.claim(
            self._queue_order(), self.worker_id, wait_s=CLAIM_WAIT_S, lease_s=self.lease_s
        )

    def _start(self, task: TaskRecord) -> None:
        running = RunningTask(task=task)
        if self._immediate.is_set():
            running.abort_reason = StatusReason.agent_shutdown
        thread = threading.Thread(
            target=self._run_task, args=(running,), name=f"task-{task.id[:8]}", daemon=True
        )
        running.thread = thread
        with self._lock:
            self._running[task.id] = running
        log.info("task %s (%s) claimed from queue %s", task.id, task.name, task.execution.queue)
        self._heartbeat_wake.set()
        thread.start()

    def _run_task(self, running: RunningTask) -> None:
        task = running.task
        try:
            status = execute_task(self.backend, task, self.settings, lambda: running.abort_reason,
                                  give_up_report=self._reports_abandoned)
            log.info("task %s ended: %s", task.id, status.value if status else "not reported")
        except Exception:  # noqa: BLE001 - keep the daemon alive whatever a task does
            log.exception("task %s crashed the executor", task.id)
        finally:
            with self._slot_free:
                self._running.pop(task.id, None)
                self._slot_free.notify_all()

    # ------------------------------------------------------------ shutdown
    def _shutdown(self) -> None:
        deadline = self._shutdown_deadline = time.monotonic() + self.shutdown_grace_s
        while True:
            with self._lock:
                threads = [r.thread for r in self._running.values() if r.thread]
            if not threads:
                return
            if self._immediate.is_set() or time.monotonic() >= deadline:
                self._abort_all(StatusReason.agent_shutdown)
            for thread in threads:
                thread.join(timeout=0.2)

    def _reports_abandoned(self) -> bool:
        """True once pending final reports stay in the outbox for the next start:
        an immediate stop, or the shutdown grace has passed."""
        if self._immediate.is_set():
            return True
        deadline = self._shutdown_deadline
        return deadline is not None and time.monotonic() >= deadline

    def _abort_all(self, reason: str) -> None:
        with self._lock:
            for running in self._running.values():
                running.abort_reason = running.abort_reason or reason

    # ---------------------------------------------------- worker lifecycle
    def _remove_leftover_containers(self) -> None:
        """Containers a killed predecessor with this worker id left behind go first."""
        if self.settings.docker is None:
            return
        from agent.environments.docker import remove_leftover_containers
        from agent.environments.errors import ContainerError

        try:
            client = self.settings.docker.engine.client()
            removed = remove_leftover_containers(client, self.worker_id)
        except ContainerError as exc:
            log.warning("%s: container tasks will fail until it is reachable", exc)
            return
        if removed:
            log.info("removed %d leftover container(s): %s", len(removed), ", ".join(removed))

    def _replay_outbox(self) -> None:
        """Deliver the final reports a previous run of this worker id left (before
        registering, which ends the previous run's tasks)."""
        outbox = Outbox(self.settings.home, self.worker_id)
        reports = outbox.pending()
        if reports:
            log.info("replaying %d pending final report(s) from %s", len(reports), outbox.path)
        for report in reports:
            if self._stop.is_set():
                return
            outbox.deliver(self.backend, report, self._stop.is_set)

    def _register_until_done(self) -> bool:
        """Register, retrying with back-off while the control plane is unreachable;
        False if a stop was requested first. Other refusals raise."""
        wait_s = UNREACHABLE_RETRY_S
        while not self._stop.is_set():
            try:
                self._register()
                return True
            except BackendUnavailableError as exc:
                log.warning("cannot register worker %s yet (retrying in %.1f s): %s",
                            self.worker_id, wait_s, exc)
            self._stop.wait(wait_s)
            wait_s = min(wait_s * 2, UNREACHABLE_MAX_RETRY_S)
        return False

    def _register(self) -> None:
        self.backend.register_worker(
            self.worker_id, hostname=socket.gethostname(), queues=self.queues, slots=self.concurrency
        )

    def _unregister(self) -> None:
        try:
            self.backend.unregister_worker(self.worker_id)
        except ConveyorError as exc:
            log.warning("could not unregister worker %s: %s", self.worker_id, exc)

    def _guarded_thread(self, target: Callable[[], None], name: str) -> threading.Thread:
        """A daemon thread whose death by an error stops the daemon (exit non-zero)."""

        def guarded() -> None:
            try:
                target()
            except BaseException as exc:  # noqa: BLE001 - reported, then the daemon stops
                log.critical("daemon thread %s died: %s: %s; stopping the daemon",
                             name, type(exc).__name__, exc, exc_info=True)
                self._thread_died = name
                self._stop.set()
                self._immediate.set()
                self._abort_all(StatusReason.agent_shutdown)
                with self._slot_free:
                    self._slot_free.notify_all()

        return threading.Thread(target=guarded, name=name, daemon=True)

    def _heartbeat_loop(self) -> None:
        psutil.cpu_percent(interval=None)  # prime: the next call measures since now
        failures = 0
        while True:
            with self._lock:
                current = list(self._running)
            done = self._stop.is_set() and not current
            if done:
                return
            if self._heartbeat(current):
                failures = 0
                self._sweep_leases()
            else:
                failures += 1
            self._wait_for_next_heartbeat(time.monotonic(), failures)

    def _wait_for_next_heartbeat(self, sent_at: float, failures: int) -> None:
        """Sleep until the next heartbeat is due: HEARTBEAT_BUSY_S after `sent_at` while
        tasks run, HEARTBEAT_IDLE_S otherwise (backing off after failures). A claim
        wakes this wait to shorten an idle period, not to send at once: a burst of
        short tasks costs one heartbeat per HEARTBEAT_BUSY_S, not one per task."""
        while True:
            with self._lock:
                busy = bool(self._running)
            if self._stop.is_set() and not busy:
                return
            period_s = HEARTBEAT_BUSY_S if busy else HEARTBEAT_IDLE_S
            if failures:
                period_s = min(period_s * 2**failures, max(period_s, HEARTBEAT_MAX_BACKOFF_S))
            remaining_s = sent_at + period_s - time.monotonic()
            if remaining_s <= 0:
                return
            self._heartbeat_wake.wait(remaining_s)
            self._heartbeat_wake.clear()

    def _sweep_leases(self) -> None:
        """Fail tasks whose lease expired (at most every LEASE_SWEEP_EVERY_S)."""
        now = time.monotonic()
        if now - self._last_sweep < LEASE_SWEEP_EVERY_S:
            return
        self._last_sweep = now
        try:
            expired = self.backend.expire_leases()
        except Exception as exc:  # noqa: BLE001 - a sweep is best effort; the next one retries
            log.warning("lease sweep failed: %s: %s", type(exc).__name__, exc)
            return
        if expired:
            log.info("lease sweep failed %d task(s) of lost workers: %s", len(expired), ", ".join(expired))

    def _heartbeat(self, current: list[str]) -> bool:
        """One heartbeat; True if the control plane answered it."""
        try:
            reply = self.backend.heartbeat(
                self.worker_id,
                resources=read_resources(self.settings.home),
                current_tasks=current,
                lease_s=self.lease_s,
            )
        except NotFoundError:
            log.warning("worker %s was forgotten by the control plane; registering again", self.worker_id)
            try:
                self._register()
            except Exception as exc:  # noqa: BLE001 - the next heartbeat tries again
                log.warning("cannot register again: %s: %s", type(exc).__name__, exc)
            return False
        except Exception as exc:  # noqa: BLE001 - the heartbeat loop must go on whatever happens
            log.warning("heartbeat failed: %s: %s", type(exc).__name__, exc)
            return False
        with self._lock:
            for task_id in reply.abort:
                running = self._running.get(task_id)
                if running is not None and running.abort_reason is None:
                    log.info("task %s: abort requested", task_id)
                    running.abort_reason = StatusReason.aborted
        return True
