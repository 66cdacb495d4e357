"""Hot-path statements run on the driver: a Core statement, compiled once by SQLAlchemy for PostgreSQL, then
executed straight on the asyncpg connection under the caller's session or connection.

Measured (bench/FINDINGS.md, issue 13): SQLAlchemy's execute path costs about 140 µs of CPU per statement
on top of asyncpg's 50-65 µs, and a submit runs ten of them at one per batch. The statement stays the one
Core object the module defines (one source of truth): SQLAlchemy compiles it, with its bind and result
processors; only the execution skips the ORM session, the execution context and the Result.

What stays as SQLAlchemy does it: the transaction (the statement runs inside the caller's, begun first if
it is not yet), `before_cursor_execute`/`after_cursor_execute` events (Server-Timing, the tests' statement
counts), and errors (wrapped as SQLAlchemy wraps them, the connection invalidated on a disconnect, so that
`is_outage` still tells an outage from a bug; a task cancelled mid-statement loses its connection, as
SQLAlchemy invalidates it on any exit exception). SQLite, and any statement that cannot be run this way
(expanding parameters), go through SQLAlchemy unchanged.

Bypassed: the adapter's execute mutex (sound while a connection serves one task at a time, as sessions do).
Bypassed: SQLAlchemy's prepared-statement cache; asyncpg's own per-connection statement cache prepares these.

This leans on about ten SQLAlchemy internals (the compiler's positiontup, _bind_processors and
_result_columns, the adapter's _transaction, _connection, _start_transaction and _handle_exception, the
connection's _dbapi_connection and _handle_dbapi_exception), so pyproject.toml caps SQLAlchemy at the
versions the suite ran on. A statement that falls back to SQLAlchemy on PostgreSQL only costs speed, so
nobody would notice: every fallback is counted (`fallbacks`) and every driver run too (`fast_runs`), and
tests/test_prebuilt.py fails when a hot statement falls back.
"""

from __future__ import annotations

import keyword
from collections import Counter, namedtuple
from collections.abc import Sequence
from typing import Any, NamedTuple, NoReturn, cast

from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.util.concurrency import greenlet_spawn


class _Plan:
    __slots__ = ("compiled", "names", "processors", "results", "row", "runs", "sql")

    def __init__(
        self,
        compiled: SQLCompiler,
        sql: str,
        names: Sequence[str],
        processors: Sequence[Any],
        row: Any,  # a namedtuple class: rows read by attribute, index or unpacking, as SQLAlchemy's Row
        results: Sequence[Any],  # one result processor (or None) per column
    ) -> None:
        self.compiled, self.sql, self.names, self.processors = compiled, sql, names, processors
        self.row, self.results = row, results
        self.runs = 0  # executions on the driver


class _NotPrebuilt(NamedTuple):
    """A statement SQLAlchemy executes instead, and why."""

    sql: str
    reason: str


# (SQL, why) -> how many statements meant for the driver went through SQLAlchemy on PostgreSQL instead.
fallbacks: Counter[tuple[str, str]] = Counter()
# (statement, parameter names, dialect) -> the statement, the dialect and the plan compiled for that dialect (or
# why there is none). Statements are module constants (or cached per batch size) and engines few, so this stays
# small; holding the statement and the dialect keeps their ids from being reused by others.
_plans: dict[tuple[int, tuple[str, ...], int], tuple[Any, Dialect, _Plan | _NotPrebuilt]] = {}


def fast_runs() -> dict[str, int]:
    """SQL -> how many times it ran on the driver, since the process started (for tests)."""
    runs: Counter[str] = Counter()
    for _statement, _dialect, plan in _plans.values():
        if isinstance(plan, _Plan):
            runs[plan.sql] += plan.runs
    return dict(runs)


def _plan(statement: Any, keys: tuple[str, ...], dialect: Dialect) -> _Plan | _NotPrebuilt:
    key = (id(statement), keys, id(dialect))
    cached = _plans.get(key)
    if cached is not None and cached[0] is statement and cached[1] is dialect:
        return cached[2]
    plan = _build(statement, keys, dialect)
    _plans[key] = (statement, dialect, plan)
    return plan


def _build(statement: Any, keys: tuple[str, ...], dialect: Dialect) -> _Plan | _NotPrebuilt:
    # Compiled for these parameter names, as SQLAlchemy compiles it when it executes (an INSERT's columns).
    compiled = cast(SQLCompiler, statement.compile(dialect=dialect, column_keys=list(keys)))
    if compiled.post_compile_params or compiled.literal_execute_params:
        return _NotPrebuilt(compiled.string, "expanding or literal parameters")
    if compiled.positiontup is None:
        return _NotPrebuilt(compiled.string, "no positional parameters")
    if compiled.insert_prefetch or compiled.update_prefetch:
        return _NotPrebuilt(compiled.string, "Python-side defaults (SQLAlchemy's execution context computes them)")
    names = list(compiled.positiontup)
    processors = [compiled._bind_processors.get(name) for name in names]
    if any(isinstance(p, tuple) for p in processors):
        return _NotPrebuilt(compiled.string, "bind processors per element")
    columns = [entry.keyname for entry in compiled._result_columns]
    bad = any(not k.isidentifier() or keyword.iskeyword(k) or k.startswith("_") for k in columns)
    if bad or len(set(columns)) != len(columns):
        return _NotPrebuilt(compiled.string, "result column names a namedtuple cannot hold")
    results = [entry.type._cached_result_processor(dialect, None) for entry in compiled._result_columns]
    row = namedtuple("Row", columns) if columns else tuple
    return _Plan(compiled, compiled.string, names, processors, row, results)


