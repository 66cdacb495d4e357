"""A ledger writer batch in one step on SQLite: what app/budgets/fastbatch.py's one statement does on
PostgreSQL, for the same common holds and settles, as one transaction run in one call on the writer
connection's own thread (OwnConnection.run_in_thread, app/core/database.py).

Why: SQLite has no statement that writes several tables, and through SQLAlchemy each of the transaction's
ten or so statements cost about 0.3 ms of the event loop's time and three or four hops to aiosqlite's
thread and back, so a batch took 2-3 ms of the loop and SQLite served 0.12 of the floor
(bench/FINDINGS.md, issue 25). Here the statements are plain sqlite3 calls on that thread, where SQLite's
own work and the fsync do not hold up the event loop.

It is the PostgreSQL statement's rules, step for step (its docstring says them; tests/test_fastbatch.py
runs both this and move_batch on the same batches and compares every row): the batch's settles (those
still waiting and never charged) and holds, grouped per tenant counter; a group held only if it fits the
budget after the settles; nothing at all if a settle crosses a threshold line or a counter is missing.
BEGIN IMMEDIATE takes SQLite's write lock, so what is read here cannot change before the COMMIT: the
checks need no row locks. The counters' CHECK constraints (never negative) stay the last guard.
"""

from __future__ import annotations

import sqlite3
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import orjson
from sqlalchemy import Date
from sqlalchemy.dialects.sqlite.base import SQLiteDialect

from app.budgets.fastbatch import Applied, FastHold, FastSettle
from app.budgets.scopes import tenant_scope
from app.budgets.service import THRESHOLDS
from app.core import metrics
from app.core.database import UTCDateTime

_DIALECT = SQLiteDialect()
# What SQLAlchemy stores on SQLite for a timestamp and a day (text), so that rows written here compare
# equal to the ones the transaction writes (counters are found by their period_start).
_STAMP: Callable[[datetime | None], str | None] = UTCDateTime().dialect_impl(_DIALECT).bind_processor(_DIALECT)  # type: ignore[assignment]
_DAY: Callable[[date], str] = Date().dialect_impl(_DIALECT).bind_processor(_DIALECT)  # type: ignore[assignment]

# Statuses and ledger kinds as the enums' values (app/predictions/models.py), as fastbatch.py writes them.
_WAITING = """
SELECT id, tenant_id, api_key_id, model_id, period_start, estimate_cents FROM predictions
WHERE id IN (SELECT value FROM json_each(?)) AND status IN ('submitting', 'sending') AND charged_cents IS NULL
ORDER BY id
"""
_SEEN = "SELECT max_seen_cents FROM price_points WHERE model_id = ? AND resolution = ? AND duration_s = ?"
_COUNTER = """
SELECT c.spent_cents, c.reserved_cents, t.budget_cents FROM budget_counters c, tenants t
WHERE c.scope = ? AND c.period_start = ? AND t.id = ?
"""
_CONFIRM = """
UPDATE predictions SET upstream_id = ?, status = 'processing', estimated_time = ?, next_poll_at = ?, provider = ?,
    upstream_ref = COALESCE(?, upstream_ref), charged_cents = ?
WHERE id = ?
"""
_COUNT = """
UPDATE budget_counters SET reserved_cents = reserved_cents + ?, spent_cents = spent_cents + ?
WHERE scope = ? AND period_start = ?
"""
_INSERT = """
INSERT INTO predictions (id, tenant_id, api_key_id, model_id, model_name, status, params, webhook_url,
    webhook_events, metadata, estimate_cents, holds_slot, charged_cents, period_start, created_at,
    poll_count, poll_failures, public_base_url, holds_provider_slot)
VALUES (?, ?, ?, ?, ?, 'submitting', ?, ?, ?, ?, ?, 0, NULL, ?, ?, 0, 0, ?, 0)
"""
_LEDGER = """
INSERT INTO ledger_entries (tenant_id, api_key_id, prediction_id, model_id, provider, period_start, kind,
    reserved_delta, spent_delta, note, created_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?)
"""
_DAYS = """
INSERT INTO daily_usage (tenant_id, day, spent_cents, predictions, refusals) VALUES (?, ?, ?, ?, 0)
ON CONFLICT (tenant_id, day) DO UPDATE SET
    spent_cents = daily_usage.spent_cents + excluded.spent_cents,
    predictions = daily_usage.predictions + excluded.predictions
"""


@dataclass
class _Group:
    """One counter's share of the batch: fastbatch.py's `touch` row, then its `plan` row."""

    tenant_id: str
    dr: int = 0  # the settles' holds given back
    ds: int = 0  # the settles' costs
    amt: int = 0  # the holds
    spent: int | None = None  # None: no counter (yet) for this period
    budget: int | None = None
    fits: bool = False  # the holds are held: the counter exists and they fit within the budget

    def fits_after(self, reserved: int) -> bool:
        assert self.spent is not None
        return (
            self.amt == 0 or self.budget is None or self.spent + reserved + self.ds + self.dr + self.amt <= self.budget
        )

    def crosses_a_line(self) -> bool:
        """A settle takes the tenant across 50, 80 or 100 % of its budget: move_batch writes the notice."""
        spent, budget = self.spent or 0, self.budget
        if self.ds == 0 or budget is None or budget <= 0:
            return False
        return any(spent * 100 < p * budget <= (spent + self.ds) * 100 for p in THRESHOLDS)


