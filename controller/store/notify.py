"""One notifier for everything that waits on the store: claims and status waits.

Every status change is published as a `StatusEvent` (task id, new status, queue):

- changes made by this process are published by the store itself, once their
  transaction has committed;
- on PostgreSQL a trigger sends a NOTIFY for every status change in the database
  (`schema.NOTIFY_CHANNEL`), and one LISTEN thread per process publishes those made by
  other processes (the echoes of this process's own connections are skipped);
- on SQLite, which has no NOTIFY, one thread per process (`_watch_sqlite`, only while
  something waits) reads `PRAGMA data_version` on a connection of its own every
  `SQLITE_POLL_INTERVAL_S`: SQLite changes that number on a connection whenever another
  connection committed, so one read of a few microseconds tells whether anything
  changed, in this process or another. When it changed, every watcher is woken and
  re-checks the database once; nothing changed costs the waiters nothing (they do not
  query the database on a timer). Waiters still re-check every `SQLITE_RECHECK_S` by
  themselves, should that thread have lost its connection.

Waiters watch keys (a queue name for claims, task ids for status waits) and are woken
when an event names one of them. Enqueue listeners (the API server's `ClaimWaker`) are
called with the queue name of every task enqueued, in this process or another.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from controller.store.engine import is_sqlite, normalize_url, psycopg_connect_args
from controller.store.schema import NOTIFY_CHANNEL

log = logging.getLogger(__name__)

#: How often, on SQLite, `PRAGMA data_version` is read while something waits (other
#: connections' commits: other processes, and this process's own connections).
SQLITE_POLL_INTERVAL_S = 0.005
#: Longest a waiter on SQLite sleeps before re-checking the database by itself (only
#: matters if the data_version thread cannot read the database).
SQLITE_RECHECK_S = 1.0
#: How long the data_version thread goes on reading after the last waiter left (a
#: waiter that comes back soon, like a claim loop, finds it still running).
SQLITE_IDLE_AFTER_S = 2.0
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
        #: Seconds a waiter may sleep before re-checking the database itself: a safety
        #: net on SQLite (see `_watch_sqlite`), unbounded on PostgreSQL (LISTEN).
        self.poll_interval_s = SQLITE_RECHECK_S if not self.cross_process else float("inf")
        self._lock = threading.Lock()
        self._watches: dict[str, set[Watch]] = {}
        self._enqueue_listeners: list[Callable[[str], None]] = []
        self._thread: threading.Thread | None = None
        #: The process that started `_thread` (a forked child starts its own).
        self._thread_pid = 0
        self._stopping = threading.Event()
        #: Set while a watch is registered (the SQLite thread reads only then).
        self._watched = threading.Event()
        #: PostgreSQL backend PIDs of this process's own connections: their changes were
        #: already published here, so their NOTIFY echoes are skipped.
        self.own_backend_pids: set[int] = set()

    # ------------------------------------------------------------- waiting
    @contextlib.contextmanager
    def watch(self, keys: Iterable[str]) -> Iterator[Watch]:
        """Register a watch on `keys` for the block (register, then check the database,
        then wait: an event between the check and the wait is not lost)."""
        watch = Watch(frozenset(keys))
        with self._lock:
            for key in watch.keys:
                self._watches.setdefault(key, set()).add(watch)
            self._watched.set()
        self.listen()
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
                if not self._watches:
                    self._watched.clear()

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
        """Start hearing other processes' changes (idempotent): the LISTEN thread on
        PostgreSQL, the data_version thread on SQLite.

        Only processes that wait listen: every listening connection is woken by every
        status change in the database."""
        if self._thread is not None and self._thread_pid == os.getpid():
            return
        with self._lock:
            if self._thread is None or self._thread_pid != os.getpid():  # none, or the parent's
                if self.cross_process:
                    target, name = self._listen, "conveyor-pg-listen"
                else:
                    target, name = self._watch_sqlite, "conveyor-sqlite-watch"
                self._thread_pid = os.getpid()
                self._thread = threading.Thread(target=target, name=name, daemon=True)
                self._thread.start()

    def close(self) -> None:
        """Stop the LISTEN / data_version thread."""
        self._stopping.set()
        self._watched.set()  # let an idle data_version thread see the stop

    def _watch_sqlite(self) -> None:
        """Wake every watcher when another connection committed (see the module
        docstring): `PRAGMA data_version` every SQLITE_POLL_INTERVAL_S while something
        waits, on a connection of this thread's own that never writes."""
        import sqlalchemy as sa

        engine = sa.create_engine(self._url, poolclass=sa.pool.NullPool)
        try:
            while not self._stopping.is_set():
                try:
                    self._follow_data_version(engine)
                except Exception as exc:  # a lost or unreadable database: waiters re-check
                    if self._stopping.is_set():
                        return
                    log.warning("cannot read the SQLite store's data_version (%s); retrying", exc)
                    self.wake_all()
                    self._stopping.wait(LISTEN_RECONNECT_S)
        finally:
            engine.dispose()

    def _follow_data_version(self, engine: Any) -> None:
        connection = engine.raw_connection()  # a DBAPI connection, autocommit: no snapshot kept
        try:
            cursor = connection.cursor()
            while not self._stopping.is_set():
                # Asleep while nobody waits; a waiter registers, then checks the database,
                # then waits: a change between its check and the first read below is caught
                # by the wake-up that follows that read.
                self._watched.wait()
                if self._stopping.is_set():
                    return
                version = cursor.execute(_DATA_VERSION).fetchone()[0]
                self.wake_all()
                idle_since: float | None = None
                while not self._stopping.wait(SQLITE_POLL_INTERVAL_S):
                    current = cursor.execute(_DATA_VERSION).fetchone()[0]
                    if current != version:
                        version = current
                        self.wake_all()
                    if self._watched.is_set():
                        idle_since = None
                    elif idle_since is None:
                        idle_since = time.monotonic()
                    elif time.monotonic() - idle_since >= SQLITE_IDLE_AFTER_S:
                        break  # back to sleep until someone waits
        finally:
            connection.close()

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
#: Changes whenever another connection committed to the database (SQLite's documented
#: way to notice other connections' writes; unchanged by this connection's own).
_DATA_VERSION = "PRAGMA data_version"


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
