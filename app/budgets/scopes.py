"""The names of the rows money and limits are counted in: "tenant:<id>" (the tenant's budget counter and
rate limit) and "key:<id>" (a key with a budget of its own). Built here only, in Python and in SQL, so
that a join on a counter row and the row a hold writes can never disagree."""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, literal
from sqlalchemy.orm import QueryableAttribute

TENANT = "tenant:"
KEY = "key:"


def tenant_scope(tenant_id: str) -> str:
    return f"{TENANT}{tenant_id}"


def key_scope(key_id: str) -> str:
    return f"{KEY}{key_id}"


def tenant_scope_of(tenant_id: ColumnElement[Any] | QueryableAttribute[Any]) -> ColumnElement[str]:
    """tenant_scope in SQL, for joining a tenant's row (`tenant_id`, a column) to its counter."""
    return literal(TENANT) + tenant_id


def is_key_scope(scope: str) -> bool:
    return scope.startswith(KEY)
