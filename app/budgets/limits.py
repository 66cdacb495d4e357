"""Concurrency and rate limits: conditional UPDATEs, so the caps hold across gateway processes.

Rate limits (a tenant's ratePerMinute, a provider's rate_per_minute) are GCRA (the generic cell rate
algorithm), not calendar minutes: with a limit of n a minute, n may pass at once, then one every 60/n s; a burst never gets through twice across a minute
boundary (calendar windows let 2n through in a few seconds). Its state is one integer per scope (the
theoretical arrival time of the next unit), moved by one conditional UPDATE: as cheap as a counter,
and exact across replicas.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

from sqlalchemy import BigInteger, Integer, bindparam, case, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.budgets.models import RateLimit
from app.budgets.scopes import tenant_scope
from app.core.database import insert_ignore, table_of
from app.core.errors import AppError
from app.core.retry_after import retry_after_value
from app.tenants.models import Tenant


class TooManyRequests(AppError):
    status = 429
    code = "rate_limited"
    title = "Too many requests"

    def __init__(self, detail: str, retry_after_s: int, **fields: object) -> None:
        super().__init__(
            detail, headers={"Retry-After": retry_after_value(retry_after_s)}, retryAfter=retry_after_s, **fields
        )


class ConcurrencyLimited(TooManyRequests):
    code = "concurrency_limited"
    title = "Too many predictions in flight"


# Built once at import (see bench/FINDINGS.md); `b_n` lets one statement take or give back the slots
# or rate units of a whole batch of a tenant's submits.
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_tenants = table_of(Tenant).c
_N = bindparam("b_n", type_=Integer)
_TAKE_SLOTS = (
    update(table_of(Tenant))
    .where(
        _tenants.id == bindparam("b_tenant"),
        or_(_tenants.max_concurrent.is_(None), _tenants.in_flight + _N <= _tenants.max_concurrent),
    )
    .values(in_flight=_tenants.in_flight + _N)
    .returning(_tenants.in_flight)
)
_GIVE_SLOTS = (
    update(table_of(Tenant))
    .where(_tenants.id == bindparam("b_tenant"), _tenants.in_flight >= _N)
    .values(in_flight=_tenants.in_flight - _N)
)
_limits = table_of(RateLimit).c
WINDOW_US = 60_000_000  # the "minute" of ratePerMinute: a full burst is n units, n x interval = 60 s
_NOW = bindparam("b_now", type_=BigInteger)
_COST = bindparam("b_n", type_=BigInteger) * bindparam("b_interval", type_=BigInteger)
# max(tat, now) + n x interval: where the next unit's arrival time moves if these n are admitted.
_NEXT = case((_limits.tat_us > _NOW, _limits.tat_us), else_=_NOW) + _COST
_TAKE_RATE = (
    update(table_of(RateLimit))
    .where(_limits.scope == bindparam("b_scope"), _NEXT <= _NOW + WINDOW_US)
    .values(tat_us=_NEXT)
    .returning(_limits.tat_us)
)
_GIVE_RATE = (
    update(table_of(RateLimit)).where(_limits.scope == bindparam("b_scope")).values(tat_us=_limits.tat_us - _COST)
)


def concurrency_limited(tenant: Tenant, retry_after_s: int) -> ConcurrencyLimited:
    return ConcurrencyLimited(
        f"This tenant already has {tenant.max_concurrent} predictions in flight, its limit. "
        "Retry when one of them has finished.",
        retry_after_s,
        limit=tenant.max_concurrent,
    )


async def take_slots(session: AsyncSession, tenant_id: str, n: int) -> bool:
    """Take `n` of the tenant's in-flight slots if they all fit under maxConcurrent (one conditional UPDATE)."""
    return (await session.execute(_TAKE_SLOTS, {"b_tenant": tenant_id, "b_n": n})).first() is not None


async def give_slots(session: AsyncSession, tenant_id: str, n: int) -> None:
    if n:
        await session.execute(_GIVE_SLOTS, {"b_tenant": tenant_id, "b_n": n})


