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
