"""Where money moves: holds, settles, releases and refunds, in batches. Every change of a balance is one conditional or arithmetic SQL UPDATE that the
database applies atomically, plus one append-only ledger row in the same transaction.

Scopes: every movement updates the tenant's counter ("tenant:<id>") and the key's ("key:<id>"), so a
key can carry a smaller budget of its own. Counters are per budget period; a hold is settled or
released in the period it was taken in.

Lock order. Every writer (holds, settles, releases, terminal transitions, late charges; one connection
each, several processes) takes the rows it changes phase by phase, each phase sorted by tenant id, so
that no two transactions wait for each other in a cycle (PostgreSQL would abort one after
deadlock_timeout; SQLite has one writer at a time):
  0. the batch's own rows: its predictions, the price points (sorted), its idempotency keys (by tenant,
     key); rows no other writer takes at the same time but by a race the fences settle.
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

from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import date, datetime
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
from app.budgets.models import BudgetCounter, DailyUsage, LedgerEntry, ThresholdNotice
from app.budgets.scopes import is_key_scope, key_scope, tenant_scope
from app.budgets.service import THRESHOLDS, BudgetExceeded, Hold, period_of
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


_CounterKey = tuple[str, int, str, datetime]  # (tenant, 0 its own counter / 1 a key's, scope, period start)


def _counter_keys(hold: Hold) -> list[_CounterKey]:
    """The counters a hold's money is on, as sorted they give the lock order: tenants in order, each
    tenant's own counter before its key's."""
    keys = [(hold.tenant_id, 0, tenant_scope(hold.tenant_id), hold.period_start)]
    if hold.key_budgeted:
        keys.append((hold.tenant_id, 1, key_scope(hold.api_key_id), hold.period_start))
    return keys


def _sums(moves: list[_Move]) -> tuple[dict[_CounterKey, list[int]], dict[str, list[int]]]:
    """What the moves add to each counter ([reserved, spent]) and to each tenant's day ([spent, settled])."""
    sums: dict[_CounterKey, list[int]] = {}
    days: dict[str, list[int]] = {}
    for m in moves:
        for counter in _counter_keys(m.hold):
            total = sums.setdefault(counter, [0, 0])
            total[0] += m.reserved_delta
            total[1] += m.spent_delta
        if m.spent_delta:
            day = days.setdefault(m.hold.tenant_id, [0, 0])
            day[0] += m.spent_delta
            day[1] += m.kind == "settle"  # counted as usage_report counts
    return sums, days


async def _shift_counters(
    session: AsyncSession,
    sums: dict[_CounterKey, list[int]],
    *,
    spent_of: Collection[str] = (),
    lock: Collection[_CounterKey] = (),
) -> dict[tuple[str, datetime], int]:
    """Add `sums` to the counters in one statement (_shift_statement) that locks them, and the counters of
    `lock` (which it leaves as they are), in the lock order. The spent cents after it of the tenant counters
    of `spent_of` (tenant ids), by (tenant id, period start): the rows stay locked to the COMMIT, so they
    are exactly the batch's result."""
    sums = {**{counter: [0, 0] for counter in lock}, **sums}
    wanted = {(tenant_id, period) for tenant_id, rank, _, period in sums if rank == 0 and tenant_id in spent_of}
    shifts = [
        (scope, period, reserved, spent)
        for (tenant_id, rank, scope, period), (reserved, spent) in sorted(sums.items())
        if reserved
        or spent
        or (rank == 0 and (tenant_id, period) in wanted)
        or (tenant_id, rank, scope, period) in lock
    ]
    if not shifts:
        return {}
    lock_in_order = len(shifts) > 1 and session.get_bind().dialect.name == "postgresql"
    rows = await prebuilt.fetch(
        session,
        _shift_statement(value_rows_size(len(shifts)), lock_in_order),
        value_rows_params("shift", _SHIFT_SHAPE, [(ord_, *shift) for ord_, shift in enumerate(shifts)]),
    )
    found = {(scope, period): spent for scope, period, spent in rows}
    return {(t, p): found.get((tenant_scope(t), p), 0) for t, p in sorted(wanted)}


async def _add_days(session: AsyncSession, day: date, days: dict[str, list[int]]) -> None:
    """Add to the tenants' rows for `day` (tenant -> [spent, settled, refusals]): one upsert, tenants in order."""
    rows = [
        {"b_tenant": t, "b_day": day, "b_spent": spent, "b_predictions": count, "b_refusals": refused}
        for t, (spent, count, refused) in sorted(days.items())
        if spent or count or refused
    ]
    if rows:
        await prebuilt.execute_many(session, _DAILY_UPSERT[session.get_bind().dialect.name], rows)


