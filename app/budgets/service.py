"""Where money moves. Every change of a balance is one conditional or arithmetic SQL UPDATE that the
database applies atomically, plus one append-only ledger row in the same transaction.

Scopes: every movement updates the tenant's counter ("tenant:<id>") and the key's ("key:<id>"), so a
key can carry a smaller budget of its own. Counters are per budget period; a hold is settled or
released in the period it was taken in.

Lock order. Every writer (holds, settles, releases, terminal transitions, late charges; one connection
each, several processes) takes the rows it changes phase by phase, each phase sorted by tenant id, so
that no two transactions wait for each other in a cycle (PostgreSQL would abort one after
deadlock_timeout; SQLite has one writer at a time):
  0. the batch's own rows: its idempotency keys (by tenant, key), its predictions, the price points
     (sorted); rows no other writer takes at the same time but by a race the fences settle.
  1. rate limits (rate_limits, holds only);
  2. slots (tenants.in_flight);
  3. budget counters: each tenant's own, then its keys' (sorted), in tenant order;
  4. daily rollup rows (daily_usage).
Inserts of new rows (ledger, notices, deliveries) and the idempotency answer (a row the batch claimed)
come anywhere after. A conditional UPDATE that refuses locks nothing, and giving back what the
transaction took touches rows it holds already: neither changes the order. So reserve_many goes phase
by phase over all its tenants (not tenant by tenant), refusals are counted on the days after every
counter, and a late charge is settled with its batch (settle_many), after the batch's slots.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from functools import cache, partial
from typing import Any, Protocol

from sqlalchemy import (
    Boolean,
    ColumnElement,
    Integer,
    Select,
    String,
    and_,
    bindparam,
    func,
    insert,
    or_,
    select,
    table,
    update,
)
from sqlalchemy import column as table_column
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.attributes import set_committed_value

from app.budgets import limits as budget_limits
from app.budgets.models import BudgetCounter, DailyUsage, LedgerEntry, PricePoint, ThresholdNotice
from app.budgets.scopes import is_key_scope, key_scope, tenant_scope
from app.core import clock, prebuilt
from app.core.database import (
    RowShape,
    UTCDateTime,
    insert_ignore,
    table_of,
    value_rows,
    value_rows_params,
    value_rows_size,
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


# ---------------------------------------------------------------- movements


async def _ensure_counters(session: AsyncSession, scopes: list[str], period_start: datetime) -> None:
    await insert_ignore(
        session,
        BudgetCounter,
        [dict(scope=s, period_start=period_start, spent_cents=0, reserved_cents=0) for s in scopes],
    )


_counters = table_of(BudgetCounter).c


def _hold_statement(limit: ColumnElement[Any]) -> Any:
    """Add `b_amount` to the scope's reservations only if spent + reserved stays within its limit.

    One conditional UPDATE: the database checks and increments the counter row atomically, so
    concurrent requests on any number of replicas cannot both pass the last free cents.
    """
    amount = bindparam("b_amount", type_=Integer)
    return (
        update(table_of(BudgetCounter))
        .where(
            _counters.scope == bindparam("b_scope"),
            _counters.period_start == bindparam("b_period"),
            or_(limit.is_(None), _counters.spent_cents + _counters.reserved_cents + amount <= limit),
        )
        .values(reserved_cents=_counters.reserved_cents + amount)
        .returning(_counters.scope)
    )


# The limit is read by the same statement, from the owning row, so a budget lowered a moment ago counts.
_HOLD_WITHIN_TENANT = _hold_statement(
    select(table_of(Tenant).c.budget_cents).where(table_of(Tenant).c.id == bindparam("b_owner")).scalar_subquery()
)
_HOLD_WITHIN_KEY = _hold_statement(
    select(table_of(ApiKey).c.budget_cents).where(table_of(ApiKey).c.id == bindparam("b_owner")).scalar_subquery()
)
_SHIFT_SHAPE: RowShape = (
    ("ord", Integer()),
    ("scope", String()),
    ("period_start", UTCDateTime()),
    ("reserved", Integer()),
    ("spent", Integer()),
)


@cache
def _shift_statement(n: int, lock_in_order: bool) -> Any:
    """Add each of `n` rows' (reserved, spent) to its counter and return the counters' spent cents after:
    one statement for the batch, whose RETURNING gives the threshold check its figures (no read after).

    Every movement (holds included) locks counter rows in one order, or two batches could deadlock; an
    UPDATE ... FROM locks rows in whatever order its plan meets them. So on PostgreSQL a batch of several
    rows locks them first, in the batch's order (`ord`), in a CTE that the UPDATE joins: LockRows runs
    above the Sort, and every row the UPDATE reaches has come through it. SQLite has one writer at a
    time: no order to keep.
    """
    shifts = value_rows("shift", _SHIFT_SHAPE, n)
    counters = table_of(BudgetCounter)
    statement = update(counters).where(
        _counters.scope == shifts.c.scope, _counters.period_start == shifts.c.period_start
    )
    if lock_in_order:
        locked = (
            select(_counters.scope, _counters.period_start)
            .join(shifts, and_(_counters.scope == shifts.c.scope, _counters.period_start == shifts.c.period_start))
            .order_by(shifts.c.ord)
            .with_for_update(of=counters)
            .cte("locked")
            .prefix_with("MATERIALIZED")
        )
        statement = statement.where(_counters.scope == locked.c.scope, _counters.period_start == locked.c.period_start)
    return statement.values(
        reserved_cents=_counters.reserved_cents + shifts.c.reserved,
        spent_cents=_counters.spent_cents + shifts.c.spent,
    ).returning(_counters.scope, _counters.period_start, _counters.spent_cents)


_LEDGER_INSERT = insert(table_of(LedgerEntry))
_daily = table_of(DailyUsage)


def _daily_upsert(insert_into: Any) -> Any:
    """Add to a tenant's row for a day, creating it: one statement, so the rollup costs one round trip."""
    stmt = insert_into(_daily).values(
        tenant_id=bindparam("b_tenant"),
        day=bindparam("b_day"),
        spent_cents=bindparam("b_spent"),
        predictions=bindparam("b_predictions"),
        refusals=bindparam("b_refusals"),
    )
    return stmt.on_conflict_do_update(
        index_elements=[_daily.c.tenant_id, _daily.c.day],
        set_={
            "spent_cents": _daily.c.spent_cents + stmt.excluded.spent_cents,
            "predictions": _daily.c.predictions + stmt.excluded.predictions,
            "refusals": _daily.c.refusals + stmt.excluded.refusals,
        },
    )


