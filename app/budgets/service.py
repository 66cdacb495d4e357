"""Budgets: prices and estimates, quotes, usage reports and the ledger check. Money itself moves in
app/budgets/movements.py."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import (
    Integer,
    bindparam,
    func,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession

from app.budgets import limits as budget_limits
from app.budgets.models import BudgetCounter, DailyUsage, LedgerEntry, PricePoint
from app.budgets.scopes import is_key_scope, key_scope, tenant_scope
from app.core import clock, prebuilt
from app.core.database import (
    insert_ignore,
    table_of,
)
from app.core.errors import AppError
from app.tenants.models import ApiKey, Tenant

# The one published price point: 480p for 5 s costs 9 cents. Other resolutions scale by pixel count.
PUBLISHED_CENTS_PER_SECOND_480P = 9 / 5
RESOLUTION_FACTOR = {"480p": 1.0, "720p": (1280 * 720) / (854 * 480), "1080p": (1920 * 1080) / (854 * 480)}
DEFAULT_RESOLUTION = "720p"
DEFAULT_DURATION_S = 5
THRESHOLDS = (50, 80, 100)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class BudgetExceeded(AppError):
    status = 402
    code = "budget_exceeded"
    title = "Budget exceeded"


@dataclass(frozen=True)
class Period:
    start: datetime
    end: datetime | None  # None for the "total" period


@dataclass(frozen=True)
class Hold:
    """What a prediction holds or was charged, and where: enough to settle or release it."""

    tenant_id: str
    api_key_id: str
    prediction_id: str
    model_id: str
    period_start: datetime
    # Whether the key keeps a counter of its own; when unknown (True), its UPDATE simply finds no row.
    key_budgeted: bool = True
    # The provider that served (settle, refund) or was last tried (release); None before one is chosen.
    provider: str | None = None


def period_of(kind: str, at: datetime) -> Period:
    at = at.astimezone(UTC)
    day = at.replace(hour=0, minute=0, second=0, microsecond=0)
    if kind == "day":
        return Period(day, day + timedelta(days=1))
    if kind == "week":
        start = day - timedelta(days=day.weekday())
        return Period(start, start + timedelta(days=7))
    if kind == "month":
        start = day.replace(day=1)
        end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
        return Period(start, end)
    return Period(EPOCH, None)


# ---------------------------------------------------------------- estimates


def table_estimate(price_table: dict[str, dict[str, float]], model_id: str, resolution: str, duration_s: int) -> int:
    per_second = price_table.get(model_id, {}).get(resolution)
    if per_second is None:
        per_second = PUBLISHED_CENTS_PER_SECOND_480P * RESOLUTION_FACTOR[resolution]
    return math.ceil(per_second * duration_s - 1e-9)


# Statements on the submit path are built once, at import: building one per call cost more CPU than the
# database spends executing it (bench/FINDINGS.md). Bind names differ from column names on purpose.
_prices = table_of(PricePoint).c
_PRICE_SEEN = select(_prices.max_seen_cents).where(
    _prices.model_id == bindparam("b_model"),
    _prices.resolution == bindparam("b_resolution"),
    _prices.duration_s == bindparam("b_duration"),
)


@dataclass(frozen=True)
class Estimate:
    cents: int
    seen_cents: int | None  # the highest the vendor has billed for this point, if ever


async def price_estimate(
    session: AsyncSession,
    price_table: dict[str, dict[str, float]],
    model_id: str,
    resolution: str,
    duration_s: int,
) -> Estimate:
    rows = await prebuilt.fetch(
        session, _PRICE_SEEN, {"b_model": model_id, "b_resolution": resolution, "b_duration": duration_s}
    )
    seen: int | None = rows[0].max_seen_cents if rows else None
    return Estimate(max(table_estimate(price_table, model_id, resolution, duration_s), seen or 0), seen)


async def estimate_cents(
    session: AsyncSession,
    price_table: dict[str, dict[str, float]],
    model_id: str,
    resolution: str,
    duration_s: int,
) -> int:
    return (await price_estimate(session, price_table, model_id, resolution, duration_s)).cents


_prices_table = table_of(PricePoint)
_LEARN = (
    update(_prices_table)
    .where(
        _prices.model_id == bindparam("b_model"),
        _prices.resolution == bindparam("b_resolution"),
        _prices.duration_s == bindparam("b_duration"),
        _prices.max_seen_cents < bindparam("b_cents", type_=Integer),
    )
    .values(max_seen_cents=bindparam("b_cents", type_=Integer), updated_at=bindparam("b_now"))
)


async def learn_prices(session: AsyncSession, points: dict[tuple[str, str, int], int]) -> None:
    """Raise the remembered maximum of price points, never lower it: (model, resolution, duration) ->
    cents billed. One INSERT of the points not seen yet, one UPDATE (executemany) raising the others, in
    the points' order."""
    if not points:
        return
    now = clock.now()
    ordered = sorted(points.items())
    rows = [
        dict(model_id=m, resolution=r, duration_s=d, max_seen_cents=cents, updated_at=now)
        for (m, r, d), cents in ordered
    ]
    await insert_ignore(session, PricePoint, rows)
    await session.execute(
        _LEARN,
        [
            {"b_model": m, "b_resolution": r, "b_duration": d, "b_cents": cents, "b_now": now}
            for (m, r, d), cents in ordered
        ],
    )


