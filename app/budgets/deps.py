"""The tenant routes' caller: the key check (app/tenants/deps.py) and the caller's balance for the
budget headers (app/budgets/headers.py), read together."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials
from starlette.types import Scope

from app.budgets import balances
from app.budgets.headers import budget_headers, note_balance
from app.core.database import Reads, transaction
from app.core.logging import tenant_id_var
from app.deps import ReadSessionDep, RuntimeDep
from app.runtime import Runtime
from app.tenants import service as tenants_service
from app.tenants.deps import Caller, Credentials, cached_caller, raw_key


async def authenticate(
    session: Reads, credentials: HTTPAuthorizationCredentials | None, *, runtime: Runtime | None = None
) -> Caller:
    """The key check in the database, with the balance for the headers. With `runtime`, the answer
    fills this process's key cache (routes that take the cache first pass it)."""
    settings = runtime.settings if runtime is not None else None
    tenant, key, balance = await balances.authenticate_with_balance(
        session, raw_key(credentials), cache_ttl_s=settings.key_cache_ttl_s if settings else 0.0
    )
    if settings is not None:
        balances.BALANCES.put(tenant.id, balance, settings.balance_ttl_s)
    tenant_id_var.set(tenant.id)
    note_balance(balance)
    return Caller(tenant, key)


async def current_caller(runtime: RuntimeDep, credentials: Credentials) -> Caller:
    """For the submit (scope `generate`): the key check from the cache, else its own short transaction.
    The balance for the headers is the process's snapshot (at most balance_ttl_s old)."""
    caller = cached_caller(credentials)
    if caller is None:
        async with transaction(runtime.sessions, readonly=True) as session:
            caller = await authenticate(session, credentials, runtime=runtime)
        tenants_service.require_scope(caller.key, "generate")
        return caller
    tenants_service.require_scope(caller.key, "generate")
    balance = balances.BALANCES.get(caller.tenant.id)
    if balance is None:
        async with transaction(runtime.sessions, readonly=True) as session:
            balance = await balances.read_balance(session, caller.tenant)
        balances.BALANCES.put(caller.tenant.id, balance, runtime.settings.balance_ttl_s)
    # The snapshot itself, not a copy: this request's note_charge() then updates it for the next one.
    note_balance(balance)
    return caller


def reader_with(*scopes: str) -> Callable[..., Awaitable[Caller]]:
    """For routes that read: the key check shares the request's read transaction (one round trip less), and
    the key must carry one of `scopes` (SPEC §13)."""

    async def current_reader(session: ReadSessionDep, credentials: Credentials) -> Caller:
        caller = await authenticate(session, credentials)
        tenants_service.require_scope(caller.key, *scopes)
        return caller

    return current_reader


async def unnoted_headers(scope: Scope) -> list[tuple[bytes, bytes]]:
    """The budget headers for an answer that came before any route's key check (405, 413, a body that is
    not JSON, an unknown path): SPEC §2 wants them on every answer to a tenant key. The middleware asks
    only for such answers (app/core/middleware.py); a key that does not check out gets none."""
    token = ""
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            token = token.strip() if scheme.lower() == "bearer" else ""
    if not token.startswith(tenants_service.KEY_PREFIX):
        return []
    runtime: Runtime | None = getattr(scope["app"].state, "runtime", None)
    if runtime is None:
        return []
    hit = tenants_service.authenticate_cached(token)
    balance = balances.BALANCES.get(hit[0].id) if hit is not None else None
    if balance is None:
        async with transaction(runtime.sessions, readonly=True) as session:
            if hit is None:
                _tenant, _key, balance = await balances.authenticate_with_balance(
                    session, token, cache_ttl_s=runtime.settings.key_cache_ttl_s
                )
            else:
                balance = await balances.read_balance(session, hit[0])
    return budget_headers(balance)


CallerDep = Annotated[Caller, Depends(current_caller)]
ReaderDep = Annotated[Caller, Depends(reader_with("read"))]
QuoterDep = Annotated[Caller, Depends(reader_with("generate"))]
# A tenant's own deliveries: a read, and what a `manage` key looks after.
DeliveryReaderDep = Annotated[Caller, Depends(reader_with("read", "manage"))]