_DAILY_UPSERT = {"postgresql": _daily_upsert(pg_insert), "sqlite": _daily_upsert(sqlite_insert)}


def _scopes(tenant: Tenant, key: ApiKey) -> list[tuple[str, Any, str]]:
    """The counters a hold must fit in: (scope, its conditional UPDATE, the owner whose limit applies).

    A key has a counter only if it carries a budget of its own (set when the key is created), so the
    common request touches one counter row: the tenant's.
    """
    scopes = [(tenant_scope(tenant.id), _HOLD_WITHIN_TENANT, tenant.id)]
    if key.budget_cents is not None:
        scopes.append((key_scope(key.id), _HOLD_WITHIN_KEY, key.id))
    return scopes


async def _hold_within(
    session: AsyncSession, scope: str, statement: Any, owner_id: str, period_start: datetime, amount: int
) -> bool:
    params = {"b_scope": scope, "b_period": period_start, "b_amount": amount, "b_owner": owner_id}
    return bool(await prebuilt.fetch(session, statement, params))


@dataclass(frozen=True)
class _Move:
    """One ledger row and the counter change it stands for."""

    hold: Hold
    kind: str
    reserved_delta: int
    spent_delta: int
    note: str | None = None


async def _move_many(
    session: AsyncSession, moves: list[_Move], *, spent_of: Collection[str] = ()
) -> dict[tuple[str, datetime], int]:
    """Move money unconditionally (settles, releases, refunds) and record it, in a fixed number of
    statements however many moves: one INSERT of the ledger rows, one UPDATE of the counters by each
    scope's sum (_shift_statement), one upsert of the tenants' days. Returns the spent cents after the
    batch of the tenant counters of `spent_of` (tenant ids), by (tenant id, period start), as that
    UPDATE returned them: the rows stay locked to the COMMIT, so they are exactly the batch's result.

    The ledger rows go first so that the counter rows, which concurrent requests of the tenant wait
    for, stay locked only from their UPDATE to the COMMIT.
    """
    if not moves:
        return {}
    at = clock.now()  # one moment for the ledger rows and the rollup day they count in
    await prebuilt.execute_many(
        session,
        _LEDGER_INSERT,
        [_ledger_row(m.hold, m.kind, m.reserved_delta, m.spent_delta, m.note, at) for m in moves],
    )
    # (tenant, 0 for its own counter / 1 for a key's, scope, period) -> [reserved, spent]: sorted, this is
    # the order holds lock counters in (tenants in order, each tenant's row before its keys').
    sums: dict[tuple[str, int, str, datetime], list[int]] = {}
    days: dict[str, list[int]] = {}
    for m in moves:
        hold = m.hold
        scopes = [(0, tenant_scope(hold.tenant_id))] + ([(1, key_scope(hold.api_key_id))] if hold.key_budgeted else [])
        for rank, scope in scopes:
            total = sums.setdefault((hold.tenant_id, rank, scope, hold.period_start), [0, 0])
            total[0] += m.reserved_delta
            total[1] += m.spent_delta
        if m.spent_delta:
            day = days.setdefault(hold.tenant_id, [0, 0])
            day[0] += m.spent_delta
            day[1] += m.kind == "settle"  # counted as usage_report counts
    wanted = {(tenant_id, period) for tenant_id, rank, _, period in sums if rank == 0 and tenant_id in spent_of}
    shifts = [
        (scope, period, reserved, spent)
        for (tenant_id, rank, scope, period), (reserved, spent) in sorted(sums.items())
        if reserved or spent or (rank == 0 and (tenant_id, period) in wanted)
    ]
    spent_after: dict[tuple[str, datetime], int] = {}
    if shifts:
        lock_in_order = len(shifts) > 1 and session.get_bind().dialect.name == "postgresql"
        rows = await prebuilt.fetch(
            session,
            _shift_statement(value_rows_size(len(shifts)), lock_in_order),
            value_rows_params("shift", _SHIFT_SHAPE, [(ord_, *shift) for ord_, shift in enumerate(shifts)]),
        )
        found = {(scope, period): spent for scope, period, spent in rows}
        spent_after = {(t, p): found.get((tenant_scope(t), p), 0) for t, p in sorted(wanted)}
    if days:
        # After the counters, as every movement does: one lock order.
        await prebuilt.execute_many(
            session,
            _DAILY_UPSERT[session.get_bind().dialect.name],
            [
                {"b_tenant": t, "b_day": at.date(), "b_spent": spent, "b_predictions": count, "b_refusals": 0}
                for t, (spent, count) in sorted(days.items())
            ],
        )
    return spent_after