async def _connection(runner: AsyncSession | AsyncConnection) -> AsyncConnection:
    return await runner.connection() if isinstance(runner, AsyncSession) else runner


async def fetch(runner: AsyncSession | AsyncConnection, statement: Any, params: dict[str, Any]) -> list[Any]:
    """The rows `statement` returns with `params` (none for a statement without RETURNING)."""
    connection = await _connection(runner)
    if connection.dialect.name != "postgresql":
        result = await connection.execute(statement, params)
        return list(result.all()) if result.returns_rows else []
    plan = _plan(statement, tuple(sorted(params)), connection.dialect)
    if isinstance(plan, _NotPrebuilt):
        fallbacks[plan] += 1
        result = await connection.execute(statement, params)
        return list(result.all()) if result.returns_rows else []
    sync = connection.sync_connection
    assert sync is not None
    fairy = sync._dbapi_connection
    if fairy is None or sync.invalidated:
        # Revalidating needs SQLAlchemy's own path (a reconnect runs in a greenlet): let it do this one.
        fallbacks[(plan.sql, "connection invalidated")] += 1
        result = await connection.execute(statement, params)
        return list(result.all()) if result.returns_rows else []
    plan.runs += 1
    # Keyed by the bind names as written, as positiontup is (SQLAlchemy's execution context does the same):
    # escaped names ("b.x" -> "b_x") are for paramstyles that put names in the SQL, not asyncpg's $n.
    values = plan.compiled.construct_params(params, escape_names=False)
    args = [
        value if processor is None else processor(value)
        for value, processor in zip((values[name] for name in plan.names), plan.processors, strict=True)
    ]
    adapter: Any = fairy.dbapi_connection
    if adapter._transaction is None and adapter.isolation_level != "autocommit" and not sync.in_transaction():
        # A bare connection before its first statement: SQLAlchemy begins (its autobegin), so that its commit
        # and rollback end the driver's transaction begun below rather than skip it as never begun.
        await connection.begin()
    events = sync._has_events or sync.engine._has_events
    if events:
        sync.dispatch.before_cursor_execute(sync, None, plan.sql, args, None, False)
    try:
        if adapter._transaction is None:
            await adapter._start_transaction()  # as the adapter does before its first statement
        records = await adapter._connection.fetch(plan.sql, *args)
    except BaseException as error:  # exit exceptions too (a cancelled task): SQLAlchemy invalidates on those
        await _raise_wrapped(sync, adapter, error, plan.sql, args)
    if events:
        sync.dispatch.after_cursor_execute(sync, None, plan.sql, args, None, False)
    if not records:
        return []
    row, results = plan.row, plan.results
    if not any(results):
        return [row(*record) for record in records]
    return [
        row(*(value if p is None else p(value) for value, p in zip(record, results, strict=True))) for record in records
    ]


async def execute_many(runner: AsyncSession | AsyncConnection, statement: Any, rows: list[dict[str, Any]]) -> None:
    """`statement` for each of `rows`: one row on the driver (the common case at low load), several through
    SQLAlchemy, whose insertmanyvalues makes them one multi-row statement."""
    if len(rows) == 1:
        await fetch(runner, statement, rows[0])
    elif rows:
        await (await _connection(runner)).execute(statement, rows)


async def _raise_wrapped(sync: Connection, adapter: Any, error: BaseException, sql: str, args: list[Any]) -> NoReturn:
    """Raise `error` as SQLAlchemy would have: the adapter's DBAPI error, wrapped in a DBAPIError, the
    connection invalidated when it is a disconnect or an exit exception such as CancelledError, which is
    re-raised as it is (invalidating closes the driver connection: in a greenlet)."""
    translated = error
    if isinstance(error, Exception):  # the adapter translates what its statements raise, not exit exceptions
        try:
            adapter._handle_exception(error)
        except Exception as raised:
            translated = raised
    await greenlet_spawn(_handle_in_greenlet, sync, translated, sql, args)
    raise translated  # not reached: the handler raises


def _handle_in_greenlet(sync: Connection, error: BaseException, sql: str, args: list[Any]) -> NoReturn:
    # Raised here so that sys.exc_info(), which SQLAlchemy's handler reads (it re-raises an exit exception
    # from it), holds `error`: a greenlet starts with none of its parent's.
    try:
        raise error
    except BaseException as raised:
        sync._handle_dbapi_exception(raised, sql, args, None, None)