async def _move_many(
    session: AsyncSession, moves: list[_Move], *, spent_of: Collection[str] = ()
) -> dict[tuple[str, datetime], int]:
    """Move money unconditionally (refunds) and record it, in a fixed number of statements however many
    moves: one INSERT of the ledger rows, one UPDATE of the counters (_shift_counters), one upsert of the
    tenants' days. The ledger rows go first so that the counter rows, which other writers wait for, stay
    locked only from their UPDATE to the COMMIT."""
    if not moves:
        return {}
    at = clock.now()  # one moment for the ledger rows and the rollup day they count in
    await _insert_ledger(
        session, [_ledger_row(m.hold, m.kind, m.reserved_delta, m.spent_delta, m.note, at) for m in moves]
    )
    sums, days = _sums(moves)
    spent_after = await _shift_counters(session, sums, spent_of=spent_of)
    await _add_days(session, at.date(), {t: [spent, count, 0] for t, (spent, count) in days.items()})
    return spent_after


async def _insert_ledger(session: AsyncSession, rows: list[dict[str, Any]]) -> None:
    await prebuilt.execute_many(session, _LEDGER_INSERT, rows)


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
    """Admit a batch of submits in one transaction: for each one None (held) or the refusal (move_batch)."""
    return (await move_batch(session, holds=requests)).refusals


@dataclass(frozen=True)
class Moved:
    refusals: list[AppError | None]  # per hold request, in order: None when it was held
    crossed: list[tuple[Tenant, int]]  # the budget lines (tenant, percent) the settles made tenants reach


async def move_batch(
    session: AsyncSession,
    *,
    holds: Sequence[HoldRequest] = (),
    settles: Sequence[Settle] = (),
    releases: Sequence[Release] = (),
) -> Moved:
    """One writer batch's money, in one transaction: new submits held, accepted ones settled, refused ones
    released, in a fixed number of statements however large the batch.

    Phase by phase, in the lock order (top of this module):
    0. the settles' charges, on prediction rows the caller's batch changed already;
    1. every holding tenant's rate units;
    2. slots, tenant by tenant: given back by releases, counted for late settles, taken by holds;
    3. the counters: the settles' and releases' sums in one UPDATE that also locks every counter the holds
       need, in order; then the holds, each tenant's group in one conditional UPDATE per counter if it
       fits, else one by one in arrival order, and the units and slots left over given back (rows this
       transaction holds already). So exactly the requests that fit are admitted, as if they had come one
       at a time: the n-th admitted of a tenant needs n rate units and n slots, whichever of its
       predecessors were refused;
    then the ledger rows, all of them in one INSERT;
    4. the tenants' days: spent cents, settles and refusals, one upsert.
    A charge above its hold is still recorded: it was billed.
    """
    now = clock.now()
    charged = await _recharge(session, _charge_statement, [(s.prediction, s.cost) for s in settles])
    settles = [s for s in settles if s.prediction.id in charged]
    for s in settles:
        show_charged(s.prediction, s.cost)
    groups: dict[str, list[int]] = {}
    for index, request in enumerate(holds):
        groups.setdefault(request.tenant.id, []).append(index)
    order = sorted(groups)
    rates: dict[str, int] = {}
    for tenant_id in order:
        tenant = holds[groups[tenant_id][0]].tenant
        rates[tenant_id] = await _take_up_to(len(groups[tenant_id]), partial(_take_rate, session, tenant, now))
    slots = await _move_slots(session, holds, groups, rates, settles, releases)

    moves = [_Move(s.hold, "settle", -s.held, s.cost) for s in settles]
    moves += [_Move(r.hold, "release", -r.held, 0, r.note) for r in releases]
    sums, days = _sums(moves)
    held_on = [counter for request in holds for counter in _counter_keys(request.hold)] if sums else []
    tenants = {s.tenant.id: s.tenant for s in settles}
    spent_after = await _shift_counters(
        session, sums, spent_of=[t.id for t in tenants.values() if t.budget_cents], lock=held_on
    )
    outcome: dict[int, AppError | None] = {}
    refusals: dict[str, int] = {}
    for tenant_id in order:
        members = [holds[i] for i in groups[tenant_id]]
        results = await _hold_group(session, members, rates[tenant_id], slots.get(tenant_id, 0), now)
        outcome.update(zip(groups[tenant_id], results, strict=True))
        refused = sum(r is not None for r in results)
        if refused:
            refusals[tenant_id] = refused

    ledger = [_ledger_row(m.hold, m.kind, m.reserved_delta, m.spent_delta, m.note, now) for m in moves]
    ledger += [
        _ledger_row(r.hold, "reserve", r.amount, 0, None, now) for i, r in enumerate(holds) if outcome[i] is None
    ]
    await _insert_ledger(session, ledger)
    for tenant_id in refusals:
        days.setdefault(tenant_id, [0, 0])
    await _add_days(session, now.date(), {t: [spent, count, refusals.get(t, 0)] for t, (spent, count) in days.items()})

    costs: dict[tuple[str, datetime], int] = {}
    for s in settles:
        costs[(s.tenant.id, s.hold.period_start)] = costs.get((s.tenant.id, s.hold.period_start), 0) + s.cost
    crossed: list[tuple[Tenant, int]] = []
    for (tenant_id, period_start), after in sorted(spent_after.items()):
        if (tenant_id, period_start) not in costs:
            # A period only locked for this batch's holds (a settle of the last period beside holds of a
            # new one): nothing was spent in it, so no line was crossed.
            continue
        before = after - costs[(tenant_id, period_start)]
        tenant = tenants[tenant_id]
        crossed += [(tenant, p) for p in await newly_crossed_thresholds(session, tenant, period_start, before, after)]
    return Moved([outcome[i] for i in range(len(holds))], crossed)


