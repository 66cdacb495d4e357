"""A submit across providers (SPEC §11): hold the highest candidate's price, try the candidates in the
routing order within the request, settle at the provider that accepted it.

Per attempt: a provider with caps first takes its room (rate unit and slot) in a transaction that also
writes the provider on the prediction row, so a crash mid-attempt is recovered with the hold (recovery
gives both back). Then, by what the provider answered:
- accepted: the settle charges that provider (its costCents, or its file price) and names it;
- 429: cooled down for its Retry-After, next candidate; 5xx, refused or connect timeout: counted toward
  its circuit, next candidate;
- 401/403: cooled down and logged as an error naming it, next candidate;
- another 4xx: the answer, as with one provider (the request itself is refused);
- a read timeout or broken answer after the body was sent: never the next candidate (this one may have
  accepted and billed it): the hold is released and the caller told to retry, as before providers.
"""

from __future__ import annotations

import asyncio
import logging

from sqlalchemy import bindparam, update

from app.budgets import service as budgets_service
from app.core import clock
from app.core.database import table_of, transaction
from app.core.ids import new_id
from app.core.logging import note_access
from app.predictions import service, writer
from app.predictions.models import Prediction, PredictionStatus
from app.predictions.schemas import GenerateRequest
from app.providers import health as provider_health
from app.providers import routing
from app.providers.config import ProviderConfig
from app.runtime import QueueHook, Runtime
from app.tenants import service as tenants_service
from app.tenants.models import ApiKey, Tenant
from app.upstream.client import UpstreamRefused, UpstreamUnavailable
from app.upstream.schemas import UpstreamSubmitted

log = logging.getLogger("vidgate.predictions")

_predictions = table_of(Prediction).c
_ATTEMPT_AT = (
    update(table_of(Prediction))
    .where(_predictions.id == bindparam("b_id"), _predictions.status == PredictionStatus.SUBMITTING)
    .values(provider=bindparam("b_provider"), holds_provider_slot=bindparam("b_slot"))
    .returning(_predictions.id)
)
_GIVE_BACK = (
    update(table_of(Prediction))
    .where(
        _predictions.id == bindparam("b_id"),
        _predictions.status == PredictionStatus.SUBMITTING,
        _predictions.holds_provider_slot.is_(True),
    )
    .values(holds_provider_slot=False)
    .returning(_predictions.provider)
)


def capped(provider: ProviderConfig) -> bool:
    return provider.max_concurrent is not None or provider.rate_per_minute is not None


async def _take_room(runtime: Runtime, prediction: Prediction, provider: ProviderConfig) -> bool:
    """The provider's rate unit and slot, and the prediction row naming it, in one transaction."""
    async with transaction(runtime.sessions) as session:
        if not await provider_health.take_capacity(session, provider, clock.now()):
            return False
        slot = provider.max_concurrent is not None
        params = {"b_id": prediction.id, "b_provider": provider.name, "b_slot": slot}
        if (await session.execute(_ATTEMPT_AT, params)).first() is None:
            raise RuntimeError(f"prediction {prediction.id} is no longer submitting")  # rolls the room back
    prediction.provider = provider.name
    return True


async def _give_room(runtime: Runtime, prediction: Prediction) -> None:
    """The slot back after an attempt that did not take (the rate unit was used: the submit was sent)."""
    async with transaction(runtime.sessions) as session:
        name = await session.scalar(_GIVE_BACK, {"b_id": prediction.id})
        if name is not None:
            await provider_health.give_slots(session, {name: 1})


