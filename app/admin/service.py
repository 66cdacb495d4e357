"""Operator actions that span domains, shared by the operator API, the CLI and the dashboard."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from app.budgets import service as budgets_service
from app.core.settings import Settings
from app.outputs import service as outputs_service
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
