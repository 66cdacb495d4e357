from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, ForeignKey, Index, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.core import clock
from app.core.database import Base


class PredictionStatus(StrEnum):
    """submitting (held, upstream not yet confirmed) -> processing -> completed | failed; or, when no
    provider could take it (SPEC §12), submitting -> queued -> sending -> processing (or back to queued,
    or failed). Queued and sending are shown to callers as "processing" (app/queue)."""

    SUBMITTING = "submitting"
    QUEUED = "queued"
    SENDING = "sending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"


TERMINAL_STATUSES = (PredictionStatus.COMPLETED, PredictionStatus.FAILED)
# What a tenant sees: a prediction still submitting is not shown until the vendor has confirmed it.
PUBLIC_STATUSES = (PredictionStatus.PROCESSING, *TERMINAL_STATUSES, PredictionStatus.QUEUED, PredictionStatus.SENDING)
# Held and waiting in the fair queue: shown as "processing" with `queued: true`.
WAITING_STATUSES = (PredictionStatus.QUEUED, PredictionStatus.SENDING)


class Prediction(Base):
    __tablename__ = "predictions"
    __table_args__ = (
        Index("ix_predictions_tenant_id_id", "tenant_id", "id"),
        Index("ix_predictions_next_poll_at", "next_poll_at"),
        Index("ix_predictions_status_created_at", "status", "created_at"),
        # Ids are each provider's own: unique per provider.
        UniqueConstraint("provider", "upstream_id", name="uq_predictions_provider_upstream_id"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    api_key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"))
    model_id: Mapped[str] = mapped_column(String(100))
    model_name: Mapped[str | None] = mapped_column(String(200))
    # The provider that accepted it (SPEC §11: polled there only) and that provider's id; while
    # "submitting", the provider being tried. upstream_ref: what the adapter needs to find it again
    # besides the id (fal's status and response URLs).
    provider: Mapped[str | None] = mapped_column(String(32))
    upstream_id: Mapped[str | None] = mapped_column(String(200))
    upstream_ref: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    # Counted in its provider's in_flight (only while that provider has a max_concurrent).
    holds_provider_slot: Mapped[bool] = mapped_column(default=False)
    status: Mapped[str] = mapped_column(String(16))  # a PredictionStatus
    params: Mapped[dict[str, Any]] = mapped_column(JSON(none_as_null=True))
    webhook_url: Mapped[str | None] = mapped_column(String(2048))
    # The public base the submit came through: rehosted output links start there (the copier has no request).
    public_base_url: Mapped[str | None] = mapped_column(String(2048))
    webhook_events: Mapped[list[str] | None] = mapped_column(JSON(none_as_null=True))
    meta: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON(none_as_null=True))
    outputs: Mapped[list[str] | None] = mapped_column(JSON(none_as_null=True))
    error: Mapped[str | None] = mapped_column(Text)
    estimated_time: Mapped[str | None] = mapped_column(String(40))
    estimate_cents: Mapped[int]
    # Counted in the tenant's in_flight (only while the tenant has a maxConcurrent).
    holds_slot: Mapped[bool] = mapped_column(default=False)
    charged_cents: Mapped[int | None]
    period_start: Mapped[datetime]
    created_at: Mapped[datetime] = mapped_column(default=clock.now)
    completed_at: Mapped[datetime | None]
    terminal_seen_at: Mapped[datetime | None]

    # The poll queue lives on the row: due time plus a lease any process can take over.
    next_poll_at: Mapped[datetime | None]
    lease_owner: Mapped[str | None] = mapped_column(String(80))
    lease_expires_at: Mapped[datetime | None]
    poll_count: Mapped[int] = mapped_column(default=0)
    poll_failures: Mapped[int] = mapped_column(default=0)


class IdempotencyKey(Base):
    __tablename__ = "idempotency_keys"
    __table_args__ = (Index("ix_idempotency_keys_expires_at", "expires_at"),)

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    prediction_id: Mapped[str | None] = mapped_column(String(40))
    response: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    created_at: Mapped[datetime] = mapped_column(default=clock.now)
    expires_at: Mapped[datetime]
