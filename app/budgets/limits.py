"""Concurrency and rate limits: conditional UPDATEs, so the caps hold across gateway processes."""

from __future__ import annotations

import math
from datetime import datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.budgets.models import RateWindow
from app.core import clock
from app.core.database import insert_ignore
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


async def acquire_slot(session: AsyncSession, tenant: Tenant, retry_after_s: int) -> None:
    result = await session.execute(
        update(Tenant)
        .where(
            Tenant.id == tenant.id,
            or_(Tenant.max_concurrent.is_(None), Tenant.in_flight < Tenant.max_concurrent),
        )
        .values(in_flight=Tenant.in_flight + 1)
        .returning(Tenant.in_flight)
        .execution_options(synchronize_session=False)
    )
    if result.first() is None:
        raise ConcurrencyLimited(
            f"This tenant already has {tenant.max_concurrent} predictions in flight, its limit. "
            "Retry when one of them has finished.",
            retry_after_s,
            limit=tenant.max_concurrent,
        )


async def release_slot(session: AsyncSession, tenant_id: str) -> None:
    await session.execute(
        update(Tenant)
        .where(Tenant.id == tenant_id, Tenant.in_flight > 0)
        .values(in_flight=Tenant.in_flight - 1)
        .execution_options(synchronize_session=False)
    )


async def consume_rate(session: AsyncSession, tenant: Tenant) -> None:
    """Fixed one-minute windows: simple, exact across processes, and cheap (one UPDATE)."""
    limit = tenant.rate_per_minute
    if limit is None:
        return
    now = clock.now()
    window = now.replace(second=0, microsecond=0)
    scope = f"tenant:{tenant.id}"
    stmt = (
        update(RateWindow)
        .where(RateWindow.scope == scope, RateWindow.window_start == window, RateWindow.count < limit)
        .values(count=RateWindow.count + 1)
        .returning(RateWindow.count)
    )
    if (await session.execute(stmt)).first() is not None:
        return
    await insert_ignore(session, RateWindow, [dict(scope=scope, window_start=window, count=0)])
    if (await session.execute(stmt)).first() is not None:
        return
    retry_after = max(1, math.ceil((window + timedelta(minutes=1) - now).total_seconds()))
    raise TooManyRequests(
        f"This tenant may submit {limit} predictions a minute. Retry in {retry_after} s.",
        retry_after,
        limit=limit,
    )


async def would_admit(session: AsyncSession, tenant: Tenant, now: datetime) -> bool:
    """Whether acquire_slot and consume_rate would pass now, without taking anything (for quotes).
    `tenant` must have been read in this transaction (the key check does): its in_flight is current."""
    if tenant.max_concurrent is not None and tenant.in_flight >= tenant.max_concurrent:
        return False
    if tenant.rate_per_minute is not None:
        used = await session.scalar(
            select(RateWindow.count).where(
                RateWindow.scope == f"tenant:{tenant.id}",
                RateWindow.window_start == now.replace(second=0, microsecond=0),
            )
        )
        if (used or 0) >= tenant.rate_per_minute:
            return False
    return True
