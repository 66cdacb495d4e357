"""Concurrency and rate limits: conditional UPDATEs, so the caps hold across gateway processes."""

from __future__ import annotations

import math
from datetime import datetime, timedelta

from sqlalchemy import Integer, bindparam, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.budgets.models import RateWindow
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
_windows = table_of(RateWindow).c
_TAKE_RATE = (
    update(table_of(RateWindow))
    .where(
        _windows.scope == bindparam("b_scope"),
        _windows.window_start == bindparam("b_window"),
        _windows.count + _N <= bindparam("b_limit", type_=Integer),
    )
    .values(count=_windows.count + _N)
    .returning(_windows.count)
)
_GIVE_RATE = (
    update(table_of(RateWindow))
    .where(_windows.scope == bindparam("b_scope"), _windows.window_start == bindparam("b_window"))
    .values(count=_windows.count - _N)
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


def _window(now: datetime) -> datetime:
    return now.replace(second=0, microsecond=0)


async def take_rate(session: AsyncSession, tenant: Tenant, n: int, now: datetime) -> bool:
    """Count `n` submits in the tenant's current minute if they all fit under ratePerMinute."""
    limit = tenant.rate_per_minute
    if limit is None or n == 0:
        return True
    params = {"b_scope": tenant_scope(tenant.id), "b_window": _window(now), "b_n": n, "b_limit": limit}
    if (await session.execute(_TAKE_RATE, params)).first() is not None:
        return True
    await insert_ignore(session, RateWindow, [dict(scope=params["b_scope"], window_start=params["b_window"], count=0)])
    return (await session.execute(_TAKE_RATE, params)).first() is not None


async def take_scope_rate(session: AsyncSession, scope: str, limit: int, now: datetime) -> bool:
    """Count one submit in `scope`'s current minute if it fits under `limit` (a provider's rate_per_minute)."""
    params = {"b_scope": scope, "b_window": _window(now), "b_n": 1, "b_limit": limit}
    if (await session.execute(_TAKE_RATE, params)).first() is not None:
        return True
    await insert_ignore(session, RateWindow, [dict(scope=scope, window_start=params["b_window"], count=0)])
    return (await session.execute(_TAKE_RATE, params)).first() is not None


async def give_scope_rate(session: AsyncSession, scope: str, now: datetime) -> None:
    await session.execute(_GIVE_RATE, {"b_scope": scope, "b_window": _window(now), "b_n": 1})


async def give_rate(session: AsyncSession, tenant: Tenant, n: int, now: datetime) -> None:
    """Give back submits counted by take_rate in this transaction (a batch that did not fit)."""
    if tenant.rate_per_minute is not None and n:
        await session.execute(_GIVE_RATE, {"b_scope": tenant_scope(tenant.id), "b_window": _window(now), "b_n": n})


def rate_limited(tenant: Tenant, now: datetime) -> TooManyRequests:
    retry_after = max(1, math.ceil((_window(now) + timedelta(minutes=1) - now).total_seconds()))
    return TooManyRequests(
        f"This tenant may submit {tenant.rate_per_minute} predictions a minute. Retry in {retry_after} s.",
        retry_after,
        limit=tenant.rate_per_minute,
    )


async def would_admit(session: AsyncSession, tenant: Tenant, now: datetime) -> bool:
    """Whether a submit would get a slot and a rate unit now, without taking anything (for quotes).
    `tenant` must have been read in this transaction (the key check does): its in_flight is current."""
    if tenant.max_concurrent is not None and tenant.in_flight >= tenant.max_concurrent:
        return False
    if tenant.rate_per_minute is not None:
        used = await session.scalar(
            select(RateWindow.count).where(
                RateWindow.scope == tenant_scope(tenant.id),
                RateWindow.window_start == now.replace(second=0, microsecond=0),
            )
        )
        if (used or 0) >= tenant.rate_per_minute:
            return False
    return True
