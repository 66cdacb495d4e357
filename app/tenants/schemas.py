from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from app.core.clock import Timestamp
from app.core.types import Int32, Line

BudgetPeriod = Literal["day", "week", "month", "total"]


class CamelModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class TenantCreate(CamelModel):
    name: Line = Field(min_length=1, max_length=200)
    budget_cents: Int32 | None = Field(default=None, ge=0)
    budget_period: BudgetPeriod = "month"
    max_concurrent: Int32 | None = Field(default=None, ge=1)
    rate_per_minute: Int32 | None = Field(default=None, ge=1)
    webhook_url: Line | None = Field(default=None, max_length=2048)
    # Days stored outputs are kept (null: VIDGATE_OUTPUT_RETENTION_DAYS).
    output_retention_days: Int32 | None = Field(default=None, ge=1, le=36500)
    # The fair queue (SPEC §12): share of dispatches under weighted round robin, and the queue's bound.
    # (Bounds inside Annotated: a Field's ge would be overridden by Int32's own.)
    queue_weight: Annotated[Int32, Field(ge=1, le=1000)] = 1
    max_queued: Annotated[Int32, Field(ge=0)] = 1000


class TenantUpdate(CamelModel):
    """Only the fields present are changed; null clears a limit or the webhook URL."""

    name: Line | None = Field(default=None, min_length=1, max_length=200)
    budget_cents: Int32 | None = Field(default=None, ge=0)
    budget_period: BudgetPeriod | None = None
    max_concurrent: Int32 | None = Field(default=None, ge=1)
    rate_per_minute: Int32 | None = Field(default=None, ge=1)
    webhook_url: Line | None = Field(default=None, max_length=2048)
    output_retention_days: Int32 | None = Field(default=None, ge=1, le=36500)
    queue_weight: Int32 | None = Field(default=None, ge=1, le=1000)
    max_queued: Int32 | None = Field(default=None, ge=0)


class TenantOut(CamelModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, from_attributes=True)

    id: str
    name: str
    budget_cents: int | None
    budget_period: BudgetPeriod
    max_concurrent: int | None
    rate_per_minute: int | None
    webhook_url: str | None
    output_retention_days: int | None = None
    queue_weight: int = 1
    max_queued: int = 1000
    webhook_disabled_at: Timestamp | None
    created_at: Timestamp


class TenantCreated(TenantOut):
    webhook_secret: str


class TenantList(CamelModel):
    data: list[TenantOut]


class KeyCreate(CamelModel):
    name: Line | None = Field(default=None, max_length=200)
    budget_cents: Int32 | None = Field(default=None, ge=0)


class KeyOut(CamelModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, from_attributes=True)

    id: str
    name: str | None
    prefix: str
    budget_cents: int | None
    created_at: Timestamp
    revoked_at: Timestamp | None


class KeyList(CamelModel):
    data: list[KeyOut]


class KeyCreated(CamelModel):
    id: str
    key: str
    prefix: str
    name: str | None
    budget_cents: int | None
    created_at: Timestamp


class WebhookSecretRotated(CamelModel):
    webhook_secret: str
    previous_secret_expires_at: Timestamp
