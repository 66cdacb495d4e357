"""The operator API, /admin/v1, behind VIDGATE_ADMIN_TOKEN or an operator token (a viewer's only reads).

Every route names the `vidgate` command that does the same (`x-cli` in the OpenAPI document): the CLI is
complete when each has one (tests/test_cli_parity.py)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request, Response

from app.admin import service as admin_service
from app.admin.deps import OperatorDep, require_admin
from app.audit import service as audit_service
from app.audit.schemas import AuditList
from app.budgets import service as budgets_service
from app.budgets.schemas import UsageOut
from app.core.openapi import link, links
from app.core.responses import json_response
from app.core.types import Line, moment_bound
from app.deps import ReadSessionDep, RuntimeDep, SessionDep
from app.operators import service as operators_service
from app.operators.schemas import OperatorTokenCreate, OperatorTokenCreated, OperatorTokenList, OperatorTokenOut
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


def cli(command: str) -> dict[str, Any]:
    """The `vidgate` command that does what this route does."""
    return {"x-cli": command}


def _tenant_out(tenant: Tenant) -> dict[str, Any]:
    return TenantOut.model_validate(tenant).model_dump(by_alias=True)


def _key_out(key: ApiKey) -> dict[str, Any]:
    return KeyOut.model_validate(key).model_dump(by_alias=True)


@router.post(
    "/tenants",
    status_code=201,
    response_model=TenantCreated,
    responses=_TENANT_LINKS,
    openapi_extra=cli("tenants create"),
)
async def create_tenant(
    session: SessionDep, runtime: RuntimeDep, op: OperatorDep, body: TenantCreate
) -> dict[str, Any]:
    tenant = await admin_service.create_tenant(session, runtime.settings, body, op.actor)
    return {**_tenant_out(tenant), "webhookSecret": tenant.webhook_secret}


@router.get("/tenants", response_model=TenantList, openapi_extra=cli("tenants list"))
async def list_tenants(session: SessionDep) -> dict[str, Any]:
    return {"data": [_tenant_out(t) for t in await tenants_service.list_tenants(session)]}


@router.get("/tenants/{tenantId}", response_model=TenantOut, openapi_extra=cli("tenants show"))
async def get_tenant(session: SessionDep, tenant_id: TenantId) -> dict[str, Any]:
    return _tenant_out(await tenants_service.get_tenant(session, tenant_id))


@router.patch("/tenants/{tenantId}", response_model=TenantOut, openapi_extra=cli("tenants update"))
async def update_tenant(
    session: SessionDep, runtime: RuntimeDep, op: OperatorDep, tenant_id: TenantId, body: TenantUpdate
) -> dict[str, Any]:
    return _tenant_out(await admin_service.update_tenant(session, tenant_id, body, runtime.settings, op.actor))


@router.delete("/tenants/{tenantId}", status_code=204, openapi_extra=cli("tenants delete"))
async def delete_tenant(session: SessionDep, op: OperatorDep, tenant_id: TenantId) -> Response:
    await admin_service.delete_tenant(session, tenant_id, op.actor)
    return Response(status_code=204)


@router.get(
    "/tenants/{tenantId}/usage",
    response_model=UsageOut,
    summary="A tenant's current period, as the tenant sees it",
    openapi_extra=cli("tenants usage"),
)
async def tenant_usage(session: SessionDep, tenant_id: TenantId) -> dict[str, Any]:
    tenant = await tenants_service.get_tenant(session, tenant_id)
    return (await budgets_service.tenant_usage(session, tenant)).present()


def key_created(key: ApiKey, raw: str) -> dict[str, Any]:
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


@router.post(
    "/tenants/{tenantId}/keys",
    status_code=201,
    response_model=KeyCreated,
    responses=_KEY_LINKS,
    openapi_extra=cli("keys create"),
)
async def create_key(
    session: SessionDep, runtime: RuntimeDep, op: OperatorDep, tenant_id: TenantId, body: KeyCreate | None = None
) -> dict[str, Any]:
    tenant = await tenants_service.get_tenant(session, tenant_id)
    key, raw = await admin_service.create_key(session, runtime.settings, tenant, body or KeyCreate(), op.actor)
    return key_created(key, raw)


@router.get("/tenants/{tenantId}/keys", response_model=KeyList, openapi_extra=cli("keys list"))
async def list_keys(session: SessionDep, tenant_id: TenantId) -> dict[str, Any]:
    tenant = await tenants_service.get_tenant(session, tenant_id)
    return {"data": [_key_out(k) for k in await tenants_service.list_keys(session, tenant)]}


@router.delete("/tenants/{tenantId}/keys/{keyId}", response_model=KeyOut, openapi_extra=cli("keys revoke"))
async def revoke_key(
    session: SessionDep, op: OperatorDep, tenant_id: TenantId, key_id: Annotated[Line, Path(alias="keyId")]
) -> dict[str, Any]:
    tenant = await tenants_service.get_tenant(session, tenant_id)
    return _key_out(await admin_service.revoke_key(session, tenant, key_id, op.actor))


@router.post(
    "/tenants/{tenantId}/webhook-secret/rotate",
    response_model=WebhookSecretRotated,
    openapi_extra=cli("webhook-secret rotate"),
)
async def rotate_secret(
    session: SessionDep, runtime: RuntimeDep, op: OperatorDep, tenant_id: TenantId
) -> dict[str, Any]:
    tenant = await tenants_service.get_tenant(session, tenant_id)
    tenant = await admin_service.rotate_webhook_secret(session, runtime.settings, tenant, op.actor)
    return {
        "webhookSecret": tenant.webhook_secret,
        "previousSecretExpiresAt": tenant.webhook_secret_previous_expires_at,
    }


@router.get(
    "/usage",
    summary="Spending from the ledger, grouped by tenant, model, provider or day; JSON or CSV",
    openapi_extra=cli("usage"),
)
async def usage_report(
    session: SessionDep,
    request: Request,
    from_: Annotated[Line | None, Query(alias="from", max_length=40)] = None,
    to: Annotated[Line | None, Query(max_length=40)] = None,
    group_by: Annotated[str, Query(alias="groupBy", pattern="^(tenant|model|provider|day)$")] = "tenant",
    format: Annotated[str | None, Query(pattern="^(json|csv)$")] = None,
) -> Response:
    start = moment_bound(from_, "from", end=False)
    end = moment_bound(to, "to", end=True)
    rows = await admin_service.usage_rows(session, start, end, group_by)
    wants_csv = format == "csv" or (format is None and "text/csv" in request.headers.get("accept", ""))
    if wants_csv:
        return Response(budgets_service.usage_csv(rows, group_by), media_type="text/csv")
    return json_response({"groupBy": group_by, "from": from_, "to": to, "data": rows})


@router.get("/ledger/verify", summary="Recompute every balance from the ledger", openapi_extra=cli("ledger verify"))
async def verify_ledger(session: SessionDep) -> Response:
    mismatches = await budgets_service.verify_ledger(session)
    return json_response({"ok": not mismatches, "mismatches": [m.__dict__ for m in mismatches]})


@router.get("/webhook-deliveries", response_model=DeliveryList, openapi_extra=cli("deliveries list"))
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


@router.get("/webhook-deliveries/{deliveryId}", response_model=DeliveryDetail, openapi_extra=cli("deliveries show"))
async def get_delivery(session: SessionDep, delivery_id: DeliveryId) -> dict[str, Any]:
    return await webhooks_router.detail(session, delivery_id, None)


@router.post(
    "/webhook-deliveries/{deliveryId}/redeliver",
    status_code=202,
    response_model=DeliveryOut,
    openapi_extra=cli("deliveries redeliver"),
)
async def redeliver(session: SessionDep, op: OperatorDep, delivery_id: DeliveryId) -> dict[str, Any]:
    return webhooks_service.present(await admin_service.redeliver(session, delivery_id, op.actor))


@router.get(
    "/predictions/{predictionId}/outputs",
    response_model=PredictionOutputsOut,
    summary="A prediction's rehosted outputs: the vendor's original URLs and what is stored",
    openapi_extra=cli("predictions outputs"),
)
async def prediction_outputs(
    session: ReadSessionDep, prediction_id: Annotated[Line, Path(alias="predictionId", max_length=40)]
) -> Response:
    view = await outputs_service.operator_view(session, prediction_id)
    return json_response(view.model_dump(mode="json", by_alias=True))


# ---------------------------------------------------------------- operator tokens and the audit log (SPEC §13)

OperatorTokenId = Annotated[Line, Path(alias="tokenId", max_length=40)]


@router.post(
    "/operator-tokens",
    status_code=201,
    response_model=OperatorTokenCreated,
    summary="A named operator token (admin or viewer); the token is shown once",
    openapi_extra=cli("operator-tokens create"),
)
async def create_operator_token(session: SessionDep, op: OperatorDep, body: OperatorTokenCreate) -> dict[str, Any]:
    token, raw = await operators_service.create_token(session, op, body)
    return {
        "id": token.id,
        "name": token.name,
        "role": token.role,
        "token": raw,
        "prefix": token.prefix,
        "createdAt": token.created_at,
    }


@router.get("/operator-tokens", response_model=OperatorTokenList, openapi_extra=cli("operator-tokens list"))
async def list_operator_tokens(session: ReadSessionDep) -> dict[str, Any]:
    return {"data": [operators_service.present(t) for t in await operators_service.list_tokens(session)]}


@router.delete(
    "/operator-tokens/{tokenId}", response_model=OperatorTokenOut, openapi_extra=cli("operator-tokens revoke")
)
async def revoke_operator_token(session: SessionDep, op: OperatorDep, token_id: OperatorTokenId) -> dict[str, Any]:
    return operators_service.present(await operators_service.revoke_token(session, op, token_id))


AuditText = Annotated[Line | None, Query(max_length=120)]


@router.get(
    "/audit",
    response_model=AuditList,
    summary="Every change, newest first: who, what, before and after",
    openapi_extra=cli("audit"),
)
async def audit_log(
    session: ReadSessionDep,
    target: AuditText = None,
    actor: AuditText = None,
    action: AuditText = None,
    from_: Annotated[Line | None, Query(alias="from", max_length=40)] = None,
    to: Annotated[Line | None, Query(max_length=40)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[Line | None, Query(max_length=64)] = None,
) -> Response:
    filters = audit_service.AuditFilters.of(
        target=target, actor=actor, action=action, from_=from_, to=to, cursor=cursor
    )
    rows, next_cursor = await audit_service.list_entries(session, filters, limit)
    return json_response({"data": [audit_service.present(e) for e in rows], "nextCursor": next_cursor})