async def submit(
    runtime: Runtime,
    tenant: Tenant,
    key: ApiKey,
    model_id: str,
    request: GenerateRequest,
    *,
    idempotency_key: str | None,
    status_url_base: str,
    public_base_url: str | None = None,
) -> service.SubmitResult:
    service.check_submittable(runtime, model_id, request)
    tenants_service.require_model(key, model_id)
    resolution = request.resolution or budgets_service.DEFAULT_RESOLUTION
    duration = request.duration or budgets_service.DEFAULT_DURATION_S
    # Not served at all: 422 before anything is held. Served, but no candidate now: held and queued
    # (SPEC §12), or refused with 503 when the caller asked for no queue.
    queue = runtime.queue if request.queue is not False else None
    plan = await routing.plan(runtime.providers, model_id, resolution, duration)
    if not plan.candidates and queue is None:
        raise routing.no_provider_available(plan.skipped)
    # While predictions wait for this model, a new submit waits its turn too (no one jumps the queue).
    waiting = queue is not None and (not plan.candidates or await queue.waiting(runtime, model_id))
    priced = plan
    if not plan.candidates:
        # Held at the highest price among every provider that serves it: any may end up sending it.
        serving = routing.served(runtime.providers.registry, model_id, resolution, duration)
        priced = routing.Plan([routing.Candidate(p, p.file_price_cents(resolution, duration)) for p in serving])
    prediction_id = new_id("pred")
    fingerprint = service.request_fingerprint(model_id, request) if idempotency_key is not None else ""

    # Hold: claim the idempotency key, pass the limits and hold the highest candidate's price, in the
    # ledger writer's next batch; committed before any provider is called.
    job = writer.HoldJob(
        tenant,
        key,
        model_id,
        request,
        prediction_id,
        idempotency_key,
        fingerprint,
        public_base_url,
        provider_prices=tuple(priced.prices),
        answer_priced=priced.answer_priced,
    )
    held = await writer.hold(runtime, job)
    if isinstance(held, service.SubmitResult):
        return held  # a replay of an earlier answer
    prediction, estimate = held
    if queue is not None and waiting:
        why = "; ".join(f"{n}: {r}" for n, r in sorted(plan.skipped.items())) or "others are waiting for this model"
        return await _enqueue(runtime, queue, tenant, key, prediction, why, idempotency_key, status_url_base)

    try:
        outcome = await _attempts(
            runtime, key, model_id, plan, prediction, idempotency_key, queueable=queue is not None
        )
    except asyncio.CancelledError:
        # The caller went away before any provider accepted it: the hold comes back now, not at recovery.
        await writer.abandon(runtime, prediction, key, idempotency_key)
        raise
    if isinstance(outcome, str):
        assert queue is not None
        return await _enqueue(runtime, queue, tenant, key, prediction, outcome, idempotency_key, status_url_base)
    submitted, provider, candidate = outcome
    # Accepted, and billed there: from here on a caller going away does not stop the charge being recorded.
    await runtime.providers.health.succeeded(provider)
    return await _settle(
        runtime, tenant, key, prediction, estimate, submitted, provider, candidate, idempotency_key, status_url_base
    )


