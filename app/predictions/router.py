from __future__ import annotations

import contextlib
import re
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Response

from app.budgets import balances
from app.budgets import service as budgets_service
from app.budgets.deps import CallerDep, QuoterDep, ReaderDep, authenticate
from app.budgets.headers import RETRY_AFTER_DOC, note_balance, note_charge, tenant_responses
from app.budgets.schemas import QuoteOut
from app.core import clock
from app.core.database import read_connection, transaction
from app.core.errors import DatabaseUnavailable, InvalidRequest
from app.core.openapi import link, links
from app.core.responses import dumps, json_bytes_response, json_response
from app.core.retry_after import retry_after_value
from app.core.types import Line
from app.deps import PublicBaseUrlDep, ReadSessionDep, RuntimeDep
from app.outputs import service as outputs_service
from app.predictions import failover
from app.predictions import service as predictions_service
from app.predictions.cache import FINAL
from app.predictions.models import PredictionStatus
from app.predictions.schemas import GenerateRequest, PredictionList, PredictionOut, PublicStatus, SubmitOut
from app.providers import routing
from app.tenants import service as tenants_service
from app.tenants.deps import Credentials, cached_caller

router = APIRouter(prefix="/api/v1", tags=["predictions"], responses=tenant_responses())

IDEMPOTENCY_KEY_MAX = 255


def _prefer_wait(prefer: str | None, cap_s: float) -> float | None:
    if not prefer:
        return None
    match = re.search(r"(?:^|[,;\s])wait\s*=\s*(\d+)", prefer)
    return min(float(match.group(1)), cap_s) if match else None


def _retry_after(next_poll_at: datetime | None) -> str:
    """Seconds until the gateway's next poll of a processing prediction: asking earlier learns nothing."""
    if next_poll_at is None:
        return "1"
    return retry_after_value(max(1.0, (next_poll_at - clock.now()).total_seconds()))


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
    model_id: Annotated[Line, Path(alias="modelId", max_length=100)],
    idempotency_key: Annotated[Line | None, Header(alias="Idempotency-Key")] = None,
    prefer: Annotated[str | None, Header(alias="Prefer")] = None,
) -> Response:
    if idempotency_key is not None and not (0 < len(idempotency_key) <= IDEMPOTENCY_KEY_MAX):
        raise InvalidRequest(f"Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_MAX} characters.", field="Idempotency-Key")
    result = await failover.submit(
        runtime,
        caller.tenant,
        caller.key,
        model_id,
        body,
        idempotency_key=idempotency_key,
        status_url_base=f"{base_url}/api/v1/predictions",
        public_base_url=base_url,
    )
    headers = {"Idempotent-Replayed": "true"} if result.replayed else {}
    content: dict[str, Any] = result.body
    if not result.replayed:
        note_charge(content.get("costCents") or 0)
    wait_s = _prefer_wait(prefer, runtime.settings.prefer_wait_max_s)
    next_poll_at = result.next_poll_at
    if wait_s is not None:
        prediction = await predictions_service.wait_until_terminal(
            runtime, caller.tenant.id, result.prediction_id, wait_s
        )
        if prediction is not None:
            content = predictions_service.present_submit(prediction, content["statusUrl"], extended=True)
            if content["status"] == "completed" and content["outputs"]:
                # The links stored at completion are the current ones unless they expired meanwhile:
                # a database away now is no reason to answer a recorded submit with an error.
                with contextlib.suppress(DatabaseUnavailable):
                    async with transaction(runtime.sessions, readonly=True) as session:
                        await outputs_service.show_current_links(session, runtime.settings, [content])
            next_poll_at = prediction.next_poll_at
        headers["Preference-Applied"] = f"wait={int(wait_s)}"
    if content["status"] == "processing":
        headers["Retry-After"] = _retry_after(next_poll_at)
    return json_response(content, headers=headers)


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
    model_id: Annotated[Line, Path(alias="modelId", max_length=100)],
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
    # The route callers poll: the key check from the cache; a final prediction (terminal, never
    # rehosted) from memory with the balance snapshot, else one statement reads the prediction, its
    # links and the balance for the headers (on a bare connection: no ORM session).
    caller = cached_caller(credentials)
    if caller is not None:
        tenants_service.require_scope(caller.key, "read")
        final = FINAL.get(caller.tenant.id, prediction_id)
        snapshot = balances.BALANCES.get(caller.tenant.id) if final is not None else None
        if final is not None and snapshot is not None:
            note_balance(snapshot)
            return json_bytes_response(final)
    async with read_connection(runtime.sessions) as connection:
        if caller is None:
            caller = await authenticate(connection, credentials, runtime=runtime)
            tenants_service.require_scope(caller.key, "read")
        tenant = caller.tenant
        now = clock.now()
        period_start = budgets_service.period_of(tenant.budget_period, now).start
        read = await predictions_service.read_with_balance(
            connection, runtime.settings, tenant.id, prediction_id, balances.counter_scope(tenant), period_start
        )
        if read is None:
            balance = await balances.read_balance(connection, tenant)
        else:
            balance = balances.balance_of(tenant, read.spent_cents, read.reserved_cents, now)
            if read.body.get("queued") and runtime.queue is not None:
                read.body["queuePosition"] = await runtime.queue.position(connection, tenant.id, prediction_id)
    balances.BALANCES.put(tenant.id, balance, runtime.settings.balance_ttl_s)
    note_balance(balance)
    if read is None:
        raise predictions_service.not_found(prediction_id)
    body = dumps(read.body)
    if read.final:
        FINAL.put(tenant.id, prediction_id, body)
    processing = read.body["status"] == "processing"
    headers = {"Retry-After": _retry_after(read.next_poll_at)} if processing else None
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
