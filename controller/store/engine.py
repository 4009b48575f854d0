"""Opening the database: SQLAlchemy engines, SQLite pragmas, schema creation and migration.

Each store opens three ways to run statements, all SQLAlchemy Core engines with
SQLAlchemy's own pooling (`QueuePool`) and compiled-statement cache:

- `transactions`: real multi-statement transactions. On SQLite they start with
  `BEGIN IMMEDIATE` (SQLAlchemy's documented pysqlite recipe: the driver's own BEGIN
  is switched off and the `begin` event emits ours), so the write lock is taken up
  front and two processes never both read and then fight over upgrading to a write
  lock; other writers wait up to `SQLITE_BUSY_TIMEOUT_S` (or the URL's `?timeout=`
  seconds), then the call fails with BackendUnavailableError.
- `autocommit`: `isolation_level="AUTOCOMMIT"` for the hot one-statement state changes
  (enqueue, claim, status reports, heartbeats): no BEGIN/COMMIT round trips.
- `reads`: on SQLite a pool with ordinary deferred transactions (WAL: readers never
  wait for the writer); on PostgreSQL the same engine as `transactions`.

PostgreSQL URLs (`postgresql://...`) use psycopg 3 (which prepares statements run
often on the server by itself). A new connection fails after
`POSTGRES_CONNECT_TIMEOUT_S` (10 s) unless the URL sets `?connect_timeout=` itself. A pooled connection the server ended (a restart,
`pg_terminate_backend`, an idle timeout) is noticed at checkout without a round trip
and replaced (`DisconnectionError` from the `checkout` event, SQLAlchemy's documented
way to make the pool retry with a fresh connection).
"""

from __future__ import annotations

import contextlib
import logging
import re
import select
import sqlite3
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
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
#: Seconds a new PostgreSQL connection may take (TCP, TLS, authentication) before it
#: fails, unless the URL sets `connect_timeout` itself: a server that accepts TCP but
#: never answers fails in seconds instead of the minutes of the kernel's TCP timeouts.
POSTGRES_CONNECT_TIMEOUT_S = 10
#: Run once on each PostgreSQL connection. The store's statements are a handful of
#: fixed ones driven by a primary key or a small partial index, so one generic plan per
#: statement is always right; left to itself PostgreSQL may re-plan some of them on
#: every execution (a custom plan costs more to make than the statement costs to run).
HOT_CONNECTION_SETUP = "SET plan_cache_mode = force_generic_plan"
#: `plan_cache_mode` exists from PostgreSQL 12 on (`server_version` 120000).
PLAN_CACHE_MODE_SINCE = 120000
POOL_SIZE = 8
POOL_MAX_OVERFLOW = 32
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
    would not do: libpq reads '+' in a query value as itself, not as a space), with the
    default `connect_timeout` when the URL has none."""
    parsed = sa.engine.make_url(normalize_url(str(url)) if isinstance(url, str) else url)
    cargs, cparams = parsed.get_dialect()().create_connect_args(parsed)
    cparams = dict(cparams)
    cparams.setdefault("connect_timeout", POSTGRES_CONNECT_TIMEOUT_S)
    return list(cargs), cparams


def redacted_url(url: str | sa.URL) -> str:
    """`url` as text with its password (if any) replaced by ***."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return "<unreadable database URL>"


def is_sqlite(url: str) -> bool:
    """True for sqlite URLs."""
    return url.startswith("sqlite")


@dataclass(frozen=True)
class Engines:
    """The engines of one store (see the module docstring)."""

    transactions: sa.Engine
    autocommit: sa.Engine
    reads: sa.Engine

    def dispose(self) -> None:
        """Close every pooled connection."""
        for engine in {id(e): e for e in (self.transactions, self.autocommit, self.reads)}.values():
            engine.dispose()


