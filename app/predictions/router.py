from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Request, Response

from app.core.database import transaction
from app.core.errors import InvalidRequest
from app.core.responses import json_response
from app.deps import ReadSessionDep, RuntimeDep
from app.predictions import service as predictions_service
from app.predictions.schemas import GenerateRequest, PredictionList, PredictionOut, PublicStatus, SubmitOut
from app.tenants.deps import CallerDep, Credentials, ReaderDep, authenticate

router = APIRouter(prefix="/api/v1", tags=["predictions"])

IDEMPOTENCY_KEY_MAX = 255


def _prefer_wait(prefer: str | None, cap_s: float) -> float | None:
    if not prefer:
        return None
    match = re.search(r"(?:^|[,;\s])wait\s*=\s*(\d+)", prefer)
    return min(float(match.group(1)), cap_s) if match else None


def _status_url_base(request: Request, public_base_url: str | None) -> str:
    base = public_base_url.rstrip("/") if public_base_url else str(request.base_url).rstrip("/")
    return f"{base}/api/v1/predictions"


@router.post(
    "/models/{modelId}/generate",
    response_model=SubmitOut,
    summary="Submit a prediction (mirrors the vendor's generate endpoint)",
)
async def generate(
    request: Request,
    runtime: RuntimeDep,
    caller: CallerDep,
    body: GenerateRequest,
    model_id: Annotated[str, Path(alias="modelId", max_length=100)],
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
    prefer: Annotated[str | None, Header(alias="Prefer")] = None,
) -> Response:
    if idempotency_key is not None and not (0 < len(idempotency_key) <= IDEMPOTENCY_KEY_MAX):
        raise InvalidRequest(f"Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_MAX} characters.", field="Idempotency-Key")
    result = await predictions_service.submit(
        runtime,
        caller.tenant,
        caller.key,
        model_id,
        body,
        idempotency_key=idempotency_key,
        status_url_base=_status_url_base(request, runtime.settings.public_base_url),
    )
    headers = {"Idempotent-Replayed": "true"} if result.replayed else {}
    content: dict[str, Any] = result.body
    wait_s = _prefer_wait(prefer, runtime.settings.prefer_wait_max_s)
    if wait_s is not None:
        prediction = await predictions_service.wait_until_terminal(
            runtime, caller.tenant.id, result.prediction_id, wait_s
        )
        content = predictions_service.present_submit(prediction, content["statusUrl"], extended=True)
        headers["Preference-Applied"] = f"wait={int(wait_s)}"
    return json_response(content, headers=headers)


@router.get("/predictions/{predictionId}", response_model=PredictionOut, summary="Get a prediction")
async def get_prediction(
    runtime: RuntimeDep, credentials: Credentials, prediction_id: Annotated[str, Path(alias="predictionId")]
) -> Response:
    # The route callers poll: one read-only unit of work opened here, not by two generator dependencies.
    async with transaction(runtime.sessions, readonly=True) as session:
        caller = await authenticate(session, credentials)
        body = await predictions_service.read_for_tenant(session, caller.tenant.id, prediction_id)
    return json_response(body)


@router.get("/predictions", response_model=PredictionList, summary="List your predictions, newest first")
async def list_predictions(
    session: ReadSessionDep,
    caller: ReaderDep,
    status: Annotated[PublicStatus | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=64)] = None,
) -> Response:
    rows, next_cursor = await predictions_service.list_for_tenant(
        session, caller.tenant.id, status=status, limit=limit, cursor=cursor
    )
    return json_response({"data": [predictions_service.present(p) for p in rows], "nextCursor": next_cursor})
