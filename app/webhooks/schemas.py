from __future__ import annotations

from pydantic import BaseModel

from app.core.clock import Timestamp
from app.webhooks.models import DeliveryStatus


class AttemptOut(BaseModel):
    attemptedAt: Timestamp
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
    nextAttemptAt: Timestamp | None
    lastStatusCode: int | None
    lastError: str | None
    createdAt: Timestamp
    deliveredAt: Timestamp | None


class DeliveryDetail(DeliveryOut):
    attemptLog: list[AttemptOut]


class DeliveryList(BaseModel):
    data: list[DeliveryOut]
    nextCursor: str | None


class DeliveryDetailList(BaseModel):
    data: list[DeliveryDetail]
    nextCursor: str | None


class WebhookEndpointOut(BaseModel):
    url: str | None
    eventsFilter: list[str] | None
    disabledAt: Timestamp | None


class WebhookTestOut(BaseModel):
    delivered: bool
    status: int | None
    error: str | None = None
