"""Rehosted outputs (SPEC section 8): the copy job per prediction and the files it stored."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, BigInteger, ForeignKey, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from app.core import clock
from app.core.database import Base

# copying -> stored -> deleted (retention), or copying -> failed
COPYING, STORED, FAILED, DELETED = "copying", "stored", "failed", "deleted"


class OutputCopy(Base):
    """One prediction's copy job. Its queue lives on the row like polling and delivery: a due time and
    a lease, so a killed process's copy is resumed by another and no two copy it at once."""

    __tablename__ = "output_copies"
    __table_args__ = (
        Index("ix_output_copies_due", "status", "next_attempt_at"),
        Index("ix_output_copies_tenant_id_status", "tenant_id", "status"),
    )

    prediction_id: Mapped[str] = mapped_column(ForeignKey("predictions.id"), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    status: Mapped[str] = mapped_column(String(16), default=COPYING)
    # The vendor's own URLs, kept for operators (SPEC section 8).
    sources: Mapped[list[str]] = mapped_column(JSON)
    # Where links start, fixed when the copy is enqueued: the webhook and every GET agree.
    link_base: Mapped[str] = mapped_column(String(2048))
    # What the vendor said when it reported completed, handed to the terminal transition.
    vendor_completed_at: Mapped[datetime | None]
    model_name: Mapped[str | None] = mapped_column(String(200))
    # The provider that served it: its outputs are fetched only from that provider's output_hosts.
    provider: Mapped[str | None] = mapped_column(String(32))
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[datetime | None]
    lease_owner: Mapped[str | None] = mapped_column(String(80))
    lease_expires_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(String(500))
    started_at: Mapped[datetime] = mapped_column(default=clock.now)
    # Links are issued in windows of VIDGATE_OUTPUT_URL_TTL_S counted from here.
    stored_at: Mapped[datetime | None]
    stored_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    deleted_at: Mapped[datetime | None]


class StoredOutput(Base):
    """One file in the store. Written once it is complete there, so a resumed copy skips it."""

    __tablename__ = "stored_outputs"

    prediction_id: Mapped[str] = mapped_column(ForeignKey("output_copies.prediction_id"), primary_key=True)
    position: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(40))  # the link's last segment, "0.mp4"
    source_url: Mapped[str] = mapped_column(String(2048))
    key: Mapped[str] = mapped_column(String(300))  # the object's key in the store
    content_type: Mapped[str] = mapped_column(String(100))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    stored_at: Mapped[datetime] = mapped_column(default=clock.now)