async def _attempts(
    runtime: Runtime,
    key: ApiKey,
    model_id: str,
    plan: routing.Plan,
    prediction: Prediction,
    idempotency_key: str | None,
    *,
    queueable: bool = False,
) -> tuple[UpstreamSubmitted, ProviderConfig, routing.Candidate] | str:
    """The candidates in the routing order, until one accepts (what it answered, it and its candidacy)
    or none is left: with `queueable`, why (it is then queued, its hold kept); else the hold released
    and the refusal raised."""
    health = runtime.providers.health
    skipped = dict(plan.skipped)
    last: UpstreamRefused | UpstreamUnavailable | None = None
    for candidate in plan.candidates:
        provider = candidate.provider
        if candidate.probe and not await health.claim_probe(provider):
            skipped[provider.name] = "circuit half-open, being probed"
            continue
        room = capped(provider)
        try:
            if room and not await _take_room(runtime, prediction, provider):
                skipped[provider.name] = "at its max_concurrent or rate_per_minute"
                continue
        except Exception:
            await writer.release(runtime, prediction, key, "gateway could not record the attempt", idempotency_key)
            raise
        prediction.provider = provider.name
        try:
            submitted = await runtime.providers.adapter(provider.name).submit(model_id, prediction.params)
        except UpstreamRefused as exc:
            if room:
                await _give_room(runtime, prediction)
            if not exc.bad_credentials:
                # The request itself is refused: no other provider would take it either.
                await _release(runtime, prediction, key, exc, idempotency_key)
                raise service.upstream_problem(exc) from exc
            await health.bad_credentials(provider, exc.status)
            skipped[provider.name], last = f"refused the gateway's credentials ({exc.status})", exc
            continue
        except UpstreamUnavailable as exc:
            if room:
                await _give_room(runtime, prediction)
            if exc.cause == "rate_limited":
                await health.rate_limited(provider, exc.retry_after_s)
            else:
                await health.failed(provider, exc.reason)
            if not exc.moves_on:
                # The body was sent and no answer came: it may have been accepted and billed there.
                log.warning(
                    "no answer after the submit was sent: not trying another provider",
                    extra={"prediction_id": prediction.id, "provider": provider.name, "reason": exc.reason},
                )
                await _release(runtime, prediction, key, exc, idempotency_key)
                raise service.upstream_problem(exc) from exc
            skipped[provider.name], last = exc.reason, exc
            continue
        return submitted, provider, candidate

    if queueable:
        return "; ".join(f"{n}: {r}" for n, r in sorted(skipped.items())) or "none had room"
    await writer.release(
        runtime, prediction, key, f"no provider accepted the prediction: {last or 'none had room'}", idempotency_key
    )
    if last is None:
        raise routing.no_provider_available(skipped)
    raise service.upstream_problem(last)


async def _enqueue(
    runtime: Runtime,
    queue: QueueHook,
    tenant: Tenant,
    key: ApiKey,
    prediction: Prediction,
    reason: str,
    idempotency_key: str | None,
    status_url_base: str,
) -> service.SubmitResult:
    """No provider can take it now: it waits in the fair queue, its hold kept (app/queue)."""
    try:
        result: service.SubmitResult = await queue.enqueue(
            runtime,
            tenant,
            key,
            prediction,
            reason=reason,
            idempotency_key=idempotency_key,
            status_url_base=status_url_base,
        )
    except Exception:
        # Refused (queue_full) or not recorded: nothing is kept, nothing is charged.
        await writer.release(runtime, prediction, key, "not queued", idempotency_key)
        raise
    return result


async def _release(
    runtime: Runtime,
    prediction: Prediction,
    key: ApiKey,
    exc: UpstreamRefused | UpstreamUnavailable,
    idempotency_key: str | None,
) -> None:
    await writer.release(runtime, prediction, key, f"upstream did not accept the prediction: {exc}", idempotency_key)


async def _settle(
    runtime: Runtime,
    tenant: Tenant,
    key: ApiKey,
    prediction: Prediction,
    estimate: budgets_service.Estimate,
    submitted: UpstreamSubmitted,
    provider: ProviderConfig,
    candidate: routing.Candidate,
    idempotency_key: str | None,
    status_url_base: str,
) -> service.SubmitResult:
    """The hold becomes the serving provider's charge, with its id, in the writer's next batch. It has
    billed by now, so a database that is away is waited for rather than the charge lost."""
    confirm = writer.ConfirmJob(
        tenant,
        key,
        prediction,
        estimate,
        submitted,
        idempotency_key,
        status_url_base,
        provider=provider.name,
        price_cents=candidate.price_cents,
    )
    body = await writer.confirm_until_recorded(runtime, confirm)
    submitted_fields = {"prediction_id": prediction.id, "provider": provider.name, "cost_cents": confirm.cost}
    if not note_access(**submitted_fields):
        log.info("prediction submitted", extra=submitted_fields)
    return service.SubmitResult(
        body=body, replayed=False, prediction_id=prediction.id, next_poll_at=prediction.next_poll_at
    )
