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

import contextlib
import logging
import os
import select
import threading
import time
from collections import namedtuple
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from controller.errors import (
    BackendUnavailableError,
    ConflictError,
    ConveyorError,
    InvalidInputError,
)
from controller.models import DEFAULT_QUEUES
from controller.store import schema

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_S = 30.0
NOTIFY_CHANNEL = schema.NOTIFY_CHANNEL
#: Run once on each PostgreSQL connection of the hot one-statement operations. They
#: are a handful of fixed statements, each driven by a primary key or a small partial
#: index, so one generic plan per statement is always right; left to itself PostgreSQL
#: may keep re-planning some of them on every execution (a custom plan costs more to
#: make than the statement costs to run).
HOT_CONNECTION_SETUP = "SET plan_cache_mode = force_generic_plan"
#: `plan_cache_mode` exists from PostgreSQL 12 on (`server_version` 120000); older
#: servers keep their own planning choice.
PLAN_CACHE_MODE_SINCE = 120000
# Any fixed number: serializes schema creation between processes on PostgreSQL.
_SCHEMA_LOCK_KEY = 7_362_541_118


def normalize_url(url: str) -> str:
    """Map user-facing database URLs onto SQLAlchemy dialect URLs."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    return url


def psycopg_connect_args(url: str | sa.URL) -> tuple[list[Any], dict[str, Any]]:
    """The arguments SQLAlchemy passes to psycopg.connect for `url` (a rendered URL
    would not do: libpq reads '+' in a query value as itself, not as a space)."""
    parsed = sa.engine.make_url(normalize_url(str(url)) if isinstance(url, str) else url)
    cargs, cparams = parsed.get_dialect()().create_connect_args(parsed)
    return list(cargs), dict(cparams)


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
            _sqlite_pragmas(dbapi_conn)

        @sa.event.listens_for(engine, "begin")
        def _on_begin(conn):  # noqa: ANN001
            conn.connection.driver_connection.execute(begin_sql)

        return engine

    return make("BEGIN IMMEDIATE"), make("BEGIN")


def _sqlite_pragmas(dbapi_conn: Any) -> None:
    """WAL (readers never wait for the writer), no fsync per commit, the busy timeout."""
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
    cur.close()


def init_schema(engine: sa.Engine) -> None:
    """Create the tables and default queues if missing; migrate an older schema."""
    try:
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _SCHEMA_LOCK_KEY})
            version = _schema_version(conn)
            if version is not None and version > schema.SCHEMA_VERSION:
                raise ConflictError(
                    f"the database schema is version {version}, newer than this Conveyor "
                    f"understands ({schema.SCHEMA_VERSION}); upgrade Conveyor"
                )
            if version is not None and version < schema.SCHEMA_VERSION:
                log.warning(
                    "migrating the Conveyor store from schema version %s to %s",
                    version, schema.SCHEMA_VERSION,
                )
                while version < schema.SCHEMA_VERSION:
                    schema.MIGRATIONS[version](conn)
                    version += 1
                    conn.execute(
                        schema.meta.update()
                        .where(schema.meta.c.key == "schema_version")
                        .values(value=str(version))
                    )
            schema.metadata.create_all(conn)  # tables added since (and all of a new store)
            if version is None:
                conn.execute(
                    schema.meta.insert().values(key="schema_version", value=str(schema.SCHEMA_VERSION))
                )
                now = time.time()
                for name in DEFAULT_QUEUES:
                    conn.execute(schema.queues.insert().values(name=name, created_at=now))
    except sa.exc.OperationalError as exc:
        raise BackendUnavailableError(
            f"cannot open the Conveyor store at {engine.url.render_as_string(hide_password=True)}: "
            f"{exc.orig}"
        ) from exc


def _schema_version(conn: sa.Connection) -> int | None:
    """The recorded schema version, or None for a new (empty) store."""
    if not sa.inspect(conn).has_table(schema.meta.name):
        return None
    row = conn.execute(
        sa.select(schema.meta.c.value).where(schema.meta.c.key == "schema_version")
    ).first()
    return None if row is None else int(row.value)


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


def server_hung_up(dbapi: Any) -> bool:
    """True if an idle PostgreSQL connection was closed by the server (a restart, an
    administrator's pg_terminate_backend, an idle timeout), so that it must not be used.

    An idle connection that is not LISTENing receives nothing unless the server ends
    it: then its socket is readable (the termination message, or end of file). The look
    costs one `poll` system call, no round trip; SQLite connections are never stale."""
    fileno = getattr(dbapi, "fileno", None)
    if fileno is None or not hasattr(dbapi, "pgconn"):
        return False
    try:
        poller = select.poll()
        poller.register(fileno(), select.POLLIN)
        return bool(poller.poll(0))
    except Exception:  # closed or broken: unusable
        return True


class DirectConnection:
    """A DBAPI connection in autocommit mode: each statement is its own transaction.

    Used as a context manager (`with pool.connection() as conn:`): leaving the block
    returns it to its pool, or closes it if a database error or an interruption left it
    in an unknown state (database errors are raised as BackendUnavailableError).
    """

    __slots__ = ("dbapi", "dialect", "cursor", "_pool")

    def __init__(self, dbapi: Any, dialect: sa.Dialect, pool: DirectConnections) -> None:
        self.dbapi = dbapi
        self.dialect = dialect
        self.cursor = dbapi.cursor()  # one per connection, reused by every statement
        self._pool = pool

    def __enter__(self) -> DirectConnection:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        pool = self._pool
        if exc_type is None or issubclass(exc_type, ConveyorError):
            pool._idle.append(self)  # a refusal raised by our code leaves it clean
            return
        pool.discard(self.dbapi)
        if isinstance(exc, pool._errors):
            raise BackendUnavailableError(f"the Conveyor store failed: {exc}") from exc


class DirectConnections:
    """A pool of `DirectConnection`s for the hot one-statement operations.

    Enqueue, claim and status changes are each ONE statement (see `schema`), so they need
    no BEGIN/COMMIT: on PostgreSQL that is one network round trip instead of three, and on
    both databases it skips SQLAlchemy's pool, events and transaction bookkeeping, which
    cost more per call than the statement. Connections are per process (a forked child
    opens its own) and broken ones are dropped.
    """

    def __init__(self, url: str, dialect: sa.Dialect, backend_pids: set[int] | None = None) -> None:
        self._url = sa.engine.make_url(normalize_url(url))
        self._dialect = dialect
        self._backend_pids = backend_pids if backend_pids is not None else set()
        self._idle: list[DirectConnection] = []
        self._pid = os.getpid()
        if dialect.name == "sqlite":
            import sqlite3

            self._errors: tuple[type[BaseException], ...] = (sqlite3.OperationalError,)
        else:
            import psycopg

            self._errors = (psycopg.OperationalError, psycopg.InterfaceError)

    def _connect(self) -> DirectConnection:
        try:
            if self._dialect.name == "sqlite":
                import sqlite3

                dbapi = sqlite3.connect(
                    self._url.database,
                    timeout=SQLITE_BUSY_TIMEOUT_S,
                    isolation_level=None,
                    check_same_thread=False,
                )
                _sqlite_pragmas(dbapi)
            else:
                import psycopg

                cargs, cparams = psycopg_connect_args(self._url)
                dbapi = psycopg.connect(*cargs, **cparams, autocommit=True)
                if dbapi.info.server_version >= PLAN_CACHE_MODE_SINCE:
                    dbapi.execute(HOT_CONNECTION_SETUP)
                self._backend_pids.add(dbapi.info.backend_pid)
        except self._errors as exc:
            raise BackendUnavailableError(f"cannot connect to the Conveyor store: {exc}") from exc
        return DirectConnection(dbapi, self._dialect, self)

    def connection(self) -> DirectConnection:
        """An idle connection (or a new one); use it as a context manager."""
        if os.getpid() != self._pid:  # forked: the parent's connections are not ours
            self._idle, self._pid = [], os.getpid()
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not server_hung_up(conn.dbapi):
                return conn
            self.discard(conn.dbapi)
        return self._connect()

    def close(self) -> None:
        """Close every idle connection."""
        idle, self._idle = self._idle, []
        for conn in idle:
            self.discard(conn.dbapi)

    def discard(self, dbapi: Any) -> None:
        """Close a connection of this pool for good."""
        with contextlib.suppress(Exception):
            self._backend_pids.discard(dbapi.info.backend_pid)
        with contextlib.suppress(Exception):
            dbapi.close()


class Prepared:
    """A Core statement compiled once per dialect and run without re-compiling.

    SQLAlchemy rebuilds and re-keys a statement on every execution; on the hot paths
    (claim, enqueue, status changes) that costs more than the database's own work. The
    SQL text is still produced by SQLAlchemy from the table definitions, once per dialect.
    Parameters are named bind parameters (`sa.bindparam("x")`). Runs on a SQLAlchemy
    connection (inside its transaction) or on a `DirectConnection` (autocommit).
    """

    __slots__ = ("_statement", "_compiled")

    def __init__(self, statement: sa.Executable) -> None:
        self._statement = statement
        self._compiled: dict[str, _Compiled] = {}

    def bind(self, dialect: sa.Dialect, params: Mapping[str, Any] | None) -> tuple[_Compiled, Any]:
        """The compiled statement for `dialect` and the DBAPI arguments for `params`."""
        entry = self._compiled.get(dialect.name)
        if entry is None:
            entry = self._compiled[dialect.name] = _Compiled(self._statement, dialect)
        literals = entry.literals
        values = ({**literals, **params} if literals else params) if params else literals
        args = [values[name] for name in entry.order] if entry.order is not None else values
        return entry, args

    def run(self, conn: sa.Connection | DirectConnection, params: Mapping[str, Any] | None = None) -> RawResult:
        """Execute with `params` on `conn`."""
        own_cursor = conn.__class__ is not DirectConnection
        cursor = conn.connection.driver_connection.cursor() if own_cursor else conn.cursor
        entry, args = self.bind(conn.dialect, params)
        # Straight to the DBAPI cursor: result handling per execution costs more than the
        # database's own work here.
        cursor.execute(entry.sql, args)
        columns = entry.result_columns(cursor)
        rows = cursor.fetchall() if columns else []
        result = RawResult(columns, rows, cursor.rowcount)
        if own_cursor:
            cursor.close()
        return result


class _Compiled:
    """SQL text, positional parameter order, literal values and result columns."""

    __slots__ = ("sql", "order", "literals", "columns")

    def __init__(self, statement: sa.Executable, dialect: sa.Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        if "POSTCOMPILE" in compiled.string:
            raise TypeError("Prepared statements cannot hold expanding IN parameters")
        self.sql: str = compiled.string
        self.order: tuple[str, ...] | None = tuple(compiled.positiontup) if compiled.positional else None
        self.literals: dict[str, Any] = {
            name: bind.value
            for bind, name in compiled.bind_names.items()
            if not bind.required and bind.callable is None
        }
        self.columns: tuple[str, ...] | None = None

    def result_columns(self, cursor: Any) -> tuple[str, ...]:
        """The names of the result columns (read from the first execution's cursor:
        psycopg builds objects per column on every `description`)."""
        columns = self.columns
        if columns is None:
            description = cursor.description
            columns = self.columns = tuple(d[0] for d in description) if description else ()
        return columns


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