async def daily_usage(session: AsyncSession, tenant_id: str, first: date, last: date) -> list[DailyUsage]:
    """The rollup rows of one tenant between two UTC days (inclusive): a range of its primary key."""
    rows = await session.scalars(
        select(DailyUsage)
        .where(DailyUsage.tenant_id == tenant_id, DailyUsage.day >= first, DailyUsage.day <= last)
        .order_by(DailyUsage.day)
    )
    return list(rows)


def _ledger_row(
    hold: Hold, kind: str, reserved_delta: int, spent_delta: int, note: str | None, at: datetime
) -> dict[str, Any]:
    return dict(
        tenant_id=hold.tenant_id,
        api_key_id=hold.api_key_id,
        prediction_id=hold.prediction_id,
        model_id=hold.model_id,
        provider=hold.provider,
        period_start=hold.period_start,
        kind=kind,
        reserved_delta=reserved_delta,
        spent_delta=spent_delta,
        note=note,
        created_at=at,
    )


@dataclass(frozen=True)
class HoldRequest:
    """One submit's claim on its tenant: a rate unit, maybe a slot, and `amount` cents on its counters."""

    tenant: Tenant
    key: ApiKey
    hold: Hold
    amount: int
    slot_retry_after_s: int

    @property
    def takes_slot(self) -> bool:
        return takes_slot(self.tenant)


