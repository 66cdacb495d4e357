"""Tenants, their API keys and webhook secrets. Functions flush; the caller's transaction commits."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Sequence
from datetime import timedelta
from functools import cache
from typing import Any

from sqlalchemy import Row, bindparam, inspect, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.core import clock
from app.core.database import Base, table_of
from app.core.errors import AppError, InvalidRequest, NotFound, Unauthorized
from app.core.ids import new_id
from app.tenants import last_used
from app.tenants.cache import CACHE, note_tenant_changed
from app.tenants.models import ApiKey, Tenant
from app.tenants.schemas import DEFAULT_SCOPES, KeyCreate, TenantCreate, TenantUpdate

KEY_PREFIX = "vg_"


class TenantNotFound(NotFound):
    code = "tenant_not_found"
    title = "No such tenant"


class KeyNotFound(NotFound):
    code = "key_not_found"
    title = "No such API key"


class KeyExpired(Unauthorized):
    code = "api_key_expired"
    title = "The API key has expired"


class InsufficientScope(AppError):
    status = 403
    code = "insufficient_scope"
    title = "The API key may not do this"


class ModelNotAllowed(AppError):
    status = 403
    code = "model_not_allowed"
    title = "The API key may not use this model"


SCOPE_ORDER = ("generate", "read", "manage")


def require_scope(key: ApiKey, *scopes: str) -> None:
    """The key carries one of `scopes` (in memory: the key came from the cache or the key check's row)."""
    held = key.scopes
    for scope in scopes:
        if scope in held:
            return
    raise InsufficientScope(
        f"This API key lacks the {' or '.join(repr(s) for s in scopes)} scope; ask for a key that has it.",
        requiredScope=scopes[0],
        scopes=list(held),
    )


def require_model(key: ApiKey, model_id: str) -> None:
    if key.models is not None and model_id not in key.models:
        raise ModelNotAllowed(
            f"This API key may use only {', '.join(key.models)}; not {model_id!r}.", modelId=model_id, models=key.models
        )


def wider_than(maker: ApiKey, data: KeyCreate) -> str | None:
    """What of a key a key asks for is wider than the maker itself (None: nothing). A key made by a key
    inherits, where it names none, its maker's models, budget and expiry (`inherit_from` fills them)."""
    scopes = data.scopes if data.scopes is not None else DEFAULT_SCOPES
    extra = [s for s in scopes if s not in maker.scopes]
    if extra:
        return f"scopes {extra} are not this key's own ({maker.scopes})"
    if maker.models is not None and (data.models is None or not set(data.models) <= set(maker.models)):
        return f"models must be within this key's own ({maker.models})"
    if maker.budget_cents is not None and (data.budget_cents is None or data.budget_cents > maker.budget_cents):
        return f"budgetCents must be at most this key's own ({maker.budget_cents})"
    if maker.expires_at is not None and (data.expires_at is None or data.expires_at > maker.expires_at):
        return f"expiresAt must be no later than this key's own ({clock.iso(maker.expires_at)})"
    return None


def inherit_from(maker: ApiKey, data: KeyCreate) -> KeyCreate:
    given = data.model_fields_set
    return data.model_copy(
        update={
            "models": data.models if "models" in given else maker.models,
            "budget_cents": data.budget_cents if "budget_cents" in given else maker.budget_cents,
            "expires_at": data.expires_at if "expires_at" in given else maker.expires_at,
        }
    )


def hash_key(raw_key: str) -> str:
    return hashlib.sha256(raw_key.encode()).hexdigest()


def new_webhook_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


async def create_tenant(session: AsyncSession, data: TenantCreate) -> Tenant:
    tenant = Tenant(
        id=new_id("ten"),
        name=data.name,
        budget_cents=data.budget_cents,
        budget_period=data.budget_period,
        max_concurrent=data.max_concurrent,
        rate_per_minute=data.rate_per_minute,
        webhook_url=data.webhook_url,
        output_retention_days=data.output_retention_days,
        queue_weight=data.queue_weight,
        max_queued=data.max_queued,
        webhook_secret=new_webhook_secret(),
        in_flight=0,
        created_at=clock.now(),
    )
    session.add(tenant)
    await session.flush()
    return tenant


async def get_tenant(session: AsyncSession, tenant_id: str) -> Tenant:
    tenant = await session.get(Tenant, tenant_id)
    if tenant is None or tenant.deleted_at is not None:
        raise TenantNotFound(f"There is no tenant {tenant_id!r}.")
    return tenant


async def find_tenant_by_name(session: AsyncSession, name: str) -> Tenant | None:
    return await session.scalar(
        select(Tenant).where(Tenant.name == name, Tenant.deleted_at.is_(None)).order_by(Tenant.id).limit(1)
    )


async def has_tenants_besides(session: AsyncSession, name: str) -> bool:
    """Whether any tenant (deleted ones too) is named other than `name`."""
    return await session.scalar(select(Tenant.id).where(Tenant.name != name).limit(1)) is not None


async def list_tenants(session: AsyncSession) -> list[Tenant]:
    rows = await session.scalars(select(Tenant).where(Tenant.deleted_at.is_(None)).order_by(Tenant.id))
    return list(rows)


async def update_tenant(session: AsyncSession, tenant: Tenant, data: TenantUpdate) -> Tenant:
    changes = data.model_dump(exclude_unset=True)
    for field, value in changes.items():
        if field in ("name", "budget_period", "queue_weight", "max_queued") and value is None:
            continue
        if field == "webhook_events_filter" and value is not None:
            value = sorted(set(value))
        setattr(tenant, field, value)
    if "webhook_url" in changes:
        # Setting the URL again is how an operator re-enables an endpoint that answered 410 Gone.
        tenant.webhook_disabled_at = None
    await session.flush()
    await note_tenant_changed(session, tenant.id)
    return tenant


async def delete_tenant(session: AsyncSession, tenant: Tenant) -> None:
    """Soft delete: the ledger and predictions stay for accounting; every key stops working."""
    now = clock.now()
    tenant.deleted_at = now
    await session.execute(
        update(ApiKey).where(ApiKey.tenant_id == tenant.id, ApiKey.revoked_at.is_(None)).values(revoked_at=now)
    )
    await session.flush()
    await note_tenant_changed(session, tenant.id)


def check_key_fields(data: KeyCreate, allowed_models: list[str]) -> None:
    """What pydantic cannot know: the models the gateway allows and the clock."""
    for model in data.models or ():
        if model not in allowed_models:
            raise InvalidRequest(
                f"models: {model!r} is not a model this gateway allows ({', '.join(allowed_models)}).", field="models"
            )
    if data.expires_at is not None and data.expires_at <= clock.now():
        raise InvalidRequest("expiresAt: must be in the future.", field="expiresAt")


async def create_key(session: AsyncSession, tenant: Tenant, data: KeyCreate) -> tuple[ApiKey, str]:
    raw = KEY_PREFIX + secrets.token_urlsafe(24)  # 192 bits
    scopes = data.scopes if data.scopes is not None else DEFAULT_SCOPES
    key = ApiKey(
        id=new_id("key"),
        tenant_id=tenant.id,
        name=data.name,
        prefix=raw[:11],
        key_hash=hash_key(raw),
        budget_cents=data.budget_cents,
        scopes=[s for s in SCOPE_ORDER if s in scopes],
        models=sorted(set(data.models)) if data.models is not None else None,
        expires_at=data.expires_at,
        created_at=clock.now(),
    )
    session.add(key)
    await session.flush()
    return key, raw


async def list_keys(session: AsyncSession, tenant: Tenant) -> list[ApiKey]:
    rows = await session.scalars(select(ApiKey).where(ApiKey.tenant_id == tenant.id).order_by(ApiKey.id))
    return list(rows)


async def get_key(session: AsyncSession, tenant: Tenant, key_id: str) -> ApiKey:
    key = await session.get(ApiKey, key_id)
    if key is None or key.tenant_id != tenant.id:
        raise KeyNotFound(f"Tenant {tenant.id!r} has no key {key_id!r}.")
    return key


async def revoke_key(session: AsyncSession, tenant: Tenant, key_id: str) -> ApiKey:
    key = await get_key(session, tenant, key_id)
    if key.revoked_at is None:
        key.revoked_at = clock.now()
        await session.flush()
        await note_tenant_changed(session, tenant.id)
    return key


# Built once: the key check runs on every request, and a statement built per call costs more CPU than
# the database spends answering it. Plain columns, then transient objects: no identity map to fill.
_TENANT_COLUMNS = list(table_of(Tenant).c)
_KEY_COLUMNS = list(table_of(ApiKey).c)
# The key check's query, by the key's digest (`digest`): the key's columns, then its tenant's. A caller may
# add columns after them and joins (app/budgets/balances.py adds the tenant's balance).
KEY_LOOKUP = (
    select(*_KEY_COLUMNS, *_TENANT_COLUMNS)
    .join_from(table_of(ApiKey), table_of(Tenant), table_of(Tenant).c.id == table_of(ApiKey).c.tenant_id)
    .where(table_of(ApiKey).c.key_hash == bindparam("digest"))
)


@cache
def _attribute_names(model: type[Base]) -> list[str]:
    mapper = inspect(model)
    return [mapper.get_property_by_column(c).key for c in table_of(model).c]


def _detached(model: type[Tenant] | type[ApiKey], values: Sequence[Any]) -> Any:
    return model(**dict(zip(_attribute_names(model), values, strict=True)))


def key_digest(raw_key: str) -> str:
    if not raw_key.startswith(KEY_PREFIX):
        raise Unauthorized("API keys start with 'vg_'. Send 'Authorization: Bearer vg_...'.")
    return hash_key(raw_key)


def caller_of(row: Row[Any] | None, digest: str, *, cache_ttl_s: float = 0.0) -> tuple[Tenant, ApiKey]:
    """The tenant and key of a KEY_LOOKUP row, as objects outside the session (read them, never change
    them); Unauthorized if there is none or it no longer works. With `cache_ttl_s`, a valid key is kept
    in the cache that long."""
    # The lookup is by hash, so timing reveals nothing about the key; compare anyway to be explicit.
    if row is None or not hmac.compare_digest(row.key_hash, digest):
        raise Unauthorized("This API key is unknown. Ask your operator for a key.")
    split = len(_KEY_COLUMNS)
    key: ApiKey = _detached(ApiKey, row[:split])
    tenant: Tenant = _detached(Tenant, row[split : split + len(_TENANT_COLUMNS)])
    if key.revoked_at is not None or tenant.deleted_at is not None:
        raise Unauthorized("This API key was revoked. Ask your operator for a new one.")
    CACHE.put(digest, tenant, key, cache_ttl_s)
    check_expiry(key)
    last_used.note(key.id)
    return tenant, key


def check_expiry(key: ApiKey) -> None:
    # Against the clock on every request, cached or not: an expiry needs no notification to any replica.
    expires = key.expires_at
    if expires is not None and expires <= clock.now():
        raise KeyExpired(
            f"This API key expired at {clock.iso(expires)}. Ask for a new one.", expiredAt=clock.iso(expires)
        )


async def authenticate(session: AsyncSession, raw_key: str) -> tuple[Tenant, ApiKey]:
    """The caller's tenant and key, as objects outside the session: read them, never change them."""
    digest = key_digest(raw_key)
    return caller_of((await session.execute(KEY_LOOKUP, {"digest": digest})).first(), digest)


def authenticate_cached(raw_key: str) -> tuple[Tenant, ApiKey] | None:
    """The key check from this process's cache (app/tenants/cache.py); None: ask the database."""
    hit = CACHE.get(key_digest(raw_key))
    if hit is not None:
        check_expiry(hit[1])
        last_used.note(hit[1].id)
    return hit


async def rotate_webhook_secret(session: AsyncSession, tenant: Tenant, grace_s: float) -> Tenant:
    now = clock.now()
    tenant.webhook_secret_previous = tenant.webhook_secret
    tenant.webhook_secret_previous_expires_at = now + timedelta(seconds=grace_s)
    tenant.webhook_secret = new_webhook_secret()
    await session.flush()
    await note_tenant_changed(session, tenant.id)
    return tenant


def active_webhook_secrets(tenant: Tenant) -> list[str]:
    secrets_ = [tenant.webhook_secret]
    expires = tenant.webhook_secret_previous_expires_at
    if tenant.webhook_secret_previous and expires is not None and expires > clock.now():
        secrets_.append(tenant.webhook_secret_previous)
    return secrets_
