from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query

from app.budgets.deps import DeliveryReaderDep
from app.budgets.headers import tenant_responses
from app.core.types import Line
from app.deps import ReadSessionDep
from app.webhooks import service as webhooks_service
from app.webhooks.models import DeliveryStatus
from app.webhooks.schemas import DeliveryDetail, DeliveryDetailList

router = APIRouter(prefix="/api/v1", tags=["webhooks"], responses=tenant_responses())

StatusQuery = Annotated[DeliveryStatus | None, Query()]


async def detail(session: ReadSessionDep, delivery_id: str, tenant_id: str | None) -> dict[str, Any]:
    delivery = await webhooks_service.get_delivery(session, delivery_id, tenant_id)
    attempts = await webhooks_service.list_attempts(session, delivery.id)
    return {**webhooks_service.present(delivery), "attemptLog": [webhooks_service.present_attempt(a) for a in attempts]}


@router.get(
    "/webhook-deliveries",
    response_model=DeliveryDetailList,
    summary="Your webhook deliveries, newest first, each with its attempts",
)
async def list_own(
    session: ReadSessionDep,
    caller: DeliveryReaderDep,
    status: StatusQuery = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[Line | None, Query(max_length=64)] = None,
) -> dict[str, Any]:
    rows, next_cursor = await webhooks_service.list_deliveries(
        session, tenant_id=caller.tenant.id, status=status, limit=limit, cursor=cursor
    )
    attempts = await webhooks_service.attempts_of(session, [d.id for d in rows])
    data = [
        {**webhooks_service.present(d), "attemptLog": [webhooks_service.present_attempt(a) for a in attempts[d.id]]}
        for d in rows
    ]
    return {"data": data, "nextCursor": next_cursor}


@router.get("/webhook-deliveries/{deliveryId}", response_model=DeliveryDetail, summary="One delivery and its attempts")
async def get_own(
    session: ReadSessionDep, caller: DeliveryReaderDep, delivery_id: Annotated[Line, Path(alias="deliveryId")]
) -> dict[str, Any]:
    return await detail(session, delivery_id, caller.tenant.id)