def create_engines(url: str, backend_pids: set[int] | None = None) -> Engines:
    """The engines for a database URL. On PostgreSQL the backend PIDs of the store's
    open connections are kept in `backend_pids` (see `notify.Notifier`)."""
    url = normalize_url(url)
    if is_sqlite(url):
        return _sqlite_engines(url)
    try:
        parsed = sa.engine.make_url(url)
        timeout = {} if "connect_timeout" in parsed.query else {"connect_timeout": POSTGRES_CONNECT_TIMEOUT_S}
        engine = sa.create_engine(
            parsed,
            pool_size=POOL_SIZE,
            max_overflow=POOL_MAX_OVERFLOW,
            pool_pre_ping=False,
            connect_args=timeout,
        )
    except (sa.exc.ArgumentError, ImportError) as exc:
        raise InvalidInputError(f"invalid database URL {redacted_url(url)!r}: {exc}", field="url") from exc
    pids = backend_pids if backend_pids is not None else set()
    sa.event.listen(engine, "before_cursor_execute", refuse_unstorable_parameters)

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        pids.add(dbapi_conn.info.backend_pid)
        if dbapi_conn.info.server_version >= PLAN_CACHE_MODE_SINCE:
            dbapi_conn.execute(HOT_CONNECTION_SETUP)
            dbapi_conn.commit()

    @sa.event.listens_for(engine, "close")
    def _on_close(dbapi_conn: Any, _record: Any) -> None:
        with contextlib.suppress(Exception):
            pids.discard(dbapi_conn.info.backend_pid)

    @sa.event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_conn: Any, _record: Any, _proxy: Any) -> None:
        if server_hung_up(dbapi_conn):
            raise sa.exc.DisconnectionError("the database server ended this connection")

    return Engines(engine, engine.execution_options(isolation_level="AUTOCOMMIT"), engine)


def _sqlite_engines(url: str) -> Engines:
    parsed = sa.engine.make_url(url)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    else:
        raise InvalidInputError(
            "the SQLite store needs a file (sqlite:///path/conveyor.db), not an in-memory database",
            field="url",
        )

    try:
        busy_timeout_s = float(parsed.query.get("timeout", SQLITE_BUSY_TIMEOUT_S))
    except ValueError:
        raise InvalidInputError(f"invalid timeout in {url!r}: seconds expected", field="url") from None

    def make(begin_sql: str | None) -> sa.Engine:
        engine = sa.create_engine(
            url,
            connect_args={"timeout": busy_timeout_s, "check_same_thread": False},
            poolclass=sa.pool.QueuePool,
            pool_size=POOL_SIZE,
            max_overflow=POOL_MAX_OVERFLOW,
            paramstyle="named",  # parameters by name, as on PostgreSQL: errors name the field
            **({"isolation_level": "AUTOCOMMIT"} if begin_sql is None else {}),
        )
        sa.event.listen(engine, "before_cursor_execute", refuse_unstorable_parameters)

        @sa.event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # no BEGIN by the driver: ours, or none
            _sqlite_pragmas(dbapi_conn, busy_timeout_s)

        if begin_sql is not None:

            @sa.event.listens_for(engine, "begin")
            def _on_begin(conn: sa.Connection) -> None:
                conn.exec_driver_sql(begin_sql)

        return engine

    return Engines(transactions=make("BEGIN IMMEDIATE"), autocommit=make(None), reads=make("BEGIN"))


def _sqlite_pragmas(dbapi_conn: Any, busy_timeout_s: float) -> None:
    """WAL (readers never wait for the writer), no fsync per commit, the busy timeout."""
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
    cur.close()


def server_hung_up(dbapi: Any) -> bool:
    """True if an idle PostgreSQL connection was closed by the server, so that it must
    not be used. An idle connection that is not LISTENing receives nothing unless the
    server ends it: then its socket is readable. One `poll` system call, no round trip."""
    try:
        poller = select.poll()
        poller.register(dbapi.fileno(), select.POLLIN)
        return bool(poller.poll(0))
    except Exception:  # closed or broken: unusable
        return True


def unstorable_reason(text: str) -> str | None:
    """Why a database cannot store `text` in a text column (a NUL character, which
    PostgreSQL refuses and SQLite would keep, or a lone UTF-16 surrogate, which neither
    can encode), or None if it can."""
    if "\x00" in text:
        return "text must not contain NUL characters (\\u0000)"
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return "text must be valid Unicode (no lone surrogates such as \\ud800)"
    return None