def hold_cents(estimate_cents: int | None, provider_prices: list[int]) -> int:
    """What a submit holds (SPEC §11): the highest price among its candidate providers, so whichever
    serves it, the budget holds. `estimate_cents`: the estimate for candidates whose answers carry their
    price (None when there is none); `provider_prices`: the others' cents_per_second x duration."""
    prices = [*provider_prices, *([estimate_cents] if estimate_cents is not None else [])]
    return max(prices) if prices else 0


def per_second_cents(cents_per_second: float, duration_s: int) -> int:
    """cents_per_second x duration, rounded up to a whole cent (SPEC §11). The product is rounded to a
    millionth first, so 1.8 x 5 is 9 and not ceil(9.000000000000002) = 10."""
    return math.ceil(round(cents_per_second * duration_s, 6))


def provider_charge(reported_cents: int | None, price_cents: int | None) -> int:
    """What the provider that served charges: the cost its answer reports, else its price by the file."""
    if reported_cents is not None:
        return reported_cents
    if price_cents is None:
        raise ValueError("a provider answered no cost and has no price")
    return price_cents


async def daily_usage(session: AsyncSession, tenant_id: str, first: date, last: date) -> list[DailyUsage]:
    """The rollup rows of one tenant between two UTC days (inclusive): a range of its primary key."""
    rows = await session.scalars(
        select(DailyUsage)
        .where(DailyUsage.tenant_id == tenant_id, DailyUsage.day >= first, DailyUsage.day <= last)
        .order_by(DailyUsage.day)
    )
    return list(rows)


# ---------------------------------------------------------------- quotes


@dataclass(frozen=True)
class Quote:
    estimate_cents: int
    fits: bool
    remaining_cents: int | None  # the tenant's; None when unlimited
    budget_cents: int | None
    resets_at: datetime | None


async def quote(
    session: AsyncSession,
    price_table: dict[str, dict[str, float]],
    tenant: Tenant,
    key: ApiKey,
    model_id: str,
    resolution: str | None,
    duration_s: int | None,
    provider_prices: list[int] | None = None,
    answer_priced: bool = True,
) -> Quote:
    """What a submit now would hold (hold_cents of the candidates), and whether it would pass the budget,
    concurrency and rate checks. Reads only: nothing is held, nothing counted."""
    now = clock.now()
    estimated = (
        await estimate_cents(
            session, price_table, model_id, resolution or DEFAULT_RESOLUTION, duration_s or DEFAULT_DURATION_S
        )
        if answer_priced
        else None
    )
    estimate = hold_cents(estimated, provider_prices or [])
    period = period_of(tenant.budget_period, now)
    fits = await budget_limits.would_admit(session, tenant, now)
    remaining: int | None = None
    for scope, limit in ((tenant_scope(tenant.id), tenant.budget_cents), (key_scope(key.id), key.budget_cents)):
        if limit is None:
            continue
        counter = await session.get(BudgetCounter, (scope, period.start))
        left = max(limit - (counter.spent_cents + counter.reserved_cents if counter else 0), 0)
        if not is_key_scope(scope):
            remaining = left
        # The same condition as the hold's UPDATE: spent + reserved + estimate <= limit.
        fits = fits and estimate <= left
    return Quote(estimate, fits, remaining, tenant.budget_cents, period.end)


