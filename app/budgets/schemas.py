from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel


class UsageOut(BaseModel):
    budgetCents: int | None
    period: str
    periodStart: datetime | None
    periodEnd: datetime | None
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
    resetsAt: datetime | None
