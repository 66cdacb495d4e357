"""Operator actions that span domains, shared by the operator API and the CLI."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from app.predictions import service as predictions_service
from app.tenants import service as tenants_service
from app.tenants.models import Tenant
from app.tenants.schemas import TenantUpdate


async def update_tenant(session: AsyncSession, tenant_id: str, data: TenantUpdate) -> Tenant:
    tenant = await tenants_service.get_tenant(session, tenant_id)
    was_counting = tenant.max_concurrent is not None
    tenant = await tenants_service.update_tenant(session, tenant, data)
    if tenant.max_concurrent is not None and not was_counting:
        await predictions_service.start_counting_slots(session, tenant)
    return tenant