# ---------------------------------------------------------------- reports


@dataclass(frozen=True)
class Usage:
    budget_cents: int | None
    period: str
    period_start: datetime | None
    period_end: datetime | None
    spent_cents: int
    reserved_cents: int

    @property
    def remaining_cents(self) -> int | None:
        if self.budget_cents is None:
            return None
        return max(self.budget_cents - self.spent_cents - self.reserved_cents, 0)

    def present(self) -> dict[str, Any]:
        """The usage payload: the tenant's and the operator's usage answers and budget.threshold events."""
        return {
            "budgetCents": self.budget_cents,
            "period": self.period,
            "periodStart": clock.iso(self.period_start),
            "periodEnd": clock.iso(self.period_end),
            "spentCents": self.spent_cents,
            "reservedCents": self.reserved_cents,
            "remainingCents": self.remaining_cents,
        }


async def tenant_usage(session: AsyncSession, tenant: Tenant) -> Usage:
    """The current period's usage, summed from the ledger."""
    period = period_of(tenant.budget_period, clock.now())
    spent, reserved = (
        await session.execute(
            select(
                func.coalesce(func.sum(LedgerEntry.spent_delta), 0),
                func.coalesce(func.sum(LedgerEntry.reserved_delta), 0),
            ).where(LedgerEntry.tenant_id == tenant.id, LedgerEntry.period_start == period.start)
        )
    ).one()
    return Usage(
        budget_cents=tenant.budget_cents,
        period=tenant.budget_period,
        period_start=period.start if tenant.budget_period != "total" else None,
        period_end=period.end,
        spent_cents=int(spent),
        reserved_cents=int(reserved),
    )


async def usage_report(
    session: AsyncSession, start: datetime | None, end: datetime | None, group_by: str
) -> list[dict[str, Any]]:
    """Spent cents and predictions charged, from the ledger, grouped by tenant, model, provider (the one
    that served) or UTC day."""
    key: Any = {
        "tenant": LedgerEntry.tenant_id,
        "model": LedgerEntry.model_id,
        "provider": LedgerEntry.provider,
        "day": func.date(LedgerEntry.created_at),
    }[group_by]
    stmt = select(
        key.label("key"),
        func.coalesce(func.sum(LedgerEntry.spent_delta), 0).label("spent"),
        func.count(LedgerEntry.id).filter(LedgerEntry.kind == "settle").label("predictions"),
    ).where(LedgerEntry.spent_delta != 0)
    if start is not None:
        stmt = stmt.where(LedgerEntry.created_at >= start)
    if end is not None:
        stmt = stmt.where(LedgerEntry.created_at < end)
    rows = await session.execute(stmt.group_by(key).order_by(key))
    return [{group_by: str(row.key), "spentCents": int(row.spent), "predictions": int(row.predictions)} for row in rows]


