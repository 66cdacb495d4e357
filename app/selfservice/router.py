"""A tenant serving itself with a `manage` key (SPEC §13): its webhook endpoint, secret, test ping, deliveries
and keys. Every change goes through the service functions the operator API uses, and is audited with the
actor `key:{prefix}`."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Path

from app.admin import service as admin_service
from app.audit import service as audit_service
from app.budgets.deps import authenticate
from app.budgets.headers import tenant_responses
from app.core import clock
from app.core.database import transaction
from app.core.errors import Conflict
from app.core.ids import new_id
from app.core.types import Line
from app.deps import ReadSessionDep, RuntimeDep, SessionDep
from app.tenants import service as tenants_service
from app.tenants.deps import Caller, Credentials
from app.tenants.models import ApiKey, Tenant
from app.tenants.schemas import (
    KeyCreate,
    KeyCreated,
    KeyList,
    KeyOut,
    TenantUpdate,
    WebhookEndpointUpdate,
    WebhookSecretRotated,
)
from app.webhooks import dispatcher
from app.webhooks import service as webhooks_service
from app.webhooks.schemas import DeliveryOut, WebhookEndpointOut, WebhookTestOut

router = APIRouter(prefix="/api/v1", tags=["self-service"], responses=tenant_responses())


class NoWebhookEndpoint(Conflict):
    code = "webhook_endpoint_missing"
    title = "No webhook endpoint is set"


async def _manager(session: SessionDep, credentials: Credentials) -> Caller:
    """The key check in the request's own transaction (the change and its audit row commit with it)."""
    caller = await authenticate(session, credentials)
    tenants_service.require_scope(caller.key, "manage")
    return caller


async def _read_manager(session: ReadSessionDep, credentials: Credentials) -> Caller:
    caller = await authenticate(session, credentials)
    tenants_service.require_scope(caller.key, "manage")
    return caller


Manager = Annotated[Caller, Depends(_manager)]
ReadManager = Annotated[Caller, Depends(_read_manager)]
KeyId = Annotated[Line, Path(alias="keyId", max_length=40)]
DeliveryId = Annotated[Line, Path(alias="deliveryId", max_length=40)]


def actor_of(key: ApiKey) -> str:
    return audit_service.target("key", key.prefix)


def _endpoint(tenant: Tenant) -> dict[str, Any]:
    return {
        "url": tenant.webhook_url,
        "eventsFilter": tenant.webhook_events_filter,
        "disabledAt": tenant.webhook_disabled_at,
    }


@router.get("/webhook-endpoint", response_model=WebhookEndpointOut, summary="Your webhook endpoint")
async def get_endpoint(session: ReadSessionDep, caller: ReadManager) -> dict[str, Any]:
    return _endpoint(await tenants_service.get_tenant(session, caller.tenant.id))


@router.patch("/webhook-endpoint", response_model=WebhookEndpointOut, summary="Change your webhook URL or event filter")
async def update_endpoint(
    session: SessionDep, runtime: RuntimeDep, caller: Manager, body: WebhookEndpointUpdate
) -> dict[str, Any]:
    given = body.model_fields_set
    changes: dict[str, Any] = {}
    if "url" in given:
        changes["webhook_url"] = body.url
    if "events_filter" in given:
        changes["webhook_events_filter"] = body.events_filter
    data = TenantUpdate.model_validate(changes)
    tenant = await admin_service.update_tenant(
        session, caller.tenant.id, data, runtime.settings, actor_of(caller.key), url_field="url"
    )
    return _endpoint(tenant)


@router.post(
    "/webhook-endpoint/rotate-secret",
    response_model=WebhookSecretRotated,
    summary="A new webhook secret (shown once); the previous one keeps signing during the grace period",
)
async def rotate_secret(session: SessionDep, runtime: RuntimeDep, caller: Manager) -> dict[str, Any]:
    tenant = await tenants_service.get_tenant(session, caller.tenant.id)
    tenant = await admin_service.rotate_webhook_secret(session, runtime.settings, tenant, actor_of(caller.key))
    return {
        "webhookSecret": tenant.webhook_secret,
        "previousSecretExpiresAt": tenant.webhook_secret_previous_expires_at,
    }


