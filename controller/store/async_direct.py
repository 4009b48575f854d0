"""One-statement operations on PostgreSQL from an asyncio event loop, without threads.

The API server runs the hot agent calls (enqueue, claim, status reports) as ONE
autocommit statement each (see `controller.store.schema`). Handing such a call to a
thread costs more on a small machine than the statement itself: a queue put, a thread
wake-up, a fight for the GIL with the event loop, and a wake-up of the loop to deliver
the result, each a context switch. `AsyncDirectConnections` runs the same statements
(`Prepared`, the same SQL text) right on the server's event loop instead: the loop sends
a statement and serves other requests until PostgreSQL answers.

The statements go through libpq directly (`psycopg.pq`, psycopg's own binding; psycopg
still opens and closes the connections). Each is prepared once per connection and then
executed with text parameters, and its row is decoded by column type. For these few
fixed statements this costs about a third of a psycopg cursor's execute, whose general
machinery (adaptation, prepared-statement bookkeeping, result loaders) is built for
any query.

Each statement runs in a task of its own that the caller awaits through
`asyncio.shield`: a cancelled request never leaves a connection halfway through a
statement; the statement finishes and the connection goes back to the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import re
from collections.abc import Callable, Mapping
from typing import Any

import sqlalchemy as sa

from controller.errors import BackendUnavailableError
from controller.store.engine import (
    HOT_CONNECTION_SETUP,
    PLAN_CACHE_MODE_SINCE,
    Prepared,
    RawResult,
    psycopg_connect_args,
    server_hung_up,
)

#: Connections kept open at most; more concurrent statements wait for one.
DEFAULT_MAX_CONNECTIONS = 8

#: Text-format decoders by PostgreSQL type OID (the types of the tasks table's columns).
_DECODERS: dict[int, Callable[[bytes], Any]] = {
    16: lambda v: v == b"t",  # boolean
    20: int,  # bigint
    21: int,  # smallint
    23: int,  # integer
    25: bytes.decode,  # text
    1043: bytes.decode,  # varchar
    700: float,  # real
    701: float,  # double precision
}
_PARAMETER = re.compile(r"%\((\w+)\)s|%%")


class _Statement:
    """A statement in libpq's form: `$n` parameters, a name to prepare it under, and
    the decoders of its result columns (known after its first execution)."""

    __slots__ = ("name", "sql", "parameters", "columns", "decoders")

    def __init__(self, number: int, pyformat_sql: str) -> None:
        names: list[str] = []

        def dollar(match: re.Match[str]) -> str:
            if match.group(0) == "%%":
                return "%"
            name = match.group(1)
            if name not in names:
                names.append(name)
            return f"${names.index(name) + 1}"

        self.name = f"conveyor_hot_{number}".encode()
        self.sql = _PARAMETER.sub(dollar, pyformat_sql).encode()
        self.parameters = tuple(names)
        self.columns: tuple[str, ...] | None = None
        self.decoders: tuple[Callable[[bytes], Any], ...] = ()

    def learn_columns(self, result: Any) -> None:
        """Column names and decoders from the first result (any other type than the
        tasks table's is returned as its text)."""
        columns, decoders = [], []
        for i in range(result.nfields):
            columns.append(result.fname(i).decode())
            decoders.append(_DECODERS.get(result.ftype(i), bytes.decode))
        self.columns, self.decoders = tuple(columns), tuple(decoders)


def _encode(value: Any) -> bytes | None:
    """A parameter in PostgreSQL's text format (its type is inferred from the SQL)."""
    if value is None:
        return None
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bool):
        return b"t" if value else b"f"
    if isinstance(value, int | float):
        return repr(value).encode()  # floats: 'inf'/'nan' are accepted too
    raise TypeError(f"cannot send a {type(value).__name__} parameter")


class _HotConnection:
    """A psycopg AsyncConnection and the names of the statements prepared on it."""

    __slots__ = ("conn", "pgconn", "prepared")

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.pgconn = conn.pgconn
        self.prepared: set[bytes] = set()


