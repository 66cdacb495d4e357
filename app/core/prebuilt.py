"""Hot-path statements run on the driver: a Core statement, compiled once by SQLAlchemy for PostgreSQL, then
executed straight on the asyncpg connection under the caller's session or connection.

Measured (bench/FINDINGS.md, issue 13): SQLAlchemy's execute path costs about 140 µs of CPU per statement
on top of asyncpg's 50-65 µs, and a submit runs ten of them at one per batch. The statement stays the one
Core object the module defines (one source of truth): SQLAlchemy compiles it, with its bind and result
processors; only the execution skips the ORM session, the execution context and the Result.

What stays as SQLAlchemy does it: the transaction (the statement runs inside the caller's, begun first if
it is not yet), `before_cursor_execute`/`after_cursor_execute` events (Server-Timing, the tests' statement
counts), and errors (wrapped as SQLAlchemy wraps them, the connection invalidated on a disconnect, so that
`is_outage` still tells an outage from a bug). SQLite, and any statement that cannot be run this way
(expanding parameters), go through SQLAlchemy unchanged.
"""

from __future__ import annotations

import keyword
from collections import namedtuple
from collections.abc import Sequence
from typing import Any, NamedTuple, cast

from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.util.concurrency import greenlet_spawn


class _Plan(NamedTuple):
    compiled: SQLCompiler
    sql: str
    names: Sequence[str]
    processors: Sequence[Any]
    row: Any  # a namedtuple class: rows read by attribute, index or unpacking, as SQLAlchemy's Row
    results: Sequence[Any]  # one result processor (or None) per column


_NOT_PREBUILT: Any = object()
# (statement, parameter names) -> the statement and its plan for PostgreSQL (or _NOT_PREBUILT). Statements are
# module constants (or cached per batch size), so this stays small.
_plans: dict[tuple[int, tuple[str, ...]], tuple[Any, Any]] = {}


def _plan(statement: Any, keys: tuple[str, ...], dialect: Dialect) -> _Plan | None:
    cached = _plans.get((id(statement), keys))
    if cached is not None and cached[0] is statement:
        return None if cached[1] is _NOT_PREBUILT else cast(_Plan, cached[1])
    plan = _build(statement, keys, dialect)
    _plans[(id(statement), keys)] = (statement, _NOT_PREBUILT if plan is None else plan)
    return plan


def _build(statement: Any, keys: tuple[str, ...], dialect: Dialect) -> _Plan | None:
    # Compiled for these parameter names, as SQLAlchemy compiles it when it executes (an INSERT's columns).
    compiled = cast(SQLCompiler, statement.compile(dialect=dialect, column_keys=list(keys)))
    if (
        compiled.post_compile_params
        or compiled.literal_execute_params
        or compiled.positiontup is None
        or compiled.insert_prefetch  # Python-side defaults are computed by SQLAlchemy's execution context
        or compiled.update_prefetch
    ):
        return None
    names = list(compiled.positiontup)
    processors = [compiled._bind_processors.get(name) for name in names]
    if any(isinstance(p, tuple) for p in processors):
        return None
    columns = [entry.keyname for entry in compiled._result_columns]
    bad = any(not k.isidentifier() or keyword.iskeyword(k) or k.startswith("_") for k in columns)
    if bad or len(set(columns)) != len(columns):
        return None
    results = [entry.type._cached_result_processor(dialect, None) for entry in compiled._result_columns]
    row = namedtuple("Row", columns) if columns else tuple
    return _Plan(compiled, compiled.string, names, processors, row, results)


async def _connection(runner: AsyncSession | AsyncConnection) -> AsyncConnection:
    return await runner.connection() if isinstance(runner, AsyncSession) else runner


async def fetch(runner: AsyncSession | AsyncConnection, statement: Any, params: dict[str, Any]) -> list[Any]:
    """The rows `statement` returns with `params` (none for a statement without RETURNING)."""
    connection = await _connection(runner)
    plan = (
        _plan(statement, tuple(sorted(params)), connection.dialect) if connection.dialect.name == "postgresql" else None
    )
    if plan is None:
        result = await connection.execute(statement, params)
        return list(result.all()) if result.returns_rows else []
    sync = connection.sync_connection
    assert sync is not None
    fairy = sync._dbapi_connection
    if fairy is None or sync.invalidated:
        # Revalidating needs SQLAlchemy's own path (a reconnect runs in a greenlet): let it do this one.
        result = await connection.execute(statement, params)
        return list(result.all()) if result.returns_rows else []
    values = plan.compiled.construct_params(params)
    args = [
        value if processor is None else processor(value)
        for value, processor in zip((values[name] for name in plan.names), plan.processors, strict=True)
    ]
    events = sync._has_events or sync.engine._has_events
    if events:
        sync.dispatch.before_cursor_execute(sync, None, plan.sql, args, None, False)
    adapter: Any = fairy.dbapi_connection
    try:
        if adapter._transaction is None:
            await adapter._start_transaction()  # as the adapter does before its first statement
        records = await adapter._connection.fetch(plan.sql, *args)
    except Exception as error:
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


async def _raise_wrapped(sync: Connection, adapter: Any, error: Exception, sql: str, args: list[Any]) -> None:
    """Raise `error` as SQLAlchemy would have: the adapter's DBAPI error, wrapped in a DBAPIError, the
    connection invalidated when it is a disconnect (which closes the driver connection: in a greenlet)."""
    try:
        adapter._handle_exception(error)
    except Exception as translated:
        await greenlet_spawn(sync._handle_dbapi_exception, translated, sql, args, None, None)
    raise error  # not reached: both calls above raise
