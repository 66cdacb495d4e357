from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app.budgets import service as budgets_service
from app.budgets.deps import ReaderDep
from app.budgets.headers import tenant_responses
from app.budgets.schemas import UsageOut
from app.deps import ReadSessionDep

router = APIRouter(prefix="/api/v1", tags=["usage"], responses=tenant_responses())


@router.get("/usage", response_model=UsageOut, summary="This period's budget and spending")
async def usage(session: ReadSessionDep, caller: ReaderDep) -> dict[str, Any]:
    return (await budgets_service.tenant_usage(session, caller.tenant)).present()
