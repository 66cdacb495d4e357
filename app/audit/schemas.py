from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from app.core.clock import Timestamp


class AuditEntryOut(BaseModel):
    id: str
    at: Timestamp
    actor: str
    action: str
    target: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    requestId: str | None


class AuditList(BaseModel):
    data: list[AuditEntryOut]
    nextCursor: str | None
