"""Opening the database: engines, SQLite pragmas, schema creation and migration.

SQLite (the embedded default) runs in WAL mode so readers never wait for the writer.
Write transactions start with `BEGIN IMMEDIATE`: the write lock is taken up front, so two
processes never both read a queue and then fight over upgrading to a write lock (the
usual cause of "database is locked" errors); other writers wait up to
`SQLITE_BUSY_TIMEOUT_S`. Reads use a second engine with ordinary deferred transactions.

PostgreSQL URLs (`postgresql://...`) use psycopg 3. Queue claims there rely on
`SELECT ... FOR UPDATE SKIP LOCKED`, and enqueues send a NOTIFY that `EnqueueListener`
turns into wake-ups for waiting claimers in other processes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import namedtuple
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from controller.errors import BackendUnavailableError, ConflictError, InvalidInputError
from controller.models import DEFAULT_QUEUES
from controller.store import schema

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_S = 30.0
#: PostgreSQL channel carrying the names of queues that got a task.
NOTIFY_CHANNEL = "conveyor_enqueue"
# Any fixed number: serializes schema creation between processes on PostgreSQL.
_SCHEMA_LOCK_KEY = 7_362_541_118


def normalize_url(url: str) -> str:
    """Map user-facing database URLs onto SQLAlchemy dialect URLs."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    return url


def is_sqlite(url: str) -> bool:
    """True for sqlite URLs."""
    return url.startswith("sqlite")


def create_engines(url: str) -> tuple[sa.Engine, sa.Engine]:
    """Return (write_engine, read_engine) for a database URL."""
    url = normalize_url(url)
    if is_sqlite(url):
        return _sqlite_engines(url)
    try:
        engine = sa.create_engine(url, pool_size=8, max_overflow=32, pool_pre_ping=False)
    except (sa.exc.ArgumentError, ImportError) as exc:
        raise InvalidInputError(f"invalid database URL {url!r}: {exc}", field="url") from exc
    return engine, engine


def _sqlite_engines(url: str) -> tuple[sa.Engine, sa.Engine]:
    parsed = sa.engine.make_url(url)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    elif parsed.database == ":memory:" or not parsed.database:
        raise InvalidInputError(
            "the SQLite store needs a file (sqlite:///path/conveyor.db), not an in-memory database",
            field="url",
        )

    def make(begin_sql: str) -> sa.Engine:
        engine = sa.create_engine(
            url,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False},
            pool_size=8,
            max_overflow=32,
            # Every transaction ends in an explicit commit or rollback, so the rollback
            # SQLAlchemy would issue when a connection goes back to the pool is redundant.
            pool_reset_on_return=None,
        )

        @sa.event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn, _record):  # noqa: ANN001
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
            cur.close()

        @sa.event.listens_for(engine, "begin")
        def _on_begin(conn):  # noqa: ANN001
            conn.connection.driver_connection.execute(begin_sql)

        return engine

    return make("BEGIN IMMEDIATE"), make("BEGIN")


def init_schema(engine: sa.Engine) -> None:
    """Create the tables and default queues if missing; migrate an older schema."""
    try:
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _SCHEMA_LOCK_KEY})
            schema.metadata.create_all(conn)
            row = conn.execute(
                sa.select(schema.meta.c.value).where(schema.meta.c.key == "schema_version")
            ).first()
            if row is None:
                conn.execute(
                    schema.meta.insert().values(key="schema_version", value=str(schema.SCHEMA_VERSION))
                )
                now = time.time()
                for name in DEFAULT_QUEUES:
                    conn.execute(schema.queues.insert().values(name=name, created_at=now))
                return
            version = int(row.value)
            if version > schema.SCHEMA_VERSION:
                raise ConflictError(
                    f"the database schema is version {version}, newer than this Conveyor "
                    f"understands ({schema.SCHEMA_VERSION}); upgrade Conveyor"
                )
            while version < schema.SCHEMA_VERSION:
                schema.MIGRATIONS[version](conn)
                version += 1
                conn.execute(
                    schema.meta.update()
                    .where(schema.meta.c.key == "schema_version")
                    .values(value=str(version))
                )
    except sa.exc.OperationalError as exc:
        raise BackendUnavailableError(
            f"cannot open the Conveyor store at {engine.url.render_as_string(hide_password=True)}: "
            f"{exc.orig}"
        ) from exc


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

    def add(self, callback: Callable[[str], None]) -> None:
        """Register a callback; starts the LISTEN thread on PostgreSQL."""
        with self._lock:
            self._callbacks.append(callback)
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

        dsn = sa.engine.make_url(self._url).set(drivername="postgresql")
        dsn_str = dsn.render_as_string(hide_password=False)
        while not self._stopping.is_set():
            try:
                with psycopg.connect(dsn_str, autocommit=True) as conn:
                    conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    while not self._stopping.is_set():
                        for notify in conn.notifies(timeout=1.0):
                            self.fire(notify.payload)
            except Exception as exc:  # reconnect after a lost connection
                if self._stopping.is_set():
                    return
                log.warning("LISTEN connection lost (%s); reconnecting", exc)
                time.sleep(1.0)


