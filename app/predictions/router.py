from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Path, Query, Response

from app.budgets import service as budgets_service
from app.budgets.deps import CallerDep, QuoterDep, ReaderDep
from app.budgets.headers import RETRY_AFTER_DOC, tenant_responses
from app.budgets.schemas import QuoteOut
from app.core.openapi import link, links
from app.core.responses import json_bytes_response, json_response
from app.core.types import Line
from app.deps import PublicBaseUrlDep, ReadSessionDep, RuntimeDep
from app.outputs import service as outputs_service
from app.predictions import hot
from app.predictions import service as predictions_service
from app.predictions.models import PredictionStatus
from app.predictions.schemas import GenerateRequest, PredictionList, PredictionOut, PublicStatus, SubmitOut
from app.providers import routing
from app.tenants import service as tenants_service
from app.tenants.deps import Credentials

router = APIRouter(prefix="/api/v1", tags=["predictions"], responses=tenant_responses())


@router.post(
    "/models/{modelId}/generate",
    response_model=SubmitOut,
    summary="Submit a prediction (mirrors the vendor's generate endpoint)",
    responses={
        200: {
            **tenant_responses(**RETRY_AFTER_DOC)[200],
            **links(
                200,
                "The prediction as submitted",
                GetPrediction=link("GET", "/api/v1/predictions/{predictionId}", predictionId="$response.body#/id"),
            )[200],
        }
    },
)
async def generate(
    runtime: RuntimeDep,
    caller: CallerDep,
    base_url: PublicBaseUrlDep,
    body: GenerateRequest,
    model_id: Annotated[Line, Path(alias="modelId", max_length=hot.MODEL_ID_MAX)],
    idempotency_key: Annotated[Line | None, Header(alias="Idempotency-Key")] = None,
    prefer: Annotated[str | None, Header(alias="Prefer")] = None,
) -> Response:
    # Served by the bare handler in app/predictions/hot.py (dispatched in app/main.py): this declaration
    # is the interface (OpenAPI) and the way FastAPI serves what the dispatcher passes on.
    content, headers = await hot.submit_answer(runtime, caller, base_url, body, model_id, idempotency_key, prefer)
    return json_bytes_response(content, headers=headers)


@router.post(
    "/models/{modelId}/quote",
    response_model=QuoteOut,
    summary="What a submit would hold now, and whether it would pass; nothing is sent upstream or held",
)
async def quote(
    runtime: RuntimeDep,
    session: ReadSessionDep,
    caller: QuoterDep,
    body: GenerateRequest,
    model_id: Annotated[Line, Path(alias="modelId", max_length=hot.MODEL_ID_MAX)],
) -> Response:
    predictions_service.check_submittable(runtime, model_id, body)
    tenants_service.require_model(caller.key, model_id)
    resolution = body.resolution or budgets_service.DEFAULT_RESOLUTION
    duration = body.duration or budgets_service.DEFAULT_DURATION_S
    # What a submit would hold: the highest price among the providers it would try now (or could at all).
    plan = await routing.plan(runtime.providers, model_id, resolution, duration)
    if not plan.candidates:
        served = routing.served(runtime.providers.registry, model_id, resolution, duration)
        plan = routing.Plan([routing.Candidate(p, p.file_price_cents(resolution, duration)) for p in served])
    answer = await budgets_service.quote(
        session,
        runtime.settings.price_table,
        caller.tenant,
        caller.key,
        model_id,
        body.resolution,
        body.duration,
        plan.prices,
        plan.answer_priced,
    )
    return json_response(
        {
            "estimateCents": answer.estimate_cents,
            "fits": answer.fits,
            "remainingCents": answer.remaining_cents,
            "budgetCents": answer.budget_cents,
            "resetsAt": answer.resets_at,
        }
    )


@router.get(
    "/predictions/{predictionId}",
    response_model=PredictionOut,
    summary="Get a prediction",
    responses=tenant_responses(**RETRY_AFTER_DOC),
)
async def get_prediction(
    runtime: RuntimeDep, credentials: Credentials, prediction_id: Annotated[Line, Path(alias="predictionId")]
) -> Response:
    # Served by the bare handler in app/predictions/hot.py, as the submit above.
    body, headers = await hot.prediction_answer(runtime, credentials, prediction_id)
    return json_bytes_response(body, headers=headers)


@router.get("/predictions", response_model=PredictionList, summary="List your predictions, newest first")
async def list_predictions(
    runtime: RuntimeDep,
    session: ReadSessionDep,
    caller: ReaderDep,
    status: Annotated[PublicStatus | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[Line | None, Query(max_length=64)] = None,
) -> Response:
    rows, next_cursor = await predictions_service.list_for_tenant(
        session, caller.tenant.id, status=PredictionStatus(status) if status else None, limit=limit, cursor=cursor
    )
    data = [predictions_service.present(p) for p in rows]
    await outputs_service.show_current_links(session, runtime.settings, data)
    return json_response({"data": data, "nextCursor": next_cursor})
