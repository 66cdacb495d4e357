"""The providers' shared state: what every replica must agree on (disabled, health, caps)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import CheckConstraint, String
from sqlalchemy.orm import Mapped, mapped_column

from app.core import clock
from app.core.database import Base


class ProviderState(Base):
    """One row per provider name (made on first use). `disabled` is the operator's switch (admin route
    and CLI); the rest is health and the cross-replica in-flight count, written by routing."""

    __tablename__ = "provider_states"
    __table_args__ = (CheckConstraint("in_flight >= 0", name="in_flight_nonnegative"),)

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    disabled: Mapped[bool] = mapped_column(default=False)
    disabled_at: Mapped[datetime | None]
    disabled_by: Mapped[str | None] = mapped_column(String(200))
    # Predictions accepted there and not yet terminal (plus submits being sent), counted only while it
    # has a max_concurrent: the conditional UPDATE on this holds the cap across replicas.
    in_flight: Mapped[int] = mapped_column(default=0)
    # A 429 (for its Retry-After) or a 401/403: not a candidate until then.
    cooldown_until: Mapped[datetime | None]
    cooldown_reason: Mapped[str | None] = mapped_column(String(200))
    # Errors in a row; at failure_threshold the circuit opens until circuit_until, then one probe
    # (probe_until: the lease of the one request allowed to try it) closes or reopens it.
    failures: Mapped[int] = mapped_column(default=0)
    circuit_until: Mapped[datetime | None]
    probe_until: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(String(500))
    last_error_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(default=clock.now)
