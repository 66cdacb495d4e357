"""Typed answers of the gateway (its JSON is camelCase; these fields are snake_case)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

Status = Literal["processing", "completed", "failed"]
TERMINAL: tuple[Status, ...] = ("completed", "failed")


class _Model(BaseModel):
    # Fields the gateway adds later are ignored, not errors: an old client keeps working.
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True)


class Prediction(_Model):
    id: str
    model_id: str | None = None
    model_name: str | None = None
    status: Status
    outputs: list[str] | None = None
    error: str | None = None
    created_at: datetime
    completed_at: datetime | None = None
    cost_cents: int | None = None
    metadata: dict[str, Any] | None = None
    # Only in submit answers:
    status_url: str | None = None
    estimated_time: str | None = None

    @property
    def done(self) -> bool:
        return self.status in TERMINAL


class Usage(_Model):
    budget_cents: int | None
    period: str
    period_start: datetime | None
    period_end: datetime | None
    spent_cents: int
    reserved_cents: int
    remaining_cents: int | None


class Quote(_Model):
    estimate_cents: int
    fits: bool
    remaining_cents: int | None
    budget_cents: int | None
    resets_at: datetime | None


class PredictionPage(_Model):
    data: list[Prediction]
    next_cursor: str | None = None


class WebhookEvent(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str = Field(description="The webhook-id header: stable across retries of one event, use it to deduplicate.")
    type: str
    timestamp: datetime
    data: dict[str, Any]
