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
import select
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from controller.errors import BackendUnavailableError, ConflictError, InvalidInputError
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
            **({"isolation_level": "AUTOCOMMIT"} if begin_sql is None else {}),
        )

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


#: Database errors that mean the store cannot be used right now (lost connection, a lock
#: held past the busy timeout), as opposed to a refused statement.
_UNAVAILABLE = (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.DisconnectionError)


@contextlib.contextmanager
def unavailable_as_conveyor_error() -> Iterator[None]:
    """Raise database outages inside the block as `BackendUnavailableError`."""
    try:
        yield
    except _UNAVAILABLE as exc:
        raise BackendUnavailableError(f"the Conveyor store failed: {getattr(exc, 'orig', None) or exc}") from exc
    except sa.exc.DBAPIError as exc:
        if exc.connection_invalidated:
            raise BackendUnavailableError(f"the Conveyor store failed: {exc.orig}") from exc
        raise


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