#: What SQLAlchemy adds to a column's name to make a bind parameter's name
#: (`v_status_message`, `_id`, `id_1`, `line__3`).
_BIND_DECORATION = re.compile(r"^(?:v_|_+)|(?:_+\d+)+$")


def refuse_unstorable_parameters(
    _conn: sa.Connection,
    _cursor: Any,
    _statement: str,
    parameters: Any,
    _context: Any,
    executemany: bool,
) -> None:
    """`before_cursor_execute` listener of every engine: InvalidInputError naming the
    column (from the bind parameter's name) if a text parameter cannot be stored, so that
    SQLite and PostgreSQL refuse the same input before either sees it. Text inside JSON
    columns (the task body) is escaped by the JSON encoder, so it is always storable."""
    for params in parameters if executemany else (parameters,):
        if not isinstance(params, Mapping):
            continue
        for name, value in params.items():
            if type(value) is str:
                reason = unstorable_reason(value)
                if reason:
                    field = _BIND_DECORATION.sub("", name) or name
                    raise InvalidInputError(f"{field}: {reason}", field=field)


#: Database errors that mean the store cannot be used right now (lost connection, a lock
#: held past the busy timeout, a full disk), as opposed to a refused statement.
_UNAVAILABLE = (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.DisconnectionError, sa.exc.TimeoutError)


def _database_message(exc: BaseException) -> str:
    """The database's own words for `exc` (the DBAPI error), on one line."""
    return " ".join(str(getattr(exc, "orig", None) or exc).split())


def _is_statement_error(exc: sa.exc.OperationalError) -> bool:
    """True for SQLite's generic SQLITE_ERROR (no such table or column: the database
    does not hold Conveyor's schema), which SQLite raises as an OperationalError like
    a lock or an I/O error, but which waiting will not cure."""
    orig = getattr(exc, "orig", None)
    return isinstance(orig, sqlite3.Error) and getattr(orig, "sqlite_errorcode", None) == sqlite3.SQLITE_ERROR


def conveyor_error_for(exc: sa.exc.SQLAlchemyError) -> ConveyorError:
    """The Conveyor error a database error stands for: BackendUnavailableError for an
    outage (retrying later may succeed), ConflictError for a violated constraint,
    InvalidInputError for a value the database refuses, and a server-side ConveyorError
    (HTTP 500) for anything else, e.g. a database without Conveyor's tables."""
    message = _database_message(exc)
    if isinstance(exc, sa.exc.OperationalError) and _is_statement_error(exc):
        return ConveyorError(f"the Conveyor store's database refused a statement (damaged schema?): {message}")
    if isinstance(exc, _UNAVAILABLE) or (isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated):
        return BackendUnavailableError(f"the Conveyor store failed: {message}")
    if isinstance(exc, sa.exc.IntegrityError):
        return ConflictError(f"the Conveyor store refused a change that conflicts with a stored record: {message}")
    if isinstance(exc, sa.exc.DataError):
        return InvalidInputError(f"the Conveyor store cannot store a value: {message}")
    return ConveyorError(f"the Conveyor store failed: {message}")


@contextlib.contextmanager
def database_errors_as_conveyor_errors() -> Iterator[None]:
    """Raise every SQLAlchemy error inside the block as the Conveyor error it stands for
    (`conveyor_error_for`): no raw database exception leaves the store."""
    try:
        yield
    except sa.exc.SQLAlchemyError as exc:
        raise conveyor_error_for(exc) from exc


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
    except sa.exc.SQLAlchemyError as exc:
        error = conveyor_error_for(exc)
        error.message = f"cannot open the Conveyor store at {redacted_url(engine.url)}: {_database_message(exc)}"
        error.args = (error.message,)
        raise error from exc


def _schema_version(conn: sa.Connection) -> int | None:
    """The recorded schema version, or None for a new (empty) store."""
    if not sa.inspect(conn).has_table(schema.meta.name):
        return None
    row = conn.execute(
        sa.select(schema.meta.c.value).where(schema.meta.c.key == "schema_version")
    ).first()
    return None if row is None else int(row.value)

