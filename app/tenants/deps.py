"""Tenant authentication: `Authorization: Bearer vg_...`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.core.database import transaction
from app.core.deps import RuntimeDep
from app.core.errors import Unauthorized
from app.core.logging import tenant_id_var
from app.tenants import service as tenants_service
from app.tenants.models import ApiKey, Tenant

bearer = HTTPBearer(auto_error=False, scheme_name="TenantKey", description="A tenant API key, vg_...")


@dataclass(frozen=True)
class Caller:
    tenant: Tenant
    key: ApiKey


async def current_caller(
    runtime: RuntimeDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> Caller:
    if credentials is None:
        raise Unauthorized("Send your API key as 'Authorization: Bearer vg_...'.")
    async with transaction(runtime.sessions, readonly=True) as session:
        tenant, key = await tenants_service.authenticate(session, credentials.credentials)
    tenant_id_var.set(tenant.id)
    return Caller(tenant, key)


CallerDep = Annotated[Caller, Depends(current_caller)]