_UNHOLD = (
    update(table_of(BudgetCounter))
    .where(_counters.scope == bindparam("b_scope"), _counters.period_start == bindparam("b_period"))
    .values(reserved_cents=_counters.reserved_cents - bindparam("b_amount", type_=Integer))
)


async def reserve_many(session: AsyncSession, requests: list[HoldRequest]) -> list[AppError | None]:
    """Admit a batch of submits in one transaction: for each one None (held) or the refusal.

    Phase by phase, in the lock order (top of this module): every tenant's rate units, then every
    tenant's slots, then the counters, then the refusals on the tenants' days. Each tenant takes as
    many rate units, then slots, as fit, up to one per request, so that a later phase never locks a
    row an earlier one skipped; then its requests are held on the counters, the whole group in one
    conditional UPDATE per counter if it fits, else one by one in arrival order, and the units and
    slots left over are given back (rows this transaction already holds). So exactly the requests
    that fit are admitted, as if they had come one at a time: the n-th admitted of a tenant needs
    n rate units and n slots, whichever of its predecessors were refused. Ledger rows are written
    for the admitted ones in one statement.
    """
    now = clock.now()
    outcome: dict[int, AppError | None] = {}
    groups: dict[str, list[int]] = {}
    for index, request in enumerate(requests):
        groups.setdefault(request.tenant.id, []).append(index)
    order = sorted(groups)
    rates: dict[str, int] = {}
    for tenant_id in order:
        tenant = requests[groups[tenant_id][0]].tenant
        rates[tenant_id] = await _take_up_to(len(groups[tenant_id]), partial(_take_rate, session, tenant, now))
    slots: dict[str, int] = {}
    for tenant_id in order:
        wanted = min(rates[tenant_id], sum(requests[i].takes_slot for i in groups[tenant_id]))
        slots[tenant_id] = await _take_up_to(wanted, partial(budget_limits.take_slots, session, tenant_id))
    refusals: dict[str, int] = {}
    for tenant_id in order:
        members = [requests[i] for i in groups[tenant_id]]
        rate, slot = rates[tenant_id], slots[tenant_id]
        admitted = taking = 0
        everything = rate == len(members) and slot == sum(m.takes_slot for m in members)
        if len(members) > 1 and everything and await _hold_all(session, members):
            outcome.update(dict.fromkeys(groups[tenant_id]))
            continue
        for index, request in zip(groups[tenant_id], members, strict=True):
            refusal: AppError | None
            if admitted >= rate:
                refusal = budget_limits.rate_limited(request.tenant, now)
            elif request.takes_slot and taking >= slot:
                refusal = budget_limits.concurrency_limited(request.tenant, request.slot_retry_after_s)
            else:
                refusal = await _hold_one(session, request)
            outcome[index] = refusal
            if refusal is None:
                admitted += 1
                taking += request.takes_slot
            else:
                refusals[tenant_id] = refusals.get(tenant_id, 0) + 1
        await budget_limits.give_rate(session, members[0].tenant, rate - admitted, now)
        await budget_limits.give_slots(session, tenant_id, slot - taking)
    admitted_requests = [r for i, r in enumerate(requests) if outcome[i] is None]
    if admitted_requests:
        # After the counters: the rows others wait for are locked for one more statement.
        await prebuilt.execute_many(
            session, _LEDGER_INSERT, [_ledger_row(r.hold, "reserve", r.amount, 0, None, now) for r in admitted_requests]
        )
    if refusals:
        # The days last, after every counter: the lock order.
        await prebuilt.execute_many(
            session,
            _DAILY_UPSERT[session.get_bind().dialect.name],
            [
                {"b_tenant": t, "b_day": now.date(), "b_spent": 0, "b_predictions": 0, "b_refusals": n}
                for t, n in sorted(refusals.items())
            ],
        )
    return [outcome[i] for i in range(len(requests))]


async def _take_rate(session: AsyncSession, tenant: Tenant, now: datetime, n: int) -> bool:
    return await budget_limits.take_rate(session, tenant, n, now)


async def _take_up_to(n: int, take: Callable[[int], Awaitable[bool]]) -> int:
    """How many of `n` units a conditional take grants: all in one statement, else one at a time until
    one is refused (the limit is then exactly reached: what was taken is the group's capacity)."""
    if n == 0:
        return 0
    if await take(n):
        return n
    taken = 0
    while taken < n - 1 and await take(1):
        taken += 1
    return taken


