from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, CheckConstraint, ForeignKey, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from app.core.database import Base


class QueueState:
    QUEUED = "queued"  # waiting for a provider with room
    SENDING = "sending"  # claimed by a dispatcher, committed before its HTTP call (never sent twice)


class QueueEntry(Base):
    """One queued prediction: the dispatcher's due work (a row with an order and a lease)."""

    __tablename__ = "queue_entries"
    __table_args__ = (
        Index("ix_queue_entries_tenant_state_order", "tenant_id", "state", "enqueued_at", "prediction_id"),
        Index("ix_queue_entries_state_enqueued_at", "state", "enqueued_at"),
        Index("ix_queue_entries_model_state", "model_id", "state"),
    )

    prediction_id: Mapped[str] = mapped_column(ForeignKey("predictions.id"), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    # What routing needs without reading the prediction's parameters.
    model_id: Mapped[str] = mapped_column(String(100))
    resolution: Mapped[str] = mapped_column(String(16))
    duration: Mapped[int]
    state: Mapped[str] = mapped_column(String(8))
    # Its place in its tenant's line: a dispatch put back keeps it, so it goes back at the head.
    enqueued_at: Mapped[datetime]
    lease_owner: Mapped[str | None] = mapped_column(String(80))
    lease_expires_at: Mapped[datetime | None]
    attempts: Mapped[int] = mapped_column(default=0)


class QueueTenant(Base):
    """A tenant's share of the queue: how many it has waiting (the maxQueued bound, by a conditional
    UPDATE) and its pass in stride scheduling (weighted round robin: the lowest pass sends next, each
    send adds STRIDE / queueWeight)."""

    __tablename__ = "queue_tenants"
    __table_args__ = (
        CheckConstraint("depth >= 0", name="depth_nonnegative"),
        Index("ix_queue_tenants_depth_pass", "depth", "pass_"),
    )

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    depth: Mapped[int] = mapped_column(default=0)
    pass_: Mapped[int] = mapped_column(BigInteger, default=0)
