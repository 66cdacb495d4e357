"""Tenant authentication: `Authorization: Bearer vg_...`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.budgets.headers import note_balance
from app.core.database import Reads, transaction
from app.core.errors import Unauthorized
from app.core.logging import tenant_id_var
from app.deps import ReadSessionDep, RuntimeDep
from app.runtime import Runtime
from app.tenants import service as tenants_service
from app.tenants.cache import CACHE
from app.tenants.models import ApiKey, Tenant

bearer = HTTPBearer(auto_error=False, scheme_name="TenantKey", description="A tenant API key, vg_...")


@dataclass(frozen=True)
class Caller:
    tenant: Tenant
    key: ApiKey


Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def _raw_key(credentials: HTTPAuthorizationCredentials | None) -> str:
    if credentials is None:
        raise Unauthorized("Send your API key as 'Authorization: Bearer vg_...'.")
    return credentials.credentials


async def authenticate(
    session: Reads, credentials: HTTPAuthorizationCredentials | None, *, runtime: Runtime | None = None
) -> Caller:
    """The key check in the database, with the balance for the headers. With `runtime`, the answer
    fills this process's key cache (routes that take the cache first pass it)."""
    settings = runtime.settings if runtime is not None else None
    tenant, key, balance = await tenants_service.authenticate_with_balance(
        session, _raw_key(credentials), cache_ttl_s=settings.key_cache_ttl_s if settings else 0.0
    )
    if settings is not None:
        CACHE.put_balance(tenant.id, balance, settings.balance_ttl_s)
    tenant_id_var.set(tenant.id)
    note_balance(balance)
    return Caller(tenant, key)


def cached_caller(credentials: HTTPAuthorizationCredentials | None) -> Caller | None:
    """The key check from this process's cache, no round trip (app/tenants/cache.py); None: not cached."""
    hit = tenants_service.authenticate_cached(_raw_key(credentials))
    if hit is None:
        return None
    tenant_id_var.set(hit[0].id)
    return Caller(*hit)


async def current_caller(runtime: RuntimeDep, credentials: Credentials) -> Caller:
    """For routes that do slow work (submit): the key check from the cache, else its own short
    transaction. The balance for the headers is the process's snapshot (at most balance_ttl_s old)."""
    caller = cached_caller(credentials)
    if caller is None:
        async with transaction(runtime.sessions, readonly=True) as session:
            return await authenticate(session, credentials, runtime=runtime)
    balance = CACHE.balance(caller.tenant.id)
    if balance is None:
        async with transaction(runtime.sessions, readonly=True) as session:
            balance = await tenants_service.read_balance(session, caller.tenant)
        CACHE.put_balance(caller.tenant.id, balance, runtime.settings.balance_ttl_s)
    # The snapshot itself, not a copy: this request's note_charge() then updates it for the next one.
    note_balance(balance)
    return caller


async def current_reader(session: ReadSessionDep, credentials: Credentials) -> Caller:
    """For read routes: the key check shares the request's read transaction (one round trip less)."""
    return await authenticate(session, credentials)


CallerDep = Annotated[Caller, Depends(current_caller)]
ReaderDep = Annotated[Caller, Depends(current_reader)]