def _hold_scopes(members: list[HoldRequest]) -> list[tuple[str, Any, str, int]]:
    """(scope, conditional UPDATE, owner, amount) for a tenant's group: its counter, then its keys' in order."""
    first = members[0]
    scopes = [(tenant_scope(first.tenant.id), _HOLD_WITHIN_TENANT, first.tenant.id, sum(m.amount for m in members))]
    keys: dict[str, int] = {}
    for m in members:
        if m.key.budget_cents is not None:
            keys[m.key.id] = keys.get(m.key.id, 0) + m.amount
    scopes += [(key_scope(k), _HOLD_WITHIN_KEY, k, keys[k]) for k in sorted(keys)]
    return scopes


async def _hold_all(session: AsyncSession, members: list[HoldRequest]) -> bool:
    """Hold the whole group's amounts on its counters, or nothing (what was held is given back)."""
    period = members[0].hold.period_start
    taken: list[tuple[str, int]] = []
    for scope, statement, owner_id, amount in _hold_scopes(members):
        if not await _hold_or_create(session, scope, statement, owner_id, period, amount):
            for done_scope, done_amount in taken:
                await session.execute(_UNHOLD, {"b_scope": done_scope, "b_period": period, "b_amount": done_amount})
            return False
        taken.append((scope, amount))
    return True


async def _hold_one(session: AsyncSession, request: HoldRequest) -> BudgetExceeded | None:
    """One request of a group that did not fit as a whole, on its counters (tenant's, then key's)."""
    tenant, key, period, amount = request.tenant, request.key, request.hold.period_start, request.amount
    taken: list[str] = []
    for scope, statement, owner_id in _scopes(tenant, key):
        if not await _hold_or_create(session, scope, statement, owner_id, period, amount):
            refusal = await _budget_exceeded(session, tenant, key, scope, period, amount)
            for done in taken:
                await session.execute(_UNHOLD, {"b_scope": done, "b_period": period, "b_amount": amount})
            return refusal
        taken.append(scope)
    return None


async def _hold_or_create(
    session: AsyncSession, scope: str, statement: Any, owner_id: str, period_start: datetime, amount: int
) -> bool:
    if await _hold_within(session, scope, statement, owner_id, period_start, amount):
        return True
    # Most likely the period's counter does not exist yet: create it and try again.
    await _ensure_counters(session, [scope], period_start)
    return await _hold_within(session, scope, statement, owner_id, period_start, amount)


# ---------------------------------------------------------------- batches: settles, releases, ends
#
# The ledger writer's batches (app/predictions/service.py) and the poller's terminal transitions move
# money here, in a fixed number of statements per batch however many predictions it holds.

# A prediction's money and slot columns, named here rather than through app.predictions.models: money
# depends on no domain but tenants (predictions depends on budgets, never the other way round). Only this
# module writes them after the prediction's INSERT (whose values come from new_hold_columns).
_predictions = table(
    "predictions",
    table_column("id", String),
    table_column("holds_slot", Boolean),
    table_column("charged_cents", Integer),
)
_CHARGE_SHAPE: RowShape = (("id", String()), ("cents", Integer()))


@cache
def _charge_statement(n: int) -> Any:
    """Charge `n` predictions their cost, each only if it was never charged (a prediction is charged once,
    whoever confirms it): one statement whose RETURNING says which rows took their charge."""
    rows = value_rows("charge", _CHARGE_SHAPE, n)
    return (
        update(_predictions)
        .where(_predictions.c.id == rows.c.id, _predictions.c.charged_cents.is_(None))
        .values(charged_cents=rows.c.cents)
        .returning(_predictions.c.id)
    )


@cache
def _refund_statement(n: int) -> Any:
    """Set `n` predictions' charges to 0, each only if it still is the charge being refunded."""
    rows = value_rows("charge", _CHARGE_SHAPE, n)
    return (
        update(_predictions)
        .where(_predictions.c.id == rows.c.id, _predictions.c.charged_cents == rows.c.cents)
        .values(charged_cents=0)
        .returning(_predictions.c.id)
    )


