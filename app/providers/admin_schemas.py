"""What the operator API answers about providers (GET /admin/v1/providers and the switches)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from app.core.clock import Timestamp


class _Out(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)


class ProviderStateOut(_Out):
    enabled: bool = Field(description="False once an operator disabled it: no new submit is routed there")
    disabled: bool
    disabled_at: Timestamp | None
    disabled_by: str | None
    cooling_down_until: Timestamp | None = Field(description="Set while a 429 or a 401/403 keeps it out")
    cooling_down_reason: str | None
    circuit: Literal["closed", "open", "half_open"]
    circuit_until: Timestamp | None
    failures_in_a_row: int
    in_flight: int = Field(description="Its predictions in flight across replicas (counted while it has a cap)")
    last_error: str | None
    last_error_at: Timestamp | None


class ProviderToday(_Out):
    """The UTC day so far, from every process: calls (sent every few seconds) and spend (the ledger)."""

    submits: int
    accepted: int
    throttled: int = Field(description="429 answers")
    errors: int = Field(description="5xx, 401/403, timeouts, refused connections, unreadable answers")
    mean_submit_ms: float | None
    polls: int
    spent_cents: int
    predictions: int


class ProviderOut(_Out):
    name: str
    kind: Literal["vibedream", "wavespeed", "fal"]
    base_url: str
    api_key_env: str | None = Field(description="The variable its key is read from (the key is never shown)")
    serves: list[str]
    model: str
    priority: int
    weight: float
    max_concurrent: int | None
    rate_per_minute: int | None
    output_hosts: list[str]
    resolutions: list[str]
    max_duration: int
    cents_per_second: dict[str, float]
    failure_threshold: int | None
    cooldown_s: float
    state: ProviderStateOut
    today: ProviderToday


class ProviderList(_Out):
    routing: Literal["priority", "cheapest", "weighted"]
    data: list[ProviderOut]
