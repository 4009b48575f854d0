"""One notifier for everything that waits on the store: claims and status waits.

Every status change is published as a `StatusEvent` (task id, new status, queue):

- changes made by this process are published by the store itself, once their
  transaction has committed;
- on PostgreSQL a trigger sends a NOTIFY for every status change in the database
  (`schema.NOTIFY_CHANNEL`), and one LISTEN thread per process publishes those made by
  other processes (the echoes of this process's own connections are skipped);
- on SQLite other processes cannot be heard: waiters also re-check the database every
  `SQLITE_POLL_INTERVAL_S`.

Waiters watch keys (a queue name for claims, task ids for status waits) and are woken
when an event names one of them. Enqueue listeners (the API server's `ClaimWaker`) are
called with the queue name of every task enqueued, in this process or another.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from controller.store.engine import is_sqlite, normalize_url, psycopg_connect_args
from controller.store.schema import NOTIFY_CHANNEL

log = logging.getLogger(__name__)

#: How often a waiter on SQLite re-checks the database (other processes' changes).
SQLITE_POLL_INTERVAL_S = 0.01
#: Pause before the LISTEN connection is opened again after it was lost.
LISTEN_RECONNECT_S = 1.0
_QUEUED = "queued"


@dataclass(frozen=True)
class StatusEvent:
    """A task changed status (to `status`; `queue` is its queue, if any)."""

    task_id: str
    status: str
    queue: str | None


def queue_key(queue: str) -> str:
    """The key a claimer on `queue` watches."""
    return f"q:{queue}"


def task_key(task_id: str) -> str:
    """The key a status waiter on `task_id` watches."""
    return f"t:{task_id}"


class Watch:
    """A waiter's registration: woken when an event names one of its keys."""

    def __init__(self, keys: frozenset[str]) -> None:
        self.keys = keys
        self._event = threading.Event()

    def wait(self, timeout_s: float) -> bool:
        """Wait until woken or `timeout_s` passed; True if woken. Clears the wake-up."""
        woken = self._event.wait(timeout_s)
        self._event.clear()
        return woken

    def wake(self) -> None:
        """Wake the waiter."""
        self._event.set()


class Notifier:
    """Publishes status events to watchers and enqueue listeners, from any process."""

    def __init__(self, url: str) -> None:
        self._url = normalize_url(url)
        self.cross_process = not is_sqlite(self._url)
        #: Seconds a waiter may sleep before re-checking the database itself: short on
        #: SQLite (other processes are not heard), unbounded where they are.
        self.poll_interval_s = SQLITE_POLL_INTERVAL_S if not self.cross_process else float("inf")
        self._lock = threading.Lock()
        self._watches: dict[str, set[Watch]] = {}
        self._enqueue_listeners: list[Callable[[str], None]] = []
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        #: PostgreSQL backend PIDs of this process's own connections: their changes were
        #: already published here, so their NOTIFY echoes are skipped.
        self.own_backend_pids: set[int] = set()

    # ------------------------------------------------------------- waiting
    @contextlib.contextmanager
    def watch(self, keys: Iterable[str]) -> Iterator[Watch]:
        """Register a watch on `keys` for the block (register, then check the database,
        then wait: an event between the check and the wait is not lost)."""
        watch = Watch(frozenset(keys))
        self.listen()
        with self._lock:
            for key in watch.keys:
                self._watches.setdefault(key, set()).add(watch)
        try:
            yield watch
        finally:
            with self._lock:
                for key in watch.keys:
                    watchers = self._watches.get(key)
                    if watchers is not None:
                        watchers.discard(watch)
                        if not watchers:
                            del self._watches[key]

    def add_enqueue_listener(self, callback: Callable[[str], None], *, listen: bool = True) -> None:
        """Call `callback(queue_name)` for every task enqueued (other processes too on
        PostgreSQL, once `listen()` ran; `listen=True` runs it now)."""
        with self._lock:
            self._enqueue_listeners.append(callback)
        if listen:
            self.listen()

    def remove_enqueue_listener(self, callback: Callable[[str], None]) -> None:
        """Stop calling `callback`."""
        with self._lock, contextlib.suppress(ValueError):
            self._enqueue_listeners.remove(callback)

    # ---------------------------------------------------------- publishing
    def publish(self, event: StatusEvent) -> None:
        """Wake the watchers of the event's task (and queue, for an enqueue) and call
        the enqueue listeners."""
        keys = [task_key(event.task_id)]
        enqueued = event.status == _QUEUED and event.queue
        if enqueued:
            keys.append(queue_key(event.queue))
        with self._lock:
            woken = [w for key in keys for w in self._watches.get(key, ())]
            listeners = list(self._enqueue_listeners) if enqueued else []
        for watch in woken:
            watch.wake()
        for callback in listeners:
            try:
                callback(event.queue)
            except Exception:  # a broken listener must not break the change
                log.exception("enqueue listener failed")

    def wake_all(self) -> None:
        """Wake every watcher (events may have been missed: they re-check)."""
        with self._lock:
            woken = [w for watchers in self._watches.values() for w in watchers]
        for watch in woken:
            watch.wake()

    # ------------------------------------------------------ other processes
    def listen(self) -> None:
        """Start hearing other processes' changes (PostgreSQL; idempotent).

        Only processes that wait listen: every listening connection is woken by every
        status change in the database."""
        if self._thread is not None or not self.cross_process:
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._listen, name="conveyor-pg-listen", daemon=True)
                self._thread.start()

    def close(self) -> None:
        """Stop the LISTEN thread."""
        self._stopping.set()

    def _listen(self) -> None:
        import psycopg

        cargs, cparams = psycopg_connect_args(self._url)
        while not self._stopping.is_set():
            try:
                with psycopg.connect(*cargs, **cparams, autocommit=True) as conn:
                    conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    own_schema = conn.execute("SELECT current_schema()").fetchone()[0]
                    self.wake_all()  # changes before the LISTEN took effect were not heard
                    while not self._stopping.is_set():
                        for notify in conn.notifies(timeout=1.0):
                            if notify.pid in self.own_backend_pids:
                                continue
                            event = _parse(notify.payload, own_schema)
                            if event is _ELSEWHERE:
                                continue
                            if event is None:
                                log.warning("unreadable status notification %r", notify.payload)
                                self.wake_all()
                            else:
                                self.publish(event)
            except Exception as exc:  # reconnect after a lost connection
                if self._stopping.is_set():
                    return
                log.warning("LISTEN connection lost (%s); reconnecting", exc)
                time.sleep(LISTEN_RECONNECT_S)


_ELSEWHERE = StatusEvent("", "", None)


def _parse(payload: str, own_schema: str) -> StatusEvent | None:
    """The event a NOTIFY payload names (JSON: schema, id, status, queue): `_ELSEWHERE`
    for a change in another store of the database (another schema), None if unreadable."""
    try:
        data = json.loads(payload)
        if data.get("schema") != own_schema:
            return _ELSEWHERE
        return StatusEvent(task_id=str(data["id"]), status=str(data["status"]), queue=data.get("queue"))
    except (ValueError, KeyError, TypeError):
        return None