def batch(holds: list[FastHold], settles: list[FastSettle], now: datetime) -> Callable[[sqlite3.Connection], Applied]:
    """The batch as a function of the connection, for its thread; the values converted to what SQLAlchemy
    stores on SQLite here, on the caller's side."""
    stamp = _STAMP(now)
    day = _DAY(now.date())
    hold_rows = [(h, _STAMP(h.period_start)) for h in holds]
    settle_rows = {s.prediction_id: (s, _STAMP(s.next_poll_at)) for s in settles}

    def run(connection: sqlite3.Connection) -> Applied:
        counted = _Counted(connection)
        counted.execute("BEGIN IMMEDIATE")
        try:
            applied = _apply(counted, hold_rows, settle_rows, stamp, day)
            connection.execute("COMMIT" if applied.go else "ROLLBACK")
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise
        finally:
            metrics.DB_STATEMENTS.inc(counted.statements)
        return applied

    return run


class _Counted:
    """The connection's statements, counted as the engine's events count SQLAlchemy's (one a call; the
    COMMIT is not one): `vidgate_db_statements_total`, which the benchmark reports per submit."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self.connection = connection
        self.statements = 0

    def execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        self.statements += 1
        return self.connection.execute(sql, params)

    def executemany(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        if rows:
            self.statements += 1
            self.connection.executemany(sql, rows)


def _apply(
    connection: _Counted,
    holds: list[tuple[FastHold, str | None]],
    settles: dict[str, tuple[FastSettle, str | None]],
    stamp: str | None,
    day: str,
) -> Applied:
    waiting = connection.execute(_WAITING, [orjson.dumps(list(settles)).decode()]).fetchall() if settles else []
    amounts, seen = _priced(connection, [hold for hold, _ in holds])
    groups = _groups(connection, waiting, settles, holds, amounts)
    moves = [g for g in groups.values() if g.dr or g.ds]
    if any(g.spent is None or g.crosses_a_line() for g in moves):
        return Applied(False, set(), set(), amounts, seen)
    held = [
        (hold, period, amount)
        for (hold, period), amount in zip(holds, amounts, strict=True)
        if groups[(tenant_scope(hold.tenant_id), period or "")].fits
    ]
    connection.executemany(
        _CONFIRM,
        [
            (s.upstream_id, s.estimated_time, poll, s.provider, s.ref, s.cost, s.prediction_id)
            for s, poll in (settles[row[0]] for row in waiting)
        ],
    )
    connection.executemany(
        _COUNT,
        [(g.dr + (g.amt if g.fits else 0), g.ds, *k) for k, g in sorted(groups.items()) if g.spent is not None],
    )
    connection.executemany(
        _INSERT,
        [
            (
                *(h.prediction_id, h.tenant_id, h.api_key_id, h.model_id, h.model_name, h.params, h.webhook_url),
                *(h.webhook_events, h.meta, amount, period, stamp, h.public_base_url),
            )
            for h, period, amount in held
        ],
    )
    ledger: list[tuple[Any, ...]] = [
        (tenant_id, key_id, id_, model_id, settles[id_][0].provider, period, "settle", -estimate, settles[id_][0].cost)
        for id_, tenant_id, key_id, model_id, period, estimate in waiting
    ]
    ledger += [
        (h.tenant_id, h.api_key_id, h.prediction_id, h.model_id, None, period, "reserve", amount, 0)
        for h, period, amount in held
    ]
    connection.executemany(_LEDGER, [(*row, stamp) for row in ledger])
    days: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for id_, tenant_id, *_ in waiting:
        if cost := settles[id_][0].cost:
            days[tenant_id][0] += cost
            days[tenant_id][1] += 1
    connection.executemany(_DAYS, [(t, day, cents, n) for t, (cents, n) in sorted(days.items())])
    return Applied(True, {row[0] for row in waiting}, {h.prediction_id for h, _, _ in held}, amounts, seen)


def _priced(connection: _Counted, holds: list[FastHold]) -> tuple[list[int], list[int | None]]:
    """Per hold, in order, the cents it holds and its price point's highest bill seen (fastbatch.py's `h`)."""
    seen_at: dict[tuple[str, str, int], int | None] = {}
    amounts: list[int] = []
    seen: list[int | None] = []
    for hold in holds:
        point = (hold.model_id, hold.resolution, hold.duration_s)
        if point not in seen_at:
            row = connection.execute(_SEEN, point).fetchone()
            seen_at[point] = None if row is None else row[0]
        bill = seen_at[point]
        priced = max(hold.table_cents, bill or 0) if hold.priced else 0
        amounts.append(max(hold.floor_cents, priced))
        seen.append(bill)
    return amounts, seen


def _groups(
    connection: _Counted,
    waiting: list[Any],
    settles: dict[str, tuple[FastSettle, str | None]],
    holds: list[tuple[FastHold, str | None]],
    amounts: list[int],
) -> dict[tuple[str, str], _Group]:
    """The batch's money per counter (scope, period), with each counter as it stands (fastbatch.py's
    `touch`, `locked` and `plan`), read in the counters' order."""
    groups: dict[tuple[str, str], _Group] = {}
    for id_, tenant_id, _key, _model, period, estimate in waiting:
        group = groups.setdefault((tenant_scope(tenant_id), period), _Group(tenant_id))
        group.dr -= estimate
        group.ds += settles[id_][0].cost
    for (hold, period), amount in zip(holds, amounts, strict=True):
        groups.setdefault((tenant_scope(hold.tenant_id), period or ""), _Group(hold.tenant_id)).amt += amount
    for (scope, period), group in sorted(groups.items()):
        row = connection.execute(_COUNTER, (scope, period, group.tenant_id)).fetchone()
        if row is not None:
            group.spent, reserved, group.budget = row
            group.fits = group.fits_after(reserved)
    return groups
