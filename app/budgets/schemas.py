from __future__ import annotations

from pydantic import BaseModel

from app.core.clock import Timestamp


class UsageOut(BaseModel):
    budgetCents: int | None
    period: str
    periodStart: Timestamp | None
    periodEnd: Timestamp | None
    spentCents: int
    reservedCents: int
    remainingCents: int | None


class UsageRow(BaseModel):
    key: str
    spentCents: int
    predictions: int


class UsageReport(BaseModel):
    groupBy: str
    data: list[dict[str, str | int]]


class QuoteOut(BaseModel):
    """POST /api/v1/models/{modelId}/quote: what a submit now would hold, and whether it would pass."""

    estimateCents: int
    fits: bool
    remainingCents: int | None
    budgetCents: int | None
    resetsAt: Timestamp | None
