from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field
from pydantic.alias_generators import to_camel

from app.core.clock import Timestamp
from app.core.types import Line
from app.tenants.schemas import CamelModel

Role = Literal["admin", "viewer"]


class OperatorTokenCreate(CamelModel):
    # Shown as `operator:{name}` in the audit log: one word, so a filter on it is unambiguous.
    name: Line = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9._@-]+$")
    role: Role


class OperatorTokenOut(CamelModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, from_attributes=True)

    id: str
    name: str
    role: Role
    prefix: str
    created_at: Timestamp
    revoked_at: Timestamp | None


class OperatorTokenCreated(CamelModel):
    id: str
    name: str
    role: Role
    token: str
    prefix: str
    created_at: Timestamp


class OperatorTokenList(CamelModel):
    data: list[OperatorTokenOut]