class Prepared:
    """A Core statement compiled once per dialect and run without re-compiling.

    SQLAlchemy rebuilds and re-keys a statement on every execution; on the hot paths
    (claim, enqueue, status changes) that costs more than SQLite itself. The SQL text is
    still produced by SQLAlchemy from the table definitions, once per dialect.
    Parameters are named bind parameters (`sa.bindparam("x")`).
    """

    __slots__ = ("_statement", "_compiled")

    def __init__(self, statement: sa.Executable) -> None:
        self._statement = statement
        self._compiled: dict[str, tuple[str, tuple[str, ...] | None, dict[str, Any]]] = {}

    def run(self, conn: sa.Connection, params: Mapping[str, Any] | None = None) -> RawResult:
        """Execute with `params` on `conn`."""
        dialect = conn.dialect
        entry = self._compiled.get(dialect.name)
        if entry is None:
            compiled = self._statement.compile(dialect=dialect)
            if "POSTCOMPILE" in compiled.string:
                raise TypeError("Prepared statements cannot hold expanding IN parameters")
            order = tuple(compiled.positiontup) if compiled.positional else None
            literals = {
                name: bind.value
                for bind, name in compiled.bind_names.items()
                if not bind.required and bind.callable is None
            }
            entry = self._compiled[dialect.name] = (compiled.string, order, literals)
        sql, order, literals = entry
        values = {**literals, **params} if params else literals
        args = tuple(values[name] for name in order) if order is not None else values
        # Straight to the DBAPI cursor, inside the transaction SQLAlchemy began on `conn`:
        # result handling per execution costs more than SQLite's own work here.
        cursor = conn.connection.driver_connection.cursor()
        try:
            cursor.execute(sql, args)
            if cursor.description is None:
                return RawResult((), [], cursor.rowcount)
            return RawResult(tuple(d[0] for d in cursor.description), cursor.fetchall(), cursor.rowcount)
        finally:
            cursor.close()


_row_classes: dict[tuple[str, ...], type] = {}


class RawResult:
    """Rows of a Prepared statement, with attribute access by column name."""

    __slots__ = ("_rows", "rowcount")

    def __init__(self, columns: tuple[str, ...], rows: list[tuple], rowcount: int) -> None:
        row_class = _row_classes.get(columns)
        if row_class is None and columns:
            row_class = _row_classes[columns] = namedtuple("Row", columns, rename=True)  # noqa: PYI024
        self._rows = [row_class._make(r) for r in rows] if columns else []
        self.rowcount = rowcount

    def first(self) -> Any:
        """The first row or None."""
        return self._rows[0] if self._rows else None

    def all(self) -> list[Any]:
        """Every row."""
        return self._rows

    def scalar(self) -> Any:
        """The first column of the first row, or None."""
        return self._rows[0][0] if self._rows else None


_prepared: dict[Any, Prepared] = {}


def prepared(key: Any, build: Callable[[], sa.Executable]) -> Prepared:
    """The Prepared statement cached under `key` (built by `build()` the first time)."""
    statement = _prepared.get(key)
    if statement is None:
        statement = _prepared[key] = Prepared(build())
    return statement
