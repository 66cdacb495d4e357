"""Operator actions that span domains, shared by the operator API, the CLI, the dashboard and a tenant's
own API (SPEC §13). Each change writes its audit row in the same transaction, naming `actor`."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from app.audit import service as audit_service
from app.budgets import service as budgets_service
from app.core.settings import Settings
from app.outputs import service as outputs_service
from app.predictions import service as predictions_service
from app.tenants import service as tenants_service
from app.tenants.models import ApiKey, Tenant
from app.tenants.schemas import KeyCreate, KeyOut, TenantCreate, TenantOut, TenantUpdate
from app.webhooks import service as webhooks_service
from app.webhooks.models import WebhookDelivery


def tenant_view(tenant: Tenant) -> dict[str, Any]:
    """The tenant as the audit log keeps it: its settings, never its webhook secret."""
    return TenantOut.model_validate(tenant).model_dump(mode="json", by_alias=True)


def key_view(key: ApiKey) -> dict[str, Any]:
    """A key as the audit log keeps it: its prefix, never the key or its hash."""
    view = KeyOut.model_validate(key).model_dump(mode="json", by_alias=True, exclude={"last_used_at"})
    view["tenantId"] = key.tenant_id
    return view


async def create_tenant(session: AsyncSession, settings: Settings, data: TenantCreate, actor: str) -> Tenant:
    webhooks_service.check_webhook_url(settings, data.webhook_url, "webhookUrl")
    tenant = await tenants_service.create_tenant(session, data)
    await audit_service.record(
        session, actor, "tenant.create", audit_service.target("tenant", tenant.id), None, tenant_view(tenant)
    )
    return tenant


async def update_tenant(
    session: AsyncSession,
    tenant_id: str,
    data: TenantUpdate,
    settings: Settings,
    actor: str,
    *,
    url_field: str = "webhookUrl",
) -> Tenant:
    webhooks_service.check_webhook_url(settings, data.webhook_url, url_field)
    tenant = await tenants_service.get_tenant(session, tenant_id)
    before = tenant_view(tenant)
    was_counting = tenant.max_concurrent is not None
    tenant = await tenants_service.update_tenant(session, tenant, data)
    if tenant.max_concurrent is not None and not was_counting:
        await predictions_service.start_counting_slots(session, tenant)
    await audit_service.record(
        session, actor, "tenant.update", audit_service.target("tenant", tenant.id), before, tenant_view(tenant)
    )
    return tenant


async def delete_tenant(session: AsyncSession, tenant_id: str, actor: str) -> None:
    tenant = await tenants_service.get_tenant(session, tenant_id)
    before = tenant_view(tenant)
    await tenants_service.delete_tenant(session, tenant)
    await audit_service.record(session, actor, "tenant.delete", audit_service.target("tenant", tenant.id), before, None)


async def create_key(
    session: AsyncSession, settings: Settings, tenant: Tenant, data: KeyCreate, actor: str
) -> tuple[ApiKey, str]:
    tenants_service.check_key_fields(data, settings.allowed_models)
    key, raw = await tenants_service.create_key(session, tenant, data)
    await audit_service.record(session, actor, "key.create", audit_service.target("key", key.id), None, key_view(key))
    return key, raw


async def revoke_key(session: AsyncSession, tenant: Tenant, key_id: str, actor: str) -> ApiKey:
    key = await tenants_service.get_key(session, tenant, key_id)
    if key.revoked_at is not None:
        return key
    before = key_view(key)
    key = await tenants_service.revoke_key(session, tenant, key_id)
    await audit_service.record(session, actor, "key.revoke", audit_service.target("key", key.id), before, key_view(key))
    return key


async def rotate_webhook_secret(session: AsyncSession, settings: Settings, tenant: Tenant, actor: str) -> Tenant:
    before = {"previousSecretExpiresAt": tenant.webhook_secret_previous_expires_at}
    tenant = await tenants_service.rotate_webhook_secret(session, tenant, settings.webhook_secret_grace_s)
    after = {"previousSecretExpiresAt": tenant.webhook_secret_previous_expires_at}
    await audit_service.record(
        session, actor, "webhook_secret.rotate", audit_service.target("tenant", tenant.id), before, after
    )
    return tenant


async def redeliver(
    session: AsyncSession, delivery_id: str, actor: str, tenant_id: str | None = None
) -> WebhookDelivery:
    delivery = await webhooks_service.get_delivery(session, delivery_id, tenant_id)
    before = {"status": delivery.status, "attempts": delivery.attempts}
    delivery = await webhooks_service.redeliver(session, delivery)
    after = {"status": delivery.status, "attempts": delivery.attempts}
    await audit_service.record(
        session,
        actor,
        "webhook_delivery.redeliver",
        audit_service.target("webhook_delivery", delivery.id),
        before,
        after,
    )
    return delivery


async def usage_rows(
    session: AsyncSession, start: datetime | None, end: datetime | None, group_by: str
) -> list[dict[str, Any]]:
    """The operator's usage report (API, CLI, dashboard CSV): spend from the ledger and, per tenant, the
    bytes held in the output store now (storage is a level, not a flow over the period)."""
    rows = await budgets_service.usage_report(session, start, end, group_by)
    if group_by == "tenant":
        stored = await outputs_service.stored_bytes_by_tenant(session)
        known = {row["tenant"] for row in rows}
        rows += [{"tenant": t, "spentCents": 0, "predictions": 0} for t in sorted(stored) if t not in known]
        for row in rows:
            row["storedBytes"] = stored.get(row["tenant"], 0)
    return rows
