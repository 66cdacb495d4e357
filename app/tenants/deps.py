"""Tenant authentication: `Authorization: Bearer vg_...`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncSession

from app.budgets.headers import note_balance
from app.core.database import transaction
from app.core.errors import Unauthorized
from app.core.logging import tenant_id_var
from app.deps import ReadSessionDep, RuntimeDep
from app.tenants import service as tenants_service
from app.tenants.models import ApiKey, Tenant

bearer = HTTPBearer(auto_error=False, scheme_name="TenantKey", description="A tenant API key, vg_...")


@dataclass(frozen=True)
class Caller:
    tenant: Tenant
    key: ApiKey


Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


async def authenticate(session: AsyncSession, credentials: HTTPAuthorizationCredentials | None) -> Caller:
    if credentials is None:
        raise Unauthorized("Send your API key as 'Authorization: Bearer vg_...'.")
    tenant, key, balance = await tenants_service.authenticate_with_balance(session, credentials.credentials)
    tenant_id_var.set(tenant.id)
    note_balance(balance)
    return Caller(tenant, key)


async def current_caller(runtime: RuntimeDep, credentials: Credentials) -> Caller:
    """For routes that do slow work (submit): the key check is its own short transaction."""
    async with transaction(runtime.sessions, readonly=True) as session:
        return await authenticate(session, credentials)


async def current_reader(session: ReadSessionDep, credentials: Credentials) -> Caller:
    """For read routes: the key check shares the request's read transaction (one round trip less)."""
    return await authenticate(session, credentials)


CallerDep = Annotated[Caller, Depends(current_caller)]
ReaderDep = Annotated[Caller, Depends(current_reader)]
