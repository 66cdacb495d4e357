from __future__ import annotations

from datetime import date, datetime

from sqlalchemy import BigInteger, CheckConstraint, ForeignKey, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from app.core import clock
from app.core.database import Base, BigIntId


class BudgetCounter(Base):
    """Running spent/reserved totals of one scope ("tenant:<id>" or "key:<id>") in one period.

    The counters are what the conditional reservation checks; the ledger is what they must equal.
    """

    __tablename__ = "budget_counters"
    # Counters never go negative (migration 0004): a bug that would make them is refused by the database.
    __table_args__ = (
        CheckConstraint("spent_cents >= 0", name="spent_cents_nonnegative"),
        CheckConstraint("reserved_cents >= 0", name="reserved_cents_nonnegative"),
    )

    scope: Mapped[str] = mapped_column(String(48), primary_key=True)
    period_start: Mapped[datetime] = mapped_column(primary_key=True)
    spent_cents: Mapped[int] = mapped_column(default=0)
    reserved_cents: Mapped[int] = mapped_column(default=0)


class LedgerEntry(Base):
    """Append-only: one row per movement of money, written in the transaction that moves it."""

    __tablename__ = "ledger_entries"
    __table_args__ = (
        Index("ix_ledger_entries_tenant_period", "tenant_id", "period_start"),
        Index("ix_ledger_entries_created_at", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    api_key_id: Mapped[str | None] = mapped_column(String(40), index=True)
    prediction_id: Mapped[str | None] = mapped_column(String(40), index=True)
    model_id: Mapped[str | None] = mapped_column(String(100))
    # The provider that served (settle, refund) or was tried (release); None for a hold (not yet chosen).
    provider: Mapped[str | None] = mapped_column(String(32))
    period_start: Mapped[datetime]
    kind: Mapped[str] = mapped_column(String(16))  # reserve | settle | release | refund
    reserved_delta: Mapped[int] = mapped_column(default=0)
    spent_delta: Mapped[int] = mapped_column(default=0)
    note: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=clock.now)


class DailyUsage(Base):
    """Per tenant and UTC day: cents spent, predictions charged and submits refused by a limit.

    Kept as money moves (in the transaction that writes the ledger row), so the dashboard reads a
    month of a tenant's spending as 30 rows instead of summing the ledger.
    """

    __tablename__ = "daily_usage"
    # The overview reads today's row of every tenant; rows are inserted once a day and then only
    # updated in non-indexed columns, so the index costs one insert per tenant per day.
    __table_args__ = (Index("ix_daily_usage_day_tenant_id", "day", "tenant_id"),)

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    day: Mapped[date] = mapped_column(primary_key=True)
    spent_cents: Mapped[int] = mapped_column(default=0)
    predictions: Mapped[int] = mapped_column(default=0)
    refusals: Mapped[int] = mapped_column(default=0)


class PricePoint(Base):
    """The highest costCents the vendor has billed for a model, resolution and duration."""

    __tablename__ = "price_points"

    model_id: Mapped[str] = mapped_column(String(100), primary_key=True)
    resolution: Mapped[str] = mapped_column(String(8), primary_key=True)
    duration_s: Mapped[int] = mapped_column(primary_key=True)
    max_seen_cents: Mapped[int]
    updated_at: Mapped[datetime] = mapped_column(default=clock.now)


class RateLimit(Base):
    """A rate limit's state under GCRA (app/budgets/limits.py): the theoretical arrival time of its
    next unit, in microseconds since the epoch (integers: the same arithmetic on either database)."""

    __tablename__ = "rate_limits"

    scope: Mapped[str] = mapped_column(String(48), primary_key=True)
    tat_us: Mapped[int] = mapped_column(BigInteger)


class ThresholdNotice(Base):
    """A budget.threshold event already sent: its primary key makes it once per period."""

    __tablename__ = "threshold_notices"

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    period_start: Mapped[datetime] = mapped_column(primary_key=True)
    percent: Mapped[int] = mapped_column(primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=clock.now)
