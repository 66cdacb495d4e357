from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import ForeignKey, Index, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from app.core import clock
from app.core.database import Base, BigIntId


class DeliveryStatus(StrEnum):
    """pending (due or being tried) -> succeeded | dead; an operator's redeliver makes it pending again."""

    PENDING = "pending"
    SUCCEEDED = "succeeded"
    DEAD = "dead"


class WebhookDelivery(Base):
    """One event for one endpoint: the outbox row, written with the state change that causes it."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
        Index("ix_webhook_deliveries_tenant_id_id", "tenant_id", "id"),
        Index("ix_webhook_deliveries_status_id", "status", "id"),  # the dashboard's list by status
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # the webhook-id header
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    prediction_id: Mapped[str | None] = mapped_column(String(40), index=True)
    event_type: Mapped[str] = mapped_column(String(40))
    url: Mapped[str] = mapped_column(String(2048))
    target_host: Mapped[str] = mapped_column(String(300))
    payload: Mapped[str] = mapped_column(Text)  # the exact body, so every retry signs the same bytes
    status: Mapped[str] = mapped_column(String(16), default=DeliveryStatus.PENDING)
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[datetime | None]
    lease_owner: Mapped[str | None] = mapped_column(String(80))
    lease_expires_at: Mapped[datetime | None]
    last_status_code: Mapped[int | None]
    last_error: Mapped[str | None] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(default=clock.now)
    delivered_at: Mapped[datetime | None]


class WebhookAttempt(Base):
    __tablename__ = "webhook_attempts"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    delivery_id: Mapped[str] = mapped_column(ForeignKey("webhook_deliveries.id"), index=True)
    attempted_at: Mapped[datetime] = mapped_column(default=clock.now)
    status_code: Mapped[int | None]
    latency_ms: Mapped[int]
    error: Mapped[str | None] = mapped_column(String(500))
    worker: Mapped[str | None] = mapped_column(String(80))