class Charged(Protocol):
    """The caller's object for a prediction whose charge changes: it shows the new charge."""

    @property
    def id(self) -> str: ...


async def _recharge(session: AsyncSession, statement: Any, charges: list[tuple[Charged, int]]) -> set[str]:
    """Run a charge or refund statement over `charges` (prediction, cents) in one round trip. The ids it
    changed. The rows are the caller's, locked already by its change of their state, so this takes no new
    lock (the lock order at the top of this module)."""
    if not charges:
        return set()
    rows = sorted((p.id, cents) for p, cents in charges)
    params = value_rows_params("charge", _CHARGE_SHAPE, rows)
    return {row.id for row in await prebuilt.fetch(session, statement(value_rows_size(len(rows))), params)}


def takes_slot(tenant: Tenant) -> bool:
    """Whether a new prediction of this tenant takes one of its slots: only while it has a maxConcurrent."""
    return tenant.max_concurrent is not None


def new_hold_columns(tenant: Tenant, estimate_cents: int, now: datetime) -> dict[str, Any]:
    """A new prediction's money columns, for its INSERT: what it holds, whether it holds a slot, the period
    its hold counts in, and no charge yet. reserve_many takes exactly this (HoldRequest)."""
    return dict(
        estimate_cents=estimate_cents,
        holds_slot=takes_slot(tenant),
        period_start=period_of(tenant.budget_period, now).start,
        charged_cents=None,
    )


@dataclass(frozen=True)
class Settle:
    """One prediction's hold turned into the vendor's price."""

    tenant: Tenant
    hold: Hold
    held: int
    cost: int
    prediction: Charged
    # A late confirm: its hold was released already (held is 0); it takes its slot back (if it held one)
    # whatever the limit: the vendor runs it.
    late: bool = False
    late_slot: bool = False


async def settle_many(session: AsyncSession, settles: list[Settle]) -> list[tuple[Tenant, int]]:
    """Settle a batch of holds: each prediction is charged its cost if it never was (one conditional UPDATE
    for the batch), and only those move money: the ledger rows, counters and days (_move_many). A charge
    above its hold is still recorded: it was billed. Returns the budget lines (tenant, percent) the batch
    made tenants reach, each reported once a period."""
    if not settles:
        return []
    # In the lock order: the predictions' rows (the caller's own), then the slots, then the counters.
    charged = await _recharge(session, _charge_statement, [(s.prediction, s.cost) for s in settles])
    settles = [s for s in settles if s.prediction.id in charged]
    for s in settles:
        set_committed_value(s.prediction, "charged_cents", s.cost)  # what the row says now, not dirty
    slots: dict[str, int] = {}
    for s in settles:
        if s.late and s.late_slot:
            slots[s.hold.tenant_id] = slots.get(s.hold.tenant_id, 0) + 1
    await budget_limits.add_slots_many(session, slots)
    tenants = {s.tenant.id: s.tenant for s in settles}
    spent_after = await _move_many(
        session,
        [_Move(s.hold, "settle", -s.held, s.cost) for s in settles],
        spent_of=[t.id for t in tenants.values() if t.budget_cents],
    )
    costs: dict[tuple[str, datetime], int] = {}
    for s in settles:
        costs[(s.tenant.id, s.hold.period_start)] = costs.get((s.tenant.id, s.hold.period_start), 0) + s.cost
    crossed: list[tuple[Tenant, int]] = []
    for (tenant_id, period_start), after in sorted(spent_after.items()):
        before = after - costs[(tenant_id, period_start)]
        tenant = tenants[tenant_id]
        crossed += [(tenant, p) for p in await newly_crossed_thresholds(session, tenant, period_start, before, after)]
    return crossed


@dataclass(frozen=True)
class Release:
    """A hold the vendor never confirmed, given back with its slot."""

    hold: Hold
    held: int
    holds_slot: bool
    note: str


async def release_many(session: AsyncSession, releases: list[Release]) -> None:
    """Give back a batch of holds: the slots (one UPDATE, tenants in order, before their counters, as
    holds take them), then the ledger rows and counters (_move_many)."""
    await budget_limits.give_slots_many(session, _slots(releases))
    await _move_many(session, [_Move(r.hold, "release", -r.held, 0, r.note) for r in releases])