class AsyncDirectConnections:
    """A small pool of autocommit PostgreSQL connections bound to one event loop."""

    def __init__(
        self,
        url: str,
        dialect: sa.Dialect,
        *,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        backend_pids: set[int] | None = None,
    ) -> None:
        """`backend_pids` collects the PostgreSQL backend PID of every connection opened
        (see `EnqueueListener.own_backend_pids`)."""
        if dialect.name != "postgresql":
            raise ValueError(f"AsyncDirectConnections needs PostgreSQL, not {dialect.name}")
        self._cargs, self._cparams = psycopg_connect_args(url)
        self._dialect = dialect
        self._backend_pids = backend_pids if backend_pids is not None else set()
        self._statements: dict[str, _Statement] = {}
        self._idle: list[_HotConnection] = []
        self._open = 0
        self._max = max_connections
        self._freed: asyncio.Condition | None = None
        self._closed = False

    async def run(self, statement: Prepared, params: Mapping[str, Any]) -> Any:
        """Execute `statement` with `params` in autocommit; return its first row or None.

        A lost or unusable connection is dropped and raised as BackendUnavailableError.
        An error of the statement itself is raised as the psycopg error of its SQLSTATE;
        the connection stays in the pool (in autocommit, a failed statement leaves it
        idle)."""
        return await asyncio.shield(asyncio.ensure_future(self._run(statement, params)))

    async def _run(self, statement: Prepared, params: Mapping[str, Any]) -> Any:
        import psycopg

        entry, args = statement.bind(self._dialect, params)
        hot = self._statements.get(entry.sql)
        if hot is None:
            hot = self._statements[entry.sql] = _Statement(len(self._statements), entry.sql)
        values = [_encode(args[name]) for name in hot.parameters]
        conn = await self._acquire()
        try:
            pgconn = conn.pgconn
            if hot.name not in conn.prepared:
                pgconn.send_prepare(hot.name, hot.sql)
                await _result(pgconn)
                conn.prepared.add(hot.name)
            pgconn.send_query_prepared(hot.name, values)
            result = await _result(pgconn)
            if hot.columns is None:
                hot.learn_columns(result)
            decoders = hot.decoders
            rows = [
                tuple(
                    None if (v := result.get_value(r, c)) is None else decode(v)
                    for c, decode in enumerate(decoders)
                )
                for r in range(result.ntuples)
            ]
        except (psycopg.OperationalError, psycopg.InterfaceError, OSError) as exc:
            await self._drop(conn)
            raise BackendUnavailableError(f"the Conveyor store failed: {exc}") from exc
        except psycopg.Error:
            if conn.conn.broken or conn.pgconn.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                await self._drop(conn)
            else:
                await self._release(conn)
            raise
        except BaseException:
            await self._drop(conn)
            raise
        await self._release(conn)
        return RawResult(hot.columns or (), rows, 0).first()

    async def _acquire(self) -> _HotConnection:
        import psycopg

        if self._closed:
            raise BackendUnavailableError("the server is shutting down")
        if self._freed is None:
            self._freed = asyncio.Condition()
        while not self._idle and self._open >= self._max:
            async with self._freed:
                await self._freed.wait()
        while self._idle:
            conn = self._idle.pop()
            if not server_hung_up(conn.conn):
                return conn
            await self._drop(conn)
        self._open += 1
        try:
            conn = await psycopg.AsyncConnection.connect(*self._cargs, **self._cparams, autocommit=True)
            if conn.info.server_version >= PLAN_CACHE_MODE_SINCE:
                await conn.execute(HOT_CONNECTION_SETUP)
            self._backend_pids.add(conn.info.backend_pid)
            return _HotConnection(conn)
        except BaseException as exc:
            self._open -= 1
            await self._notify()
            if isinstance(exc, psycopg.Error | OSError):
                raise BackendUnavailableError(f"cannot connect to the Conveyor store: {exc}") from exc
            raise

    async def _release(self, conn: _HotConnection) -> None:
        if self._closed:
            await self._drop(conn)
            return
        self._idle.append(conn)
        await self._notify()

    async def _drop(self, conn: _HotConnection) -> None:
        self._open -= 1
        with contextlib.suppress(Exception):
            self._backend_pids.discard(conn.conn.info.backend_pid)
        with contextlib.suppress(Exception):
            await conn.conn.close()
        await self._notify()

    async def _notify(self) -> None:
        if self._freed is not None:
            async with self._freed:
                self._freed.notify()

    async def close(self) -> None:
        """Close the idle connections; busy ones close when their statement ends."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await self._drop(conn)


async def _wait_for(fd: int, *, write: bool) -> None:
    """Until the socket `fd` is readable (or writable)."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    if write:
        loop.add_writer(fd, wake)
    else:
        loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


async def _result(pgconn: Any) -> Any:
    """Send what libpq holds for `pgconn`, then read the answer of one command: its last
    result (raised as the psycopg error of its SQLSTATE if the command failed)."""
    import psycopg
    from psycopg import pq

    while pgconn.flush():  # 1: more to send, the socket is full
        await _wait_for(pgconn.socket, write=True)
    while True:
        pgconn.consume_input()
        if not pgconn.is_busy():
            break
        await _wait_for(pgconn.socket, write=False)
    last = None
    while (result := pgconn.get_result()) is not None:
        last = result
    if last is None:
        raise psycopg.OperationalError("the server sent no result")
    status = last.status
    if status in (pq.ExecStatus.TUPLES_OK, pq.ExecStatus.COMMAND_OK):
        return last
    if pgconn.status != pq.ConnStatus.OK:
        raise psycopg.OperationalError(pgconn.get_error_message())
    sqlstate = last.error_field(pq.DiagnosticField.SQLSTATE)
    message = last.get_error_message()
    error: type[psycopg.Error] = psycopg.DatabaseError
    if sqlstate:
        with contextlib.suppress(KeyError):
            error = psycopg.errors.lookup(sqlstate.decode())
    raise error(message)
