from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from app.core.clock import Timestamp
from app.core.types import Int32, Line

BudgetPeriod = Literal["day", "week", "month", "total"]
# What a key may do (SPEC §13): generate = submit and quote; read = predictions, usage and webhook deliveries;
# manage = the tenant's webhook endpoint, deliveries and keys.
Scope = Literal["generate", "read", "manage"]
DEFAULT_SCOPES: list[str] = ["generate", "read"]
# The tenant endpoint's event types (a prediction's own `webhookEventsFilter` says completed|failed).
EventType = Literal["prediction.completed", "prediction.failed", "budget.threshold"]


def _utc(moment: datetime) -> datetime:
    try:
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    except OverflowError as exc:  # year 1 with a positive offset
        raise ValueError("is out of range") from exc


# A moment a caller hands in (expiresAt): any ISO 8601 form, read as UTC, refused when it cannot be one.
Moment = Annotated[datetime, AfterValidator(_utc)]


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
    # The tenant endpoint's event types; null: every one.
    webhook_events_filter: list[EventType] | None = Field(default=None, max_length=3)


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
    webhook_events_filter: list[str] | None = None
    webhook_disabled_at: Timestamp | None
    created_at: Timestamp


class TenantCreated(TenantOut):
    webhook_secret: str


class TenantList(CamelModel):
    data: list[TenantOut]


class KeyCreate(CamelModel):
    """Omitted fields: scopes ["generate", "read"], every model the tenant may use, no expiry, no budget of
    its own (a key made by a key inherits its maker's models, expiry and budget)."""

    name: Line | None = Field(default=None, max_length=200)
    budget_cents: Int32 | None = Field(default=None, ge=0)
    scopes: list[Scope] | None = Field(default=None, min_length=1, max_length=3)
    models: list[Annotated[Line, Field(min_length=1, max_length=100)]] | None = Field(
        default=None, min_length=1, max_length=50
    )
    expires_at: Moment | None = None


class KeyOut(CamelModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, from_attributes=True)

    id: str
    name: str | None
    prefix: str
    scopes: list[Scope]
    models: list[str] | None = None
    budget_cents: int | None
    created_at: Timestamp
    last_used_at: Timestamp | None = None
    expires_at: Timestamp | None = None
    revoked_at: Timestamp | None


class KeyList(CamelModel):
    data: list[KeyOut]


class KeyCreated(CamelModel):
    id: str
    key: str
    prefix: str
    name: str | None
    scopes: list[Scope]
    models: list[str] | None
    budget_cents: int | None
    expires_at: Timestamp | None
    created_at: Timestamp


class WebhookSecretRotated(CamelModel):
    webhook_secret: str
    previous_secret_expires_at: Timestamp


class WebhookEndpointUpdate(CamelModel):
    """A tenant's own endpoint (SPEC §13): only the fields present change; a null URL removes it."""

    url: Line | None = Field(default=None, max_length=2048)
    events_filter: list[EventType] | None = Field(default=None, max_length=3)