async def _move_slots(
    session: AsyncSession,
    holds: Sequence[HoldRequest],
    groups: dict[str, list[int]],
    rates: dict[str, int],
    settles: Sequence[Settle],
    releases: Sequence[Release],
) -> dict[str, int]:
    """Slots, tenant by tenant in order: back from the releases, counted for late settles (the vendor runs
    them whatever the limit), then taken for the holds, as many as fit up to one per request that got a
    rate unit. How many each holding tenant took."""
    back: dict[str, int] = {}
    for r in releases:
        back[r.hold.tenant_id] = back.get(r.hold.tenant_id, 0) + r.holds_slot
    counted: dict[str, int] = {}
    for s in settles:
        if s.late and s.late_slot:
            counted[s.hold.tenant_id] = counted.get(s.hold.tenant_id, 0) + 1
    wanted = {
        tenant_id: min(rates[tenant_id], sum(holds[i].takes_slot for i in members))
        for tenant_id, members in groups.items()
    }
    if not any(wanted.values()) and not (any(back.values()) and any(counted.values())):
        # No hold takes a slot, and slots only come back or are only counted: one statement, which changes
        # tenants in order. Both at once go tenant by tenant, as below: back for a tenant B, then counted
        # for a tenant A < B, would lock B before A.
        await budget_limits.give_slots_many(session, back)
        await budget_limits.add_slots_many(session, counted)
        return dict.fromkeys(groups, 0)
    taken: dict[str, int] = {}
    for tenant_id in sorted(set(back) | set(counted) | set(groups)):
        await budget_limits.give_slots(session, tenant_id, back.get(tenant_id, 0))
        await budget_limits.add_slots_many(session, {tenant_id: counted.get(tenant_id, 0)})
        if tenant_id in groups:
            taken[tenant_id] = await _take_up_to(
                wanted[tenant_id], partial(budget_limits.take_slots, session, tenant_id)
            )
    return taken


async def _hold_group(
    session: AsyncSession, members: list[HoldRequest], rate: int, slot: int, now: datetime
) -> list[AppError | None]:
    """One tenant's holds, its rate units and slots taken already: the whole group on its counters if it
    all fits, else one by one in arrival order; the units and slots left over given back."""
    everything = rate == len(members) and slot == sum(m.takes_slot for m in members)
    if len(members) > 1 and everything and await _hold_all(session, members):
        return [None] * len(members)
    results: list[AppError | None] = []
    admitted = taking = 0
    for request in members:
        refusal: AppError | None
        if admitted >= rate:
            refusal = budget_limits.rate_limited(request.tenant, now)
        elif request.takes_slot and taking >= slot:
            refusal = budget_limits.concurrency_limited(request.tenant, request.slot_retry_after_s)
        else:
            refusal = await _hold_one(session, request)
        results.append(refusal)
        if refusal is None:
            admitted += 1
            taking += request.takes_slot
    await budget_limits.give_rate(session, members[0].tenant, rate - admitted, now)
    await budget_limits.give_slots(session, members[0].tenant.id, slot - taking)
    return results


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


def show_charged(prediction: Charged, cents: int) -> None:
    """The caller's object for a prediction whose charge was written shows it, as the row says it now
    (not as a change to flush)."""
    set_committed_value(prediction, "charged_cents", cents)


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
    """Settle a batch of holds (move_batch): each prediction is charged its cost if it never was, and only
    those move money. The budget lines (tenant, percent) the batch made tenants reach, each reported once a
    period."""
    return (await move_batch(session, settles=settles)).crossed


@dataclass(frozen=True)
class Release:
    """A hold the vendor never confirmed, given back with its slot."""

    hold: Hold
    held: int
    holds_slot: bool
    note: str


async def release_many(session: AsyncSession, releases: list[Release]) -> None:
    """Give back a batch of holds with their slots (move_batch)."""
    await move_batch(session, releases=releases)


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