def usage_csv(rows: list[dict[str, Any]], group_by: str) -> str:
    out = io.StringIO()
    fields = [group_by, "spentCents", "predictions"] + (["storedBytes"] if group_by == "tenant" else [])
    writer = csv.DictWriter(out, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


async def current_usage(session: AsyncSession, tenant: Tenant) -> Usage:
    """The current period's usage from the tenant's counter row (one primary-key read), for pages."""
    period = period_of(tenant.budget_period, clock.now())
    counter = await session.get(BudgetCounter, (tenant_scope(tenant.id), period.start), populate_existing=True)
    return Usage(
        budget_cents=tenant.budget_cents,
        period=tenant.budget_period,
        period_start=period.start if tenant.budget_period != "total" else None,
        period_end=period.end,
        spent_cents=counter.spent_cents if counter else 0,
        reserved_cents=counter.reserved_cents if counter else 0,
    )


async def current_balances(session: AsyncSession) -> dict[str, tuple[int, int]]:
    """(spent, reserved) of every live tenant's current period, for the metrics gauges."""
    now = clock.now()
    tenants = await session.execute(select(Tenant.id, Tenant.budget_period).where(Tenant.deleted_at.is_(None)))
    wanted = {(tenant_scope(tid), period_of(kind, now).start): tid for tid, kind in tenants}
    if not wanted:
        return {}
    starts = {start for _, start in wanted}
    rows = await session.execute(
        select(BudgetCounter).where(
            BudgetCounter.scope.in_([scope for scope, _ in wanted]), BudgetCounter.period_start.in_(starts)
        )
    )
    balances = dict.fromkeys(wanted.values(), (0, 0))
    for (counter,) in rows:
        tenant_id = wanted.get((counter.scope, counter.period_start))
        if tenant_id is not None:
            balances[tenant_id] = (counter.spent_cents, counter.reserved_cents)
    return balances


@dataclass(frozen=True)
class Mismatch:
    scope: str
    period_start: datetime
    counter_spent: int
    counter_reserved: int
    ledger_spent: int
    ledger_reserved: int


async def verify_ledger(session: AsyncSession) -> list[Mismatch]:
    """Recompute every counter from the ledger; any difference is a bug worth waking someone for."""
    sums: dict[tuple[str, datetime], tuple[int, int]] = {}
    budgeted_keys = select(ApiKey.id).where(ApiKey.budget_cents.is_not(None))
    for column, scope_of in ((LedgerEntry.tenant_id, tenant_scope), (LedgerEntry.api_key_id, key_scope)):
        query = select(
            column,
            LedgerEntry.period_start,
            func.sum(LedgerEntry.spent_delta),
            func.sum(LedgerEntry.reserved_delta),
        ).group_by(column, LedgerEntry.period_start)
        if column is LedgerEntry.api_key_id:
            # Only keys with a budget of their own keep a counter.
            query = query.where(LedgerEntry.api_key_id.in_(budgeted_keys))
        rows = await session.execute(query)
        for owner, period_start, spent, reserved in rows:
            if owner is not None:
                sums[(scope_of(owner), period_start)] = (int(spent), int(reserved))
    counters = {
        (c.scope, c.period_start): (c.spent_cents, c.reserved_cents)
        for c in await session.scalars(select(BudgetCounter))
    }
    mismatches = []
    for scope, period_start in sorted(set(sums) | set(counters)):
        ledger = sums.get((scope, period_start), (0, 0))
        counter = counters.get((scope, period_start), (0, 0))
        if ledger != counter or counter[1] < 0:
            mismatches.append(Mismatch(scope, period_start, counter[0], counter[1], ledger[0], ledger[1]))
    return mismatches + await _verify_daily_usage(session)


async def _verify_daily_usage(session: AsyncSession) -> list[Mismatch]:
    """The dashboard's rollup against the ledger, day by day (scope "day:<tenant id>")."""
    day = func.date(LedgerEntry.created_at)
    rows = await session.execute(
        select(LedgerEntry.tenant_id, day, func.sum(LedgerEntry.spent_delta))
        .where(LedgerEntry.spent_delta != 0)
        .group_by(LedgerEntry.tenant_id, day)
    )
    # SQLite's date() is text, PostgreSQL's a date: compare them as dates.
    ledger = {(tenant_id, date.fromisoformat(str(d)[:10])): int(spent) for tenant_id, d, spent in rows}
    rollup = {(r.tenant_id, r.day): r.spent_cents for r in await session.scalars(select(DailyUsage))}
    return [
        Mismatch(
            f"day:{tenant_id}",
            datetime.combine(d, datetime.min.time(), UTC),
            rollup.get((tenant_id, d), 0),
            0,
            ledger.get((tenant_id, d), 0),
            0,
        )
        for tenant_id, d in sorted(set(ledger) | set(rollup))
        if ledger.get((tenant_id, d), 0) != rollup.get((tenant_id, d), 0)
    ]
