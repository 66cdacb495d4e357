"""Per provider and UTC day: its upstream calls as every process saw them, for the dashboard.

Each process tallies its calls in memory (`app.core.metrics.observe_upstream`, nothing written on the
request's path) and adds them to these rows every few seconds and when it stops. The rows are for
operators' eyes: a process killed outright loses at most its last few seconds of counts. Money is never
read from here; spend comes from the ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import date
from typing import Any

from sqlalchemy import BigInteger, Date, String, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Mapped, mapped_column

from app.core import clock, metrics
from app.core.database import Base, table_of, transaction

log = logging.getLogger("vidgate.providers")

FLUSH_S = 5.0


class ProviderDay(Base):
    __tablename__ = "provider_days"

    provider: Mapped[str] = mapped_column(String(32), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    submits: Mapped[int] = mapped_column(default=0)
    accepted: Mapped[int] = mapped_column(default=0)
    throttled: Mapped[int] = mapped_column(default=0)
    errors: Mapped[int] = mapped_column(default=0)
    submit_ms: Mapped[int] = mapped_column(BigInteger, default=0)
    polls: Mapped[int] = mapped_column(default=0)


_COUNTS = ("submits", "accepted", "throttled", "errors", "submit_ms", "polls")


def _upsert(insert: Any) -> Any:
    table = table_of(ProviderDay)
    statement = insert(table)
    return statement.on_conflict_do_update(
        index_elements=["provider", "day"],
        set_={name: table.c[name] + statement.excluded[name] for name in _COUNTS},
    )


_UPSERT = {"postgresql": _upsert(pg_insert), "sqlite": _upsert(sqlite_insert)}


async def add(session: AsyncSession, tallies: dict[str, metrics.ProviderTally], day: date) -> None:
    if not tallies:
        return
    rows = [
        {
            "provider": provider,
            "day": day,
            "submits": t.submits,
            "accepted": t.accepted,
            "throttled": t.throttled,
            "errors": t.errors,
            "submit_ms": round(t.submit_ms),
            "polls": t.polls,
        }
        for provider, t in sorted(tallies.items())  # one lock order across processes
    ]
    await session.execute(_UPSERT[session.get_bind().dialect.name], rows)


async def flush(sessions: async_sessionmaker[AsyncSession]) -> int:
    """This process's tallies since the last flush, added to today's rows; given back if it fails."""
    tallies = metrics.take_tallies()
    if not tallies:
        return 0
    try:
        async with transaction(sessions) as session:
            await add(session, tallies, clock.now().date())
    except BaseException:
        metrics.give_back_tallies(tallies)
        raise
    return len(tallies)


async def flush_loop(sessions: async_sessionmaker[AsyncSession], stopping: asyncio.Event) -> None:
    """Until `stopping` is set, then once more (a graceful stop keeps its last counts)."""
    while not stopping.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), FLUSH_S)
        try:
            await flush(sessions)
        except Exception as exc:  # the counts wait for the next round; the database may be away
            log.warning("provider stats flush failed", extra={"error_type": type(exc).__name__})


async def today(session: AsyncSession) -> dict[str, ProviderDay]:
    rows = await session.scalars(select(ProviderDay).where(ProviderDay.day == clock.now().date()))
    return {row.provider: row for row in rows}