@router.post(
    "/webhook-endpoint/test",
    response_model=WebhookTestOut,
    summary="Send a signed webhook.test event to your endpoint now; the answer says what it answered",
)
async def test_endpoint(runtime: RuntimeDep, credentials: Credentials) -> dict[str, Any]:
    # The key check and the tenant's secrets in a short transaction of their own: no transaction stays open
    # while the receiver answers.
    async with transaction(runtime.sessions, readonly=True) as session:
        caller = await authenticate(session, credentials)
        tenants_service.require_scope(caller.key, "manage")
        tenant = await tenants_service.get_tenant(session, caller.tenant.id)
        url = webhooks_service.tenant_endpoint(tenant)
        secrets = tenants_service.active_webhook_secrets(tenant)
    if url is None:
        raise NoWebhookEndpoint("Set a webhook URL first (PATCH /api/v1/webhook-endpoint).")
    msg_id = new_id("msg")
    now = clock.now()
    payload = orjson.dumps(
        {"type": "webhook.test", "timestamp": clock.iso(now), "data": {"tenantId": tenant.id, "sentAt": clock.iso(now)}}
    ).decode()
    status, error, _retry_after, _latency = await dispatcher.post_signed(runtime, url, msg_id, payload, secrets)
    return {"delivered": status is not None and 200 <= status < 300, "status": status, "error": error}


@router.post(
    "/webhook-deliveries/{deliveryId}/redeliver",
    status_code=202,
    response_model=DeliveryOut,
    summary="Send one of your deliveries again (same webhook-id)",
)
async def redeliver(session: SessionDep, caller: Manager, delivery_id: DeliveryId) -> dict[str, Any]:
    delivery = await admin_service.redeliver(session, delivery_id, actor_of(caller.key), tenant_id=caller.tenant.id)
    return webhooks_service.present(delivery)


def _key_out(key: ApiKey) -> dict[str, Any]:
    return KeyOut.model_validate(key).model_dump(by_alias=True)


@router.get("/keys", response_model=KeyList, summary="Your tenant's API keys (prefixes, never the keys)")
async def list_keys(session: ReadSessionDep, caller: ReadManager) -> dict[str, Any]:
    tenant = await tenants_service.get_tenant(session, caller.tenant.id)
    return {"data": [_key_out(k) for k in await tenants_service.list_keys(session, tenant)]}


@router.post(
    "/keys",
    status_code=201,
    response_model=KeyCreated,
    summary="A new key for your tenant, never wider than the key making it (shown once)",
)
async def create_key(
    session: SessionDep, runtime: RuntimeDep, caller: Manager, body: KeyCreate | None = None
) -> dict[str, Any]:
    data = tenants_service.inherit_from(caller.key, body or KeyCreate())
    wider = tenants_service.wider_than(caller.key, data)
    if wider is not None:
        raise tenants_service.InsufficientScope(f"A key cannot make a wider one: {wider}.")
    tenant = await tenants_service.get_tenant(session, caller.tenant.id)
    key, raw = await admin_service.create_key(session, runtime.settings, tenant, data, actor_of(caller.key))
    return {
        "id": key.id,
        "key": raw,
        "prefix": key.prefix,
        "name": key.name,
        "scopes": key.scopes,
        "models": key.models,
        "budgetCents": key.budget_cents,
        "expiresAt": key.expires_at,
        "createdAt": key.created_at,
    }


@router.delete("/keys/{keyId}", response_model=KeyOut, summary="Revoke one of your tenant's keys (at once)")
async def revoke_key(session: SessionDep, caller: Manager, key_id: KeyId) -> dict[str, Any]:
    tenant = await tenants_service.get_tenant(session, caller.tenant.id)
    target = await tenants_service.get_key(session, tenant, key_id)
    # Revoking a key wider than oneself would let a narrow key take a wider one out of service.
    wider = tenants_service.wider_than(
        caller.key,
        KeyCreate(
            scopes=target.scopes,
            models=target.models,
            budget_cents=target.budget_cents,
            expires_at=target.expires_at,
        ),
    )
    if wider is not None:
        raise tenants_service.InsufficientScope(f"A key cannot revoke a wider one: {wider}.")
    return _key_out(await admin_service.revoke_key(session, tenant, key_id, actor_of(caller.key)))
