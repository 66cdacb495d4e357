"""The operator API, /admin/v1, behind VIDGATE_ADMIN_TOKEN."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request, Response

from app.admin import service as admin_service
from app.admin.deps import require_admin
from app.budgets import service as budgets_service
from app.budgets.schemas import UsageOut
from app.core.errors import InvalidRequest
from app.core.openapi import link, links
from app.core.responses import json_response
from app.core.types import Line
from app.deps import ReadSessionDep, RuntimeDep, SessionDep
from app.outputs import service as outputs_service
from app.outputs.schemas import PredictionOutputsOut
from app.tenants import service as tenants_service
from app.tenants.models import ApiKey, Tenant
from app.tenants.schemas import (
    KeyCreate,
    KeyCreated,
    KeyList,
    KeyOut,
    TenantCreate,
    TenantCreated,
    TenantList,
    TenantOut,
    TenantUpdate,
    WebhookSecretRotated,
)
from app.webhooks import router as webhooks_router
from app.webhooks import service as webhooks_service
from app.webhooks.schemas import DeliveryDetail, DeliveryList, DeliveryOut

router = APIRouter(prefix="/admin/v1", tags=["admin"], dependencies=[Depends(require_admin)])

TenantId = Annotated[Line, Path(alias="tenantId")]
_TENANT = "/admin/v1/tenants/{tenantId}"
_NEW_TENANT = "$response.body#/id"
_TENANT_LINKS = links(
    201,
    "The tenant, with its webhook secret (shown once)",
    GetTenant=link("GET", _TENANT, tenantId=_NEW_TENANT),
    UpdateTenant=link("PATCH", _TENANT, tenantId=_NEW_TENANT),
    DeleteTenant=link("DELETE", _TENANT, tenantId=_NEW_TENANT),
    TenantUsage=link("GET", _TENANT + "/usage", tenantId=_NEW_TENANT),
    CreateKey=link("POST", _TENANT + "/keys", tenantId=_NEW_TENANT),
    ListKeys=link("GET", _TENANT + "/keys", tenantId=_NEW_TENANT),
    RotateWebhookSecret=link("POST", _TENANT + "/webhook-secret/rotate", tenantId=_NEW_TENANT),
)
_KEY_LINKS = links(
    201,
    "The key (shown once)",
    RevokeKey=link("DELETE", _TENANT + "/keys/{keyId}", tenantId="$request.path.tenantId", keyId="$response.body#/id"),
)
DeliveryId = Annotated[Line, Path(alias="deliveryId")]


def _tenant_out(tenant: Tenant) -> dict[str, Any]:
    return TenantOut.model_validate(tenant).model_dump(by_alias=True)


def _key_out(key: ApiKey) -> dict[str, Any]:
    return KeyOut.model_validate(key).model_dump(by_alias=True)


@router.post("/tenants", status_code=201, response_model=TenantCreated, responses=_TENANT_LINKS)
async def create_tenant(session: SessionDep, runtime: RuntimeDep, body: TenantCreate) -> dict[str, Any]:
    tenant = await admin_service.create_tenant(session, runtime.settings, body)
    return {**_tenant_out(tenant), "webhookSecret": tenant.webhook_secret}


@router.get("/tenants", response_model=TenantList)
async def list_tenants(session: SessionDep) -> dict[str, Any]:
    return {"data": [_tenant_out(t) for t in await tenants_service.list_tenants(session)]}


@router.get("/tenants/{tenantId}", response_model=TenantOut)
async def get_tenant(session: SessionDep, tenant_id: TenantId) -> dict[str, Any]:
    return _tenant_out(await tenants_service.get_tenant(session, tenant_id))


@router.patch("/tenants/{tenantId}", response_model=TenantOut)
async def update_tenant(
    session: SessionDep, runtime: RuntimeDep, tenant_id: TenantId, body: TenantUpdate
) -> dict[str, Any]:
    return _tenant_out(await admin_service.update_tenant(session, tenant_id, body, runtime.settings))


@router.delete("/tenants/{tenantId}", status_code=204)
async def delete_tenant(session: SessionDep, tenant_id: TenantId) -> Response:
    await tenants_service.delete_tenant(session, await tenants_service.get_tenant(session, tenant_id))
    return Response(status_code=204)


@router.get(
    "/tenants/{tenantId}/usage", response_model=UsageOut, summary="A tenant's current period, as the tenant sees it"
)
async def tenant_usage(session: SessionDep, tenant_id: TenantId) -> dict[str, Any]:
    tenant = await tenants_service.get_tenant(session, tenant_id)
    return (await budgets_service.tenant_usage(session, tenant)).present()


@router.post("/tenants/{tenantId}/keys", status_code=201, response_model=KeyCreated, responses=_KEY_LINKS)
async def create_key(session: SessionDep, tenant_id: TenantId, body: KeyCreate | None = None) -> dict[str, Any]:
    tenant = await tenants_service.get_tenant(session, tenant_id)
    key, raw = await tenants_service.create_key(session, tenant, body or KeyCreate())
    return {
        "id": key.id,
        "key": raw,
        "prefix": key.prefix,
        "name": key.name,
        "budgetCents": key.budget_cents,
        "createdAt": key.created_at,
    }


@router.get("/tenants/{tenantId}/keys", response_model=KeyList)
async def list_keys(session: SessionDep, tenant_id: TenantId) -> dict[str, Any]:
    tenant = await tenants_service.get_tenant(session, tenant_id)
    return {"data": [_key_out(k) for k in await tenants_service.list_keys(session, tenant)]}


@router.delete("/tenants/{tenantId}/keys/{keyId}", response_model=KeyOut)
async def revoke_key(
    session: SessionDep, tenant_id: TenantId, key_id: Annotated[Line, Path(alias="keyId")]
) -> dict[str, Any]:
    tenant = await tenants_service.get_tenant(session, tenant_id)
    return _key_out(await tenants_service.revoke_key(session, tenant, key_id))


@router.post("/tenants/{tenantId}/webhook-secret/rotate", response_model=WebhookSecretRotated)
async def rotate_secret(session: SessionDep, runtime: RuntimeDep, tenant_id: TenantId) -> dict[str, Any]:
    tenant = await tenants_service.get_tenant(session, tenant_id)
    tenant = await tenants_service.rotate_webhook_secret(session, tenant, runtime.settings.webhook_secret_grace_s)
    return {
        "webhookSecret": tenant.webhook_secret,
        "previousSecretExpiresAt": tenant.webhook_secret_previous_expires_at,
    }


def _parse_moment(value: str | None, field: str, *, end: bool) -> datetime | None:
    if value is None:
        return None
    try:
        if len(value) == 10:
            day = date.fromisoformat(value)
            # A bare `to` date includes that whole day.
            return datetime.combine(day + timedelta(days=1 if end else 0), time(), UTC)
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        # In UTC here, where a year-1 moment with an offset overflows as a 422, not in the query.
        return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)
    except (ValueError, OverflowError) as exc:  # OverflowError: the day after 9999-12-31
        raise InvalidRequest(f"{field} must be a date (2026-11-01) or an ISO 8601 timestamp.", field=field) from exc


@router.get("/usage", summary="Spending from the ledger, grouped by tenant, model, provider or day; JSON or CSV")
async def usage_report(
    session: SessionDep,
    request: Request,
    from_: Annotated[Line | None, Query(alias="from", max_length=40)] = None,
    to: Annotated[Line | None, Query(max_length=40)] = None,
    group_by: Annotated[str, Query(alias="groupBy", pattern="^(tenant|model|provider|day)$")] = "tenant",
    format: Annotated[str | None, Query(pattern="^(json|csv)$")] = None,
) -> Response:
    start = _parse_moment(from_, "from", end=False)
    end = _parse_moment(to, "to", end=True)
    rows = await admin_service.usage_rows(session, start, end, group_by)
    wants_csv = format == "csv" or (format is None and "text/csv" in request.headers.get("accept", ""))
    if wants_csv:
        return Response(budgets_service.usage_csv(rows, group_by), media_type="text/csv")
    return json_response({"groupBy": group_by, "from": from_, "to": to, "data": rows})


@router.get("/ledger/verify", summary="Recompute every balance from the ledger")
async def verify_ledger(session: SessionDep) -> Response:
    mismatches = await budgets_service.verify_ledger(session)
    return json_response({"ok": not mismatches, "mismatches": [m.__dict__ for m in mismatches]})


@router.get("/webhook-deliveries", response_model=DeliveryList)
async def list_deliveries(
    session: SessionDep,
    status: webhooks_router.StatusQuery = None,
    tenant: Annotated[Line | None, Query(max_length=40)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 50,
    cursor: Annotated[Line | None, Query(max_length=64)] = None,
) -> dict[str, Any]:
    rows, next_cursor = await webhooks_service.list_deliveries(
        session, tenant_id=tenant, status=status, limit=limit, cursor=cursor
    )
    return {"data": [webhooks_service.present(d) for d in rows], "nextCursor": next_cursor}


@router.get("/webhook-deliveries/{deliveryId}", response_model=DeliveryDetail)
async def get_delivery(session: SessionDep, delivery_id: DeliveryId) -> dict[str, Any]:
    return await webhooks_router.detail(session, delivery_id, None)


@router.post("/webhook-deliveries/{deliveryId}/redeliver", status_code=202, response_model=DeliveryOut)
async def redeliver(session: SessionDep, delivery_id: DeliveryId) -> dict[str, Any]:
    delivery = await webhooks_service.get_delivery(session, delivery_id)
    return webhooks_service.present(await webhooks_service.redeliver(session, delivery))


@router.get(
    "/predictions/{predictionId}/outputs",
    response_model=PredictionOutputsOut,
    summary="A prediction's rehosted outputs: the vendor's original URLs and what is stored",
)
async def prediction_outputs(
    session: ReadSessionDep, prediction_id: Annotated[str, Path(alias="predictionId", max_length=40)]
) -> Response:
    view = await outputs_service.operator_view(session, prediction_id)
    return json_response(view.model_dump(mode="json", by_alias=True))
