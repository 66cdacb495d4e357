from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app.budgets import service as budgets_service
from app.budgets.headers import tenant_responses
from app.budgets.schemas import UsageOut
from app.deps import ReadSessionDep
from app.tenants.deps import ReaderDep

router = APIRouter(prefix="/api/v1", tags=["usage"], responses=tenant_responses())


def present_usage(usage: budgets_service.Usage) -> dict[str, Any]:
    return {
        "budgetCents": usage.budget_cents,
        "period": usage.period,
        "periodStart": usage.period_start,
        "periodEnd": usage.period_end,
        "spentCents": usage.spent_cents,
        "reservedCents": usage.reserved_cents,
        "remainingCents": usage.remaining_cents,
    }


@router.get("/usage", response_model=UsageOut, summary="This period's budget and spending")
async def usage(session: ReadSessionDep, caller: ReaderDep) -> dict[str, Any]:
    return present_usage(await budgets_service.tenant_usage(session, caller.tenant))
