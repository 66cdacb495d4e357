from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, CheckConstraint, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.core import clock
from app.core.database import Base


class Tenant(Base):
    __tablename__ = "tenants"
    # Money and slot columns never go negative (migration 0004); named by the metadata's convention.
    __table_args__ = (
        CheckConstraint("in_flight >= 0", name="in_flight_nonnegative"),
        CheckConstraint("budget_cents >= 0", name="budget_cents_nonnegative"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    budget_cents: Mapped[int | None]
    budget_period: Mapped[str] = mapped_column(String(8), default="month")
    max_concurrent: Mapped[int | None]
    rate_per_minute: Mapped[int | None]
    # Kept by conditional UPDATEs so the concurrency cap holds across processes.
    in_flight: Mapped[int] = mapped_column(default=0)
    webhook_url: Mapped[str | None] = mapped_column(String(2048))
    # Days stored outputs are kept; null: VIDGATE_OUTPUT_RETENTION_DAYS.
    output_retention_days: Mapped[int | None]
    # The fair queue (SPEC §12): its share of dispatches (weighted round robin) and how many may wait.
    # Server defaults: rows written before migration 0012 (or without the fields) get them.
    queue_weight: Mapped[int] = mapped_column(server_default="1")
    max_queued: Mapped[int] = mapped_column(server_default="1000")
    webhook_disabled_at: Mapped[datetime | None]
    # The tenant endpoint's event types (null: every one); set by the tenant itself (SPEC §13).
    webhook_events_filter: Mapped[list[str] | None] = mapped_column(JSON(none_as_null=True))
    webhook_secret: Mapped[str] = mapped_column(String(100))
    webhook_secret_previous: Mapped[str | None] = mapped_column(String(100))
    webhook_secret_previous_expires_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=clock.now)
    deleted_at: Mapped[datetime | None]

    keys: Mapped[list[ApiKey]] = relationship(back_populates="tenant", lazy="raise")


class ApiKey(Base):
    __tablename__ = "api_keys"
    __table_args__ = (CheckConstraint("budget_cents >= 0", name="budget_cents_nonnegative"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str | None] = mapped_column(String(200))
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    budget_cents: Mapped[int | None]
    # What the key may do (generate, read, manage) and on which models (null: every model the tenant
    # may use); read from the key cache on every request, so no statement per request checks them.
    scopes: Mapped[list[str]] = mapped_column(JSON, default=lambda: ["generate", "read"])
    models: Mapped[list[str] | None] = mapped_column(JSON(none_as_null=True))
    expires_at: Mapped[datetime | None]
    # Kept from memory by app/tenants/last_used.py: at most a flush interval behind.
    last_used_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=clock.now)
    revoked_at: Mapped[datetime | None]

    tenant: Mapped[Tenant] = relationship(back_populates="keys", lazy="raise")
