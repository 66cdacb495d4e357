"""The vendor's request and answer shapes (SPEC section 1), validated exactly as its parameter table."""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.core.clock import Timestamp
from app.core.types import Line, Text

Resolution = Literal["480p", "720p", "1080p"]


def check_http_url(value: str, what: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{what} must be an absolute http(s) URL with a host")
    return value


class GenerateParams(BaseModel):
    """Exactly the vendor's table: anything else is refused before it can reach the upstream."""

    model_config = ConfigDict(extra="forbid")

    image: Line = Field(max_length=4096, description="http(s) URL of a JPEG, PNG, GIF or WebP image")
    prompt: Text = Field(min_length=1, max_length=5000, strict=True)
    resolution: Resolution | None = None
    duration: int | None = Field(default=None, ge=5, le=20, strict=True)
    seed: int | None = Field(default=None, ge=-1, le=999999, strict=True)

    @field_validator("image")
    @classmethod
    def _image(cls, value: str) -> str:
        return check_http_url(value, "image")

    def upstream_body(self) -> dict[str, object]:
        return self.model_dump(exclude_none=True)


class UpstreamSubmitted(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str
    status: str
    status_url: str | None = Field(default=None, alias="statusUrl")
    estimated_time: str | None = Field(default=None, alias="estimatedTime")
    # The provider's charge when its answers carry one (vibedream); None: priced by the providers file.
    cost_cents: int | None = Field(default=None, alias="costCents", ge=0)
    created_at: Timestamp | None = Field(default=None, alias="createdAt")
    # What polling needs besides the id (fal's status and response URLs); set by the adapter, never
    # read from an answer (no provider sends this key).
    ref: dict[str, str] | None = Field(default=None, alias="_vidgateRef", exclude=True)


class UpstreamPrediction(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str
    model_id: str | None = Field(default=None, alias="modelId")
    model_name: str | None = Field(default=None, alias="modelName")
    status: Literal["processing", "completed", "failed"]
    outputs: list[str] | None = None
    error: str | None = None
    created_at: Timestamp | None = Field(default=None, alias="createdAt")
    completed_at: Timestamp | None = Field(default=None, alias="completedAt")
