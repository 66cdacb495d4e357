from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel

from app.webhooks.models import DeliveryStatus


class AttemptOut(BaseModel):
    attemptedAt: datetime
    statusCode: int | None
    latencyMs: int
    error: str | None


class DeliveryOut(BaseModel):
    id: str
    tenantId: str
    predictionId: str | None
    eventType: str
    url: str
    status: DeliveryStatus
    attempts: int
    nextAttemptAt: datetime | None
    lastStatusCode: int | None
    lastError: str | None
    createdAt: datetime
    deliveredAt: datetime | None


class DeliveryDetail(DeliveryOut):
    attemptLog: list[AttemptOut]


class DeliveryList(BaseModel):
    data: list[DeliveryOut]
    nextCursor: str | None
