from __future__ import annotations

from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.core.clock import Timestamp
from app.core.types import JsonObject, Line
from app.upstream.schemas import GenerateParams, check_http_url

METADATA_MAX_BYTES = 4096
# Plain strings, not the enum's members: a refusal lists the choices, and pydantic names a member by its
# repr (`<PredictionStatus.PROCESSING: 'processing'>`). PredictionStatus is a StrEnum: its values compare equal.
TerminalStatus = Literal["completed", "failed"]
PublicStatus = Literal["processing", TerminalStatus]


class GenerateRequest(GenerateParams):
    """The vendor's body plus gateway-only fields, which are stored and never forwarded."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    webhook: Line | None = Field(default=None, max_length=2048)
    webhook_events_filter: list[TerminalStatus] | None = Field(default=None, alias="webhookEventsFilter")
    metadata: JsonObject | None = None
    # False: a fast 503 no_provider_available instead of waiting in the fair queue (SPEC §12).
    queue: bool | None = None

    @field_validator("webhook")
    @classmethod
    def _webhook(cls, value: str | None) -> str | None:
        return None if value is None else check_http_url(value, "webhook")

    @field_validator("webhook_events_filter")
    @classmethod
    def _filter(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else sorted(set(value))

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and len(orjson.dumps(value)) > METADATA_MAX_BYTES:
            raise ValueError(f"metadata must serialize to at most {METADATA_MAX_BYTES} bytes of JSON")
        return value

    def upstream_body(self) -> dict[str, object]:
        """The vendor's fields, as GenerateParams.upstream_body gives them. They passed GenerateParams' own
        validators already (this is a subclass), so they are read, not validated again (19 µs a submit)."""
        return {name: value for name in _UPSTREAM_FIELDS if (value := getattr(self, name)) is not None}


_UPSTREAM_FIELDS = tuple(GenerateParams.model_fields)


class PredictionOut(BaseModel):
    """GET /api/v1/predictions/{id}: the upstream's shape plus costCents and metadata."""

    id: str
    modelId: str
    modelName: str | None
    status: PublicStatus
    outputs: list[str] | None
    error: str | None
    createdAt: Timestamp
    completedAt: Timestamp | None
    costCents: int | None
    metadata: dict[str, Any] | None
    provider: str | None = Field(
        description="The provider that accepted it (gateway-only; SPEC §11): its name in the operator's registry."
    )
    queued: bool | None = Field(
        default=None, description="Waiting in the fair queue for a provider with room (gateway-only; SPEC §12)."
    )
    queuePosition: int | None = Field(
        default=None, description="1-based place among the tenant's own queued predictions, while queued."
    )


class SubmitOut(BaseModel):
    """The upstream's submit answer with the gateway's id; with Prefer: wait, also the GET fields."""

    id: str
    status: PublicStatus
    statusUrl: str
    estimatedTime: str | None
    costCents: int | None
    createdAt: Timestamp
    metadata: dict[str, Any] | None
    # Optional: an Idempotency-Key replay of an answer given before providers existed has none.
    provider: str | None = Field(default=None, description="The provider that accepted it (gateway-only; SPEC §11).")
    queued: bool | None = Field(default=None, description="Held and queued: no provider could take it yet (SPEC §12).")
    outputs: list[str] | None = None
    error: str | None = None
    completedAt: Timestamp | None = None


class PredictionList(BaseModel):
    data: list[PredictionOut]
    nextCursor: str | None
