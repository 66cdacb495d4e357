"""Engine, declarative base and the one place that commits: `transaction()`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sqlite3
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, nullcontext
from datetime import UTC, datetime
from functools import cache
from typing import Any, TypeVar, cast
from weakref import WeakKeyDictionary, WeakSet

import aiosqlite
from sqlalchemy import CTE, BigInteger, DateTime, Integer, MetaData, Table, bindparam, column, event, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Dialect, Engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.types import TypeDecorator, TypeEngine

from app.core.errors import DatabaseUnavailable

log = logging.getLogger("vidgate.database")

T = TypeVar("T")

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """Timestamps are stored as UTC and always come back timezone-aware, on SQLite too."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the database")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


BigIntId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime()}


def table_of(model: type[Base]) -> Table:
    """A model's Core table, for statements built once at import (typed: `__table__` is a FromClause)."""
    return cast(Table, model.__table__)


def create_engine(
    url: str, *, pool_size: int = 40, sqlite_busy_timeout_s: float = 30.0, pooled: bool = False
) -> AsyncEngine:
    """`pooled`: `url` is a transaction pooler (PgBouncer, VIDGATE_DATABASE_DIRECT_URL given), which may hand
    each transaction, and each statement outside one, another server connection."""
    if url.startswith("sqlite"):
        return _sqlite_engine(url, sqlite_busy_timeout_s)
    connect_args: dict[str, Any] = {"server_settings": {"timezone": "UTC"}}
    if pooled:
        connect_args.update(
            # asyncpg: no statement cache, so its own statements are unnamed and parsed again with each
            # execution (one round trip with the bind: the server connection cannot change in between).
            statement_cache_size=0,
            # SQLAlchemy prepares every statement by name to learn its columns: a name no other client of
            # the pooler's server connection can have taken, and nothing kept past the statement.
            prepared_statement_cache_size=0,
            prepared_statement_name_func=_unique_statement_name,
        )
    engine = create_async_engine(url, pool_size=pool_size, max_overflow=0, connect_args=connect_args)
    if pooled:
        _pooled_engines.add(engine.sync_engine)

    # asyncpg raises a refused, reset or timed-out connect as a bare OSError, which SQLAlchemy passes
    # through unwrapped: make it the driver's OperationalError, so that everything the database layer
    # raises is a DBAPIError and nothing else (our own errors included) can pass for an outage.
    @event.listens_for(engine.sync_engine, "do_connect")
    def _on_connect(dialect: Dialect, _record: Any, cargs: Any, cparams: Any) -> Any:
        try:
            return dialect.connect(*cargs, **cparams)
        except OSError as exc:
            raise dialect.loaded_dbapi.OperationalError(f"cannot connect ({type(exc).__name__})") from exc

    # A pooled connection the server closed (a restart, a failover, a proxy cut) is replaced at checkout
    # instead of being handed out to fail. asyncpg knows it locally, so this costs no round trip;
    # pool_pre_ping would cost three (BEGIN, ping, ROLLBACK) on every unit of work.
    @event.listens_for(engine.sync_engine, "checkout")
    def _on_checkout(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        is_closed = getattr(dbapi_connection.driver_connection, "is_closed", None)  # asyncpg's
        if callable(is_closed) and is_closed():
            raise sa_exc.DisconnectionError("connection closed by the server")

    return engine


# Engines whose every unit of work must be a transaction: behind a transaction pooler, an AUTOCOMMIT read's
# prepare and execute may reach two server connections (and the statement is not on the second).
_pooled_engines: WeakSet[Engine] = WeakSet()


def _unique_statement_name() -> str:
    return f"__vg_{uuid.uuid4().hex}__"


def _autocommit_reads(bind: AsyncEngine) -> bool:
    return bind.dialect.name == "postgresql" and bind.sync_engine not in _pooled_engines


def _sqlite_engine(url: str, busy_timeout_s: float) -> AsyncEngine:
    if ":///" in url and not url.endswith(":memory:"):
        from pathlib import Path

        Path(url.split(":///", 1)[1]).parent.mkdir(parents=True, exist_ok=True)
    engine = create_async_engine(url, connect_args={"timeout": busy_timeout_s})

    # SQLite's default deferred transactions fail with "database is locked" when two writers
    # upgrade their read locks at once; taking the write lock at BEGIN serializes them instead.
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        # WAL + FULL: every commit is on disk before it returns, so a settle that was answered survives a
        # power loss too (NORMAL would only survive a process crash). The ledger writer commits once per
        # batch, so the fsync is shared by the batch (README, "SQLite durability").
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Read-only units of work begin deferred: in WAL mode they then neither wait for nor block writers.
        readonly = conn.get_execution_options().get(READONLY_OPTION, False)
        conn.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")

    return engine


def create_sessionmaker(bind: AsyncEngine | Any) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(bind, expire_on_commit=False, autoflush=False)


READONLY_OPTION = "vidgate_readonly"


# One writer at a time per SQLite database and process. SQLite admits one writer anyway; without this,
# the others wait in its busy handler, which retries with growing sleeps (p99 above a second at 32
# concurrent submits). Queued on a lock they go in turn, first come first served.
_sqlite_writers: WeakKeyDictionary[Engine, asyncio.Lock] = WeakKeyDictionary()


def _writer_lock(sessions: async_sessionmaker[AsyncSession]) -> asyncio.Lock | None:
    bind = sessions.kw.get("bind")
    if not isinstance(bind, AsyncEngine) or bind.dialect.name != "sqlite":
        return None
    return _sqlite_writers.setdefault(bind.sync_engine, asyncio.Lock())


@asynccontextmanager
async def transaction(
    sessions: async_sessionmaker[AsyncSession], *, readonly: bool = False
) -> AsyncIterator[AsyncSession]:
    """Open a session and a transaction; commit when the block ends, roll back when it raises.

    Service functions only flush: this is where every unit of work becomes durable. A database that
    cannot be reached raises `DatabaseUnavailable` (503); any other error passes through unchanged.
    """
    lock = None if readonly else _writer_lock(sessions)
    try:
        async with lock or nullcontext(), sessions() as session, session.begin():
            if readonly:
                options: dict[str, Any] = {READONLY_OPTION: True}
                if isinstance(session.bind, AsyncEngine) and _autocommit_reads(session.bind):
                    # Reads need no BEGIN/COMMIT round trips: each statement sees committed data.
                    options["isolation_level"] = "AUTOCOMMIT"
                await session.connection(execution_options=options)
            yield session
    except Exception as exc:
        if not isinstance(exc, DatabaseUnavailable) and is_outage(exc):
            raise DatabaseUnavailable() from exc
        raise


# What a read of Core statements runs on: a session's unit of work, or a bare connection (read_connection).
Reads = AsyncSession | AsyncConnection


@asynccontextmanager
async def read_connection(sessions: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncConnection]:
    """transaction(readonly=True) without the ORM session: for the hottest reads (GET of a prediction),
    which execute prebuilt Core statements only. The session's begin, connection and commit bookkeeping
    cost about as much CPU as the statement itself."""
    bind = sessions.kw.get("bind")
    try:
        if isinstance(bind, AsyncConnection):
            # A sessionmaker bound to one connection (the tests' outer transaction): read on it.
            yield bind
            return
        assert isinstance(bind, AsyncEngine), bind
        options: dict[str, Any] = {READONLY_OPTION: True}
        if _autocommit_reads(bind):
            options["isolation_level"] = "AUTOCOMMIT"  # as transaction(readonly=True): no BEGIN/COMMIT
        async with bind.connect() as connection:
            await connection.execution_options(**options)
            # No explicit begin: the first statement begins (on SQLite, the deferred BEGIN of the begin
            # event), and closing rolls back what only read.
            yield connection
    except Exception as exc:
        if not isinstance(exc, DatabaseUnavailable) and is_outage(exc):
            raise DatabaseUnavailable() from exc
        raise


def _alive(connection: AsyncConnection) -> bool:
    """Whether a kept connection can still be used, as far as is known without a round trip (asyncpg
    notes a connection the server closed)."""
    if connection.closed or connection.invalidated:
        return False
    is_closed = getattr(connection.sync_connection.connection.driver_connection, "is_closed", None)  # type: ignore[union-attr]
    return not (callable(is_closed) and is_closed())


class OwnConnection:
    """A connection one serial user keeps for itself (PostgreSQL, AUTOCOMMIT: each statement a
    transaction of its own): the ledger writer, which runs one batch at a time as one statement
    (app/budgets/fastbatch.py), or on SQLite as one step on the connection's thread (run_in_thread).
    Kept rather than taken from the pool per batch, so that it keeps its prepared statement and its
    `settings`; replaced after an outage. In the tests' outer transaction
    (sessions bound to one connection), that connection: the statement joins it."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], settings: dict[str, str]) -> None:
        self._sessions = sessions
        self._settings = settings
        self._connection: AsyncConnection | None = None

    @asynccontextmanager
    async def use(self) -> AsyncIterator[AsyncConnection]:
        bind = self._sessions.kw.get("bind")
        if isinstance(bind, AsyncConnection):
            yield bind
            return
        assert isinstance(bind, AsyncEngine), bind
        try:
            if self._connection is not None and not _alive(self._connection):
                # The server closed it (a restart, an outage, a proxy cut), as the pool's checkout would
                # find: replaced before use, so the first batch after an outage does not fail on it.
                await self.close()
            if self._connection is None:
                self._connection = await self._connect(bind)
            yield self._connection
        except Exception as exc:
            if is_outage(exc) or (self._connection is not None and self._connection.invalidated):
                await self.close()
            if not isinstance(exc, DatabaseUnavailable) and is_outage(exc):
                raise DatabaseUnavailable() from exc
            raise

    async def run_in_thread(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """SQLite: `fn(connection)` on the kept connection's own thread (aiosqlite's), in one step rather
        than a hop there and back for each cursor, execute, fetch and close, in this process's turn to
        write. `fn` begins and ends its transaction itself. As with `use`, a database that cannot be used
        raises `DatabaseUnavailable`."""
        async with _writer_lock(self._sessions) or nullcontext(), self.use() as connection:
            assert connection.sync_connection is not None
            driver = connection.sync_connection.connection.driver_connection
            assert isinstance(driver, aiosqlite.Connection), driver
            # aiosqlite's own queue to its thread (it has no public call for a function of the connection):
            # behind anything still queued there, and the connection is this one user's (OwnConnection).
            result: T = await driver._execute(fn, driver._conn)  # type: ignore[no-untyped-call]
            return result

    async def _connect(self, bind: AsyncEngine) -> AsyncConnection:
        connection = await bind.connect()
        try:
            await connection.execution_options(isolation_level="AUTOCOMMIT")
            for name, value in self._settings.items():
                await connection.exec_driver_sql(f"SET {name} = {value}")
        except BaseException:
            with contextlib.suppress(Exception):
                await connection.close()
            raise
        return connection

    async def close(self) -> None:
        """Closed, not handed back to the pool: its session settings must not reach the pool's other users
        (the pool's reset on checkin is a ROLLBACK, which keeps them)."""
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.invalidate()
            with contextlib.suppress(Exception):
                await connection.close()


# SQLSTATEs that say the server is away or refusing connections, not that the statement is wrong:
# connection exceptions (08...), admin/crash shutdown and "starting up" (57P0x), too many connections.
_OUTAGE_SQLSTATES = ("08", "57P01", "57P02", "57P03", "53300")
# SQLite result codes (primary) for a file that cannot be reached or used right now: busy beyond the
# busy timeout, locked, I/O error, disk full, cannot open. "no such table" and the like stay loud.
_OUTAGE_SQLITE_CODES = {5, 6, 10, 13, 14}


def is_outage(exc: BaseException) -> bool:
    """Whether `exc`, raised by a unit of work, means the database could not be reached or used (an
    outage: retry later) rather than that the statement or the code is wrong (a bug: stay loud)."""
    if isinstance(exc, (sa_exc.TimeoutError, sa_exc.DisconnectionError)):
        return True  # no connection to be had from the pool, or a dead one that could not be replaced
    if isinstance(exc, sqlite3.Error):
        driver_error: BaseException | None = exc  # raised on a connection's thread (run_in_thread), unwrapped
    elif not isinstance(exc, sa_exc.DBAPIError):
        return False  # only what the database driver raised is looked at: our own errors are not outages
    elif exc.connection_invalidated:
        return True  # the dialect recognised a disconnect (and the pool dropped its connections)
    else:
        driver_error = exc.orig
    for error in (driver_error, driver_error.__cause__ if driver_error is not None else None):
        if isinstance(error, OSError):
            return True
        sqlstate = getattr(error, "sqlstate", None)
        if isinstance(sqlstate, str) and sqlstate.startswith(_OUTAGE_SQLSTATES):
            return True
        sqlite_code = getattr(error, "sqlite_errorcode", None)
        if isinstance(sqlite_code, int) and sqlite_code & 0xFF in _OUTAGE_SQLITE_CODES:
            return True
    return False


def outage_backoff_s(failures: int, cap_s: float = 5.0) -> float:
    """How long to wait after the `failures`-th failed attempt in a row to reach the database: doubling
    from 0.1 s up to `cap_s`, jittered so that processes do not all return at the same instant."""
    return float(min(0.1 * 2 ** min(failures - 1, 16), cap_s) * random.uniform(0.8, 1.2))


async def store_until_done(write: Callable[[], Awaitable[None]], what: str) -> bool:
    """Run `write`, one unit of work storing results that were costly to get (an upstream poll, a
    delivered webhook), until it lands: a database outage is waited out, not a reason to throw them
    away. Any other error is logged and the results dropped (their leases expire; the work is redone).
    """
    failures = 0
    while True:
        try:
            await write()
            return True
        except DatabaseUnavailable:
            failures += 1
            log.warning("database unavailable, storing again", extra={"what": what, "attempt": failures})
            await asyncio.sleep(outage_backoff_s(failures))
        except Exception as exc:
            log.error("storing failed", extra={"what": what, "error_type": type(exc).__name__})
            return False


async def insert_ignore(session: AsyncSession, model: type[Base], rows: list[dict[str, Any]]) -> int:
    """INSERT ... ON CONFLICT DO NOTHING on either database; returns how many rows were new."""
    if not rows:
        return 0
    table: Any = model.__table__
    stmt: Any
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        stmt = pg_insert(table).values(rows).on_conflict_do_nothing()
    else:
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        stmt = sqlite_insert(table).values(rows).on_conflict_do_nothing()
    result = await session.execute(stmt)
    return int(getattr(result, "rowcount", 0) or 0)


RowShape = tuple[tuple[str, TypeEngine[Any]], ...]


@cache
def value_rows(name: str, shape: RowShape, n: int) -> CTE:
    """`n` rows of (column, type) `shape` as a table named `name`, for one statement over a whole batch
    (UPDATE ... FROM rows WHERE ...), filled by `value_rows_params`.

    One bound parameter per cell, built once per shape and size: SQLAlchemy caches the compiled statement
    (a `values().data()` construct has no cache key and is compiled again on every execution, which costs
    milliseconds). VALUES names its columns column1, column2, ... on both PostgreSQL and SQLite; the
    typed parameters give PostgreSQL the column types even when a column is NULL in every row.
    """
    cells = ", ".join("(" + ", ".join(f":{name}_{i}_{j}" for j in range(len(shape))) + ")" for i in range(n))
    picks = ", ".join(f"column{j + 1} AS {col}" for j, (col, _) in enumerate(shape))
    typed = [bindparam(f"{name}_{i}_{j}", type_=type_) for i in range(n) for j, (_, type_) in enumerate(shape)]
    # Names and types come from the code's constants; every value is a bound parameter.
    rows = text(f"SELECT {picks} FROM (VALUES {cells}) AS {name}_values").bindparams(*typed)  # noqa: S608
    return rows.columns(*(column(col, type_) for col, type_ in shape)).cte(name)


def value_rows_size(n: int) -> int:
    """How many rows the statement for `n` rows has: the next power of two. A process then compiles, and
    each connection prepares, a handful of statements per shape instead of one per batch size; the rows
    past `n` are NULL, and NULL matches nothing."""
    return 1 << (max(n, 1) - 1).bit_length()


def value_rows_params(name: str, shape: RowShape, rows: list[tuple[Any, ...]]) -> dict[str, Any]:
    """The parameters of `value_rows(name, shape, value_rows_size(len(rows)))` for these rows (tuples in
    the shape's order)."""
    params = {f"{name}_{i}_{j}": cell for i, row in enumerate(rows) for j, cell in enumerate(row)}
    for i in range(len(rows), value_rows_size(len(rows))):
        params.update({f"{name}_{i}_{j}": None for j in range(len(shape))})
    return params