async def give_slots_many(session: AsyncSession, slots: dict[str, int]) -> None:
    """give_slots for several tenants (tenant id -> n): one UPDATE, executemany, in tenant order."""
    params = [{"b_tenant": tenant_id, "b_n": n} for tenant_id, n in sorted(slots.items()) if n]
    if params:
        await session.execute(_GIVE_SLOTS, params)


_ADD_SLOTS = (
    update(table_of(Tenant)).where(_tenants.id == bindparam("b_tenant")).values(in_flight=_tenants.in_flight + _N)
)


async def add_slots_many(session: AsyncSession, slots: dict[str, int]) -> None:
    """Count slots whatever the limit (tenant id -> n; one UPDATE, executemany, in tenant order): predictions
    the vendor already runs are in flight regardless."""
    params = [{"b_tenant": tenant_id, "b_n": n} for tenant_id, n in sorted(slots.items()) if n]
    if params:
        await session.execute(_ADD_SLOTS, params)


def _micros(now: datetime) -> int:
    return (now - _EPOCH) // timedelta(microseconds=1)


def _interval_us(limit: int) -> int:
    # Rounded down: a burst of exactly `limit` always fits in the window.
    return max(WINDOW_US // limit, 1)


async def take_scope_rate(session: AsyncSession, scope: str, limit: int, now: datetime, n: int = 1) -> bool:
    """Count `n` units against `scope`'s `limit` a minute if they all fit now (GCRA): a tenant's
    ratePerMinute, a provider's rate_per_minute."""
    params = {"b_scope": scope, "b_now": _micros(now), "b_n": n, "b_interval": _interval_us(limit)}
    if (await session.execute(_TAKE_RATE, params)).first() is not None:
        return True
    # Most likely the scope's row does not exist yet: a state as old as can be (everything fits).
    await insert_ignore(session, RateLimit, [dict(scope=scope, tat_us=0)])
    return (await session.execute(_TAKE_RATE, params)).first() is not None


async def give_scope_rate(session: AsyncSession, scope: str, limit: int, n: int = 1) -> None:
    """Give back units take_scope_rate counted in this transaction."""
    await session.execute(_GIVE_RATE, {"b_scope": scope, "b_n": n, "b_interval": _interval_us(limit)})


async def take_rate(session: AsyncSession, tenant: Tenant, n: int, now: datetime) -> bool:
    """Count `n` submits against the tenant's ratePerMinute if they all fit now."""
    if tenant.rate_per_minute is None or n == 0:
        return True
    return await take_scope_rate(session, tenant_scope(tenant.id), tenant.rate_per_minute, now, n)


async def give_rate(session: AsyncSession, tenant: Tenant, n: int, now: datetime) -> None:
    """Give back submits counted by take_rate in this transaction (a batch that did not fit)."""
    if tenant.rate_per_minute is not None and n:
        await give_scope_rate(session, tenant_scope(tenant.id), tenant.rate_per_minute, n)


def rate_limited(tenant: Tenant, now: datetime) -> TooManyRequests:
    # A refused unit fits at the latest one interval from now (the state never runs further ahead than
    # the window): the exact wait would cost a read, and this bound is what a steady client should pace at.
    limit = tenant.rate_per_minute or 1
    retry_after = max(1, math.ceil(_interval_us(limit) / 1_000_000))
    return TooManyRequests(
        f"This tenant may submit {tenant.rate_per_minute} predictions a minute: {limit} at once, then one every "
        f"{60 / limit:g} s. Retry in {retry_after} s.",
        retry_after,
        limit=tenant.rate_per_minute,
    )


async def would_admit(session: AsyncSession, tenant: Tenant, now: datetime) -> bool:
    """Whether a submit would get a slot and a rate unit now, without taking anything (for quotes).
    `tenant` must have been read in this transaction (the key check does): its in_flight is current."""
    if tenant.max_concurrent is not None and tenant.in_flight >= tenant.max_concurrent:
        return False
    if tenant.rate_per_minute is not None:
        tat = await session.scalar(select(RateLimit.tat_us).where(RateLimit.scope == tenant_scope(tenant.id)))
        now_us = _micros(now)
        if max(tat or 0, now_us) + _interval_us(tenant.rate_per_minute) > now_us + WINDOW_US:
            return False
    return True
