"""Wake-ups across processes: who enqueued what (PostgreSQL LISTEN/NOTIFY)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from controller.store.engine import is_sqlite, normalize_url, psycopg_connect_args
from controller.store.schema import NOTIFY_CHANNEL

log = logging.getLogger(__name__)


class EnqueueListener:
    """Calls back with a queue name whenever a task is enqueued, from any process.

    On PostgreSQL a thread LISTENs on `NOTIFY_CHANNEL`; on SQLite only enqueues made in
    this process are seen (waiters also poll, which covers other processes).
    """

    def __init__(self, url: str) -> None:
        self._callbacks: list[Callable[[str], None]] = []
        self._url = normalize_url(url)
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        #: PostgreSQL backend PIDs of this process's own connections: their enqueues
        #: already fired the callbacks here (`fire`), so their NOTIFY echoes are skipped
        #: (that would be a second wake-up, and an empty claim, per enqueue).
        self.own_backend_pids: set[int] = set()

    def add(self, callback: Callable[[str], None], *, listen: bool = True) -> None:
        """Register a callback. `listen`: also hear other processes' enqueues now (starts
        the LISTEN thread on PostgreSQL); else only once `listen()` is called."""
        with self._lock:
            self._callbacks.append(callback)
        if listen:
            self.listen()

    def listen(self) -> None:
        """Start hearing enqueues by other processes (PostgreSQL; idempotent).

        Only processes that wait for work listen: every listening connection is woken by
        every enqueue in the database, which would make clients that never wait slow
        each other down."""
        with self._lock:
            if self._thread is None and not is_sqlite(self._url):
                self._thread = threading.Thread(
                    target=self._listen, name="conveyor-pg-listen", daemon=True
                )
                self._thread.start()

    def fire(self, queue: str) -> None:
        """Tell every callback that `queue` got a task."""
        for callback in list(self._callbacks):
            try:
                callback(queue)
            except Exception:  # a broken listener must not break enqueue
                log.exception("enqueue listener failed")

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
                    while not self._stopping.is_set():
                        for notify in conn.notifies(timeout=1.0):
                            if notify.pid not in self.own_backend_pids:
                                self.fire(notify.payload)
            except Exception as exc:  # reconnect after a lost connection
                if self._stopping.is_set():
                    return
                log.warning("LISTEN connection lost (%s); reconnecting", exc)
                time.sleep(1.0)