@dataclass(frozen=True)
class Ended:
    """A prediction that became terminal: its slot comes back; `refund` cents of its charge too (a failed
    prediction whose charge is given back), or 0."""

    hold: Hold
    holds_slot: bool
    refund: int
    prediction: Charged


async def end_many(session: AsyncSession, ended: list[Ended]) -> None:
    """Slots back for predictions that became terminal (one UPDATE, tenants in order), then the refunds:
    each charge set to 0 if it still is the one refunded (one conditional UPDATE), and for those the
    ledger rows and counters (_move_many)."""
    await budget_limits.give_slots_many(session, _slots(ended))
    refunds = [e for e in ended if e.refund]
    refunded = await _recharge(session, _refund_statement, [(e.prediction, e.refund) for e in refunds])
    refunds = [e for e in refunds if e.prediction.id in refunded]
    for e in refunds:
        set_committed_value(e.prediction, "charged_cents", 0)
    await _move_many(session, [_Move(e.hold, "refund", 0, -e.refund, "failed prediction") for e in refunds])


def _slots(items: list[Release] | list[Ended]) -> dict[str, int]:
    slots: dict[str, int] = {}
    for item in items:
        slots[item.hold.tenant_id] = slots.get(item.hold.tenant_id, 0) + item.holds_slot
    return slots


async def start_counting_slots(session: AsyncSession, tenant: Tenant, in_flight: Select[Any]) -> None:
    """A tenant just got a maxConcurrent: its predictions in flight (`in_flight` selects their ids) that
    hold no slot take one now. Counted by how many rows changed, added to the tenant's count (never an
    absolute value written over it): a submit or an end committing meanwhile keeps its own step."""
    taken = await session.execute(
        update(_predictions)
        .where(_predictions.c.id.in_(in_flight), _predictions.c.holds_slot.is_(False))
        .values(holds_slot=True)
        .returning(_predictions.c.id)
    )
    await budget_limits.add_slots_many(session, {tenant.id: len(taken.all())})
    # The caller's object shows the count the row has now.
    in_flight_now = await session.scalar(select(Tenant.in_flight).where(Tenant.id == tenant.id))
    set_committed_value(tenant, "in_flight", in_flight_now or 0)


async def _budget_exceeded(
    session: AsyncSession, tenant: Tenant, key: ApiKey, scope: str, period_start: datetime, amount: int
) -> BudgetExceeded:
    counter = await session.get(BudgetCounter, (scope, period_start), populate_existing=True)
    spent = counter.spent_cents if counter else 0
    reserved = counter.reserved_cents if counter else 0
    is_key = is_key_scope(scope)
    limit = (key.budget_cents if is_key else tenant.budget_cents) or 0
    period = period_of(tenant.budget_period, period_start)
    whose = "this API key's" if is_key else "the tenant's"
    return BudgetExceeded(
        f"This prediction is estimated at {amount} cents, but {whose} budget has "
        f"{max(limit - spent - reserved, 0)} of {limit} cents left this period. "
        "Wait for the period to reset, or ask your operator to raise the budget.",
        scope="key" if is_key else "tenant",
        limitCents=limit,
        spentCents=spent,
        reservedCents=reserved,
        remainingCents=max(limit - spent - reserved, 0),
        estimateCents=amount,
        resetsAt=clock.iso(period.end),
    )


# ---------------------------------------------------------------- thresholds


async def newly_crossed_thresholds(
    session: AsyncSession, tenant: Tenant, period_start: datetime, spent_before: int, spent_after: int
) -> list[int]:
    """Which of 50/80/100 % this charge made the tenant reach, each reported once a period.

    `spent_before`/`spent_after` come from the atomic UPDATE that charged, so concurrent charges
    each see their own step and exactly one of them crosses a given line.
    """
    budget = tenant.budget_cents
    if not budget:
        return []
    crossed = []
    for percent in THRESHOLDS:
        line = percent * budget
        if spent_before * 100 < line <= spent_after * 100:
            row = dict(tenant_id=tenant.id, period_start=period_start, percent=percent, created_at=clock.now())
            if await insert_ignore(session, ThresholdNotice, [row]):
                crossed.append(percent)
    return crossed


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
