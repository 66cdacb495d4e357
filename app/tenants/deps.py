"""Tenant authentication: `Authorization: Bearer vg_...`. The routes' dependencies, which add the
caller's balance for the budget headers, are in app/budgets/deps.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.core.errors import Unauthorized
from app.core.logging import tenant_id_var
from app.tenants import service as tenants_service
from app.tenants.models import ApiKey, Tenant

bearer = HTTPBearer(auto_error=False, scheme_name="TenantKey", description="A tenant API key, vg_...")


@dataclass(frozen=True)
class Caller:
    tenant: Tenant
    key: ApiKey


Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def raw_key(credentials: HTTPAuthorizationCredentials | None) -> str:
    if credentials is None:
        raise Unauthorized("Send your API key as 'Authorization: Bearer vg_...'.")
    return credentials.credentials


def cached_caller(credentials: HTTPAuthorizationCredentials | None) -> Caller | None:
    """The key check from this process's cache, no round trip (app/tenants/cache.py); None: not cached."""
    hit = tenants_service.authenticate_cached(raw_key(credentials))
    if hit is None:
        return None
    tenant_id_var.set(hit[0].id)
    return Caller(*hit)


def bearer_credentials(authorization: str | None) -> HTTPAuthorizationCredentials | None:
    """What `bearer` (HTTPBearer, auto_error=False) makes of an Authorization header, for the bare routes
    that read their headers from the ASGI scope (app/predictions/hot.py)."""
    if not authorization:
        return None
    scheme, _, credentials = authorization.partition(" ")
    credentials = credentials.strip()
    if not scheme or not credentials or scheme.lower() != "bearer":
        return None
    # Already checked as HTTPBearer checks it: no second validation per request.
    return HTTPAuthorizationCredentials.model_construct(scheme=scheme, credentials=credentials)
