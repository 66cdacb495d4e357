"""What the operator API answers about a prediction's rehosted outputs."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

from app.core.clock import Timestamp


class _Out(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, from_attributes=True)


class StoredFileOut(_Out):
    position: int
    source_url: str
    content_type: str
    size_bytes: int
    sha256: str
    stored_at: Timestamp


class PredictionOutputsOut(_Out):
    prediction_id: str
    tenant_id: str
    status: str  # copying, stored, failed or deleted
    source_urls: list[str]  # the vendor's original URLs
    stored_bytes: int
    attempts: int
    last_error: str | None
    started_at: Timestamp
    stored_at: Timestamp | None
    deleted_at: Timestamp | None
    files: list[StoredFileOut]
