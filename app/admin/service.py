"""Operator actions that span domains, shared by the operator API, the CLI and the dashboard."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from app.core.settings import Settings
from app.predictions import service as predictions_service
from app.tenants import service as tenants_service
from app.tenants.models import Tenant
from app.tenants.schemas import TenantCreate, TenantUpdate
from app.webhooks import service as webhooks_service


async def create_tenant(session: AsyncSession, settings: Settings, data: TenantCreate) -> Tenant:
    webhooks_service.check_webhook_url(settings, data.webhook_url, "webhookUrl")
    return await tenants_service.create_tenant(session, data)


async def update_tenant(session: AsyncSession, tenant_id: str, data: TenantUpdate, settings: Settings) -> Tenant:
    webhooks_service.check_webhook_url(settings, data.webhook_url, "webhookUrl")
    tenant = await tenants_service.get_tenant(session, tenant_id)
    was_counting = tenant.max_concurrent is not None
    tenant = await tenants_service.update_tenant(session, tenant, data)
    if tenant.max_concurrent is not None and not was_counting:
        await predictions_service.start_counting_slots(session, tenant)
    return tenant
