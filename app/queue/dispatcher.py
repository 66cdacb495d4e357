"""Sends queued predictions when a provider has room (SPEC §12), in every worker.

A claim is one transaction: the tenant with the lowest pass (weighted round robin, SKIP LOCKED so
replicas take different tenants), its oldest queued entry, a provider's room taken with the providers'
own cap accounting (app/providers/health.take_capacity: across replicas, never past a cap), and the
entry and prediction marked "sending" under this process's lease. It is committed before the HTTP
call, like the submit's hold, so a dispatch is never sent twice: by the answer,
- accepted: charged as a submit is (the predictions' settle), the entry gone;
- 429, 5xx, a refused connection, 401/403: back at the head of its tenant's queue with its turn given
  back, nothing charged; the provider cooled down or its circuit counted, as a submit does;
- another 4xx: failed, hold released, webhook sent;
- no answer after the body was sent (read timeout), or this process dies: failed, hold released; the
  lease's expiry is how another process finds a dispatch that died (service.recover_sends).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select, update

from app.budgets import service as budgets_service
from app.core import clock, metrics
from app.core.database import table_of, transaction
from app.predictions import writer as predictions_writer
from app.predictions.models import Prediction, PredictionStatus
from app.providers import health as provider_health
from app.providers import routing
from app.providers.config import ProviderConfig
from app.queue import service
from app.queue.models import QueueEntry, QueueState, QueueTenant
from app.runtime import Runtime
from app.tenants.models import ApiKey, Tenant
from app.upstream.client import UpstreamRefused, UpstreamUnavailable

log = logging.getLogger("vidgate.queue")

HOUSEKEEPING_S = 1.0  # how often the max wait and dead dispatches are looked for

_entries = table_of(QueueEntry).c
_tenants = table_of(QueueTenant).c


@dataclass
class Claim:
    entry_id: str
    enqueued_at: datetime
    prediction: Prediction
    tenant: Tenant
    key: ApiKey
    provider: ProviderConfig
    price_cents: int | None
    stride: int


class QueueDispatcher:
    def __init__(self, runtime: Runtime, *, concurrency: int | None = None) -> None:
        self.runtime = runtime
        self.owner = runtime.worker_id
        self.concurrency = concurrency or max(8, runtime.settings.worker_concurrency // 4)
        self.tasks: set[asyncio.Task[None]] = set()
        self.room = asyncio.Event()
        self._looked_at: float | None = None
        # Every dispatch this process sent, in order (prediction ids): what the tests assert fairness on.
        self.sent: list[str] = []

    @property
    def lease_s(self) -> float:
        # Longer than any send can take (its HTTP call is bounded by the upstream timeout), so a live
        # dispatch is never taken for a dead one.
        settings = self.runtime.settings
        return settings.upstream_timeout_s + settings.lease_s

    async def run_once(self) -> int:
        """Claim and start as many sends as providers have room for; how many started."""
        loop = asyncio.get_running_loop()
        if self._looked_at is None or loop.time() - self._looked_at >= HOUSEKEEPING_S:
            self._looked_at = loop.time()
            await service.expire(self.runtime)
            await service.recover_sends(self.runtime)
        started = 0
        if not await service.anything_queued(self.runtime):
            return 0  # idle: not even the providers' states are read
        probes = await self._claim_probes()
        while len(self.tasks) < self.concurrency:
            claim = await self._claim(probes)
            if claim is None:
                break
            probes.discard(claim.provider.name)
            self.sent.append(claim.prediction.id)
            task = asyncio.create_task(self._send(claim))
            self.tasks.add(task)
            task.add_done_callback(self._done)
            started += 1
        return started

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self.room.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("queue dispatch failed", exc_info=task.exception())

    async def _claim_probes(self) -> set[str]:
        """Half-open circuits this process may probe with a queued prediction (claimed across replicas)."""
        providers = self.runtime.providers
        states = await providers.health.refresh()
        now = clock.now()
        probes: set[str] = set()
        for provider in providers.registry.providers:
            state = states.get(provider.name)
            if (
                state is not None
                and state.half_open(now)
                and not state.probing(now)
                and await providers.health.claim_probe(provider)
            ):
                probes.add(provider.name)
        return probes

    async def _claim(self, probes: set[str]) -> Claim | None:
        runtime = self.runtime
        now = clock.now()
        async with transaction(runtime.sessions) as session:
            turn = (
                await session.execute(
                    select(_tenants.tenant_id)
                    .where(_tenants.depth > 0)
                    .order_by(_tenants.pass_, _tenants.tenant_id)
                    .limit(1)
                    .with_for_update(skip_locked=True)
                )
            ).first()
            if turn is None:
                return None
            entry = await session.scalar(
                select(QueueEntry)
                .where(QueueEntry.tenant_id == turn.tenant_id, QueueEntry.state == QueueState.QUEUED)
                .order_by(QueueEntry.enqueued_at, QueueEntry.prediction_id)
                .limit(1)
                .with_for_update(skip_locked=True)
            )
            if entry is None:
                return None
            prediction = await session.get(Prediction, entry.prediction_id, populate_existing=True)
            assert prediction is not None
            try:
                plan = await routing.plan(runtime.providers, entry.model_id, entry.resolution, entry.duration)
            except routing.NotServed as exc:
                # The operator's providers file changed under it: nothing will ever send it.
                await service.fail_entries(session, runtime, {entry.prediction_id: exc.detail}, outcome="failed")
                return None
            chosen: routing.Candidate | None = None
            for candidate in plan.candidates:
                provider = candidate.provider
                if candidate.probe and provider.name not in probes:
                    continue
                if candidate.price_cents is not None and candidate.price_cents > prediction.estimate_cents:
                    continue  # dearer than what was held for it
                capped = provider.max_concurrent is not None or provider.rate_per_minute is not None
                if capped and not await provider_health.take_capacity(session, provider, now):
                    continue
                chosen = candidate
                break
            if chosen is None:
                return None  # no provider has room: it waits (nothing was changed)
            tenant = await session.get(Tenant, entry.tenant_id)
            key = await session.get(ApiKey, prediction.api_key_id)
            assert tenant is not None and key is not None
            stride = service.STRIDE // max(1, tenant.queue_weight)
            entry.state = QueueState.SENDING
            entry.lease_owner = self.owner
            entry.lease_expires_at = now + timedelta(seconds=self.lease_s)
            entry.attempts += 1
            prediction.status = PredictionStatus.SENDING
            prediction.provider = chosen.provider.name
            prediction.holds_provider_slot = chosen.provider.max_concurrent is not None
            await session.execute(
                update(QueueTenant)
                .where(QueueTenant.tenant_id == tenant.id)
                .values(depth=QueueTenant.depth - 1, pass_=QueueTenant.pass_ + stride)
            )
            await session.flush()
            claim = Claim(
                entry.prediction_id,
                entry.enqueued_at,
                prediction,
                tenant,
                key,
                chosen.provider,
                chosen.price_cents,
                stride,
            )
        metrics.QUEUE_WAIT.labels(outcome="sent").observe(service.waited_s(claim.enqueued_at))
        return claim

    async def _send(self, claim: Claim) -> None:
        runtime, prediction, provider = self.runtime, claim.prediction, claim.provider
        health = runtime.providers.health
        try:
            submitted = await runtime.providers.adapter(provider.name).submit(prediction.model_id, prediction.params)
        except UpstreamRefused as exc:
            if exc.bad_credentials:
                await health.bad_credentials(provider, exc.status)
                await self._requeue(claim, f"refused the gateway's credentials ({exc.status})")
                return
            await self._fail(
                claim,
                f"The video provider refused the request ({exc.status}): {exc.message}. Nothing was charged.",
                "refused",
            )
            return
        except UpstreamUnavailable as exc:
            if exc.cause == "rate_limited":
                await health.rate_limited(provider, exc.retry_after_s)
            else:
                await health.failed(provider, exc.reason)
            if not exc.moves_on:
                log.warning(
                    "no answer after a queued prediction was sent: failing it, never sending it again",
                    extra={"prediction_id": prediction.id, "provider": provider.name, "reason": exc.reason},
                )
                await self._fail(claim, service.UNKNOWN_OUTCOME, "unknown")
                return
            await self._requeue(claim, exc.reason)
            return
        await health.succeeded(provider)
        # Charged as any submit is; the confirm's window is counted from this send, not the submit.
        prediction.created_at = clock.now()
        confirm = predictions_writer.ConfirmJob(
            claim.tenant,
            claim.key,
            prediction,
            budgets_service.Estimate(prediction.estimate_cents, None),
            submitted,
            None,
            "",
            provider=provider.name,
            price_cents=claim.price_cents,
        )
        await predictions_writer.confirm_until_recorded(runtime, confirm)
        async with transaction(runtime.sessions) as session:
            await session.execute(
                delete(QueueEntry).where(_entries.prediction_id == claim.entry_id, _entries.lease_owner == self.owner)
            )
        metrics.QUEUE_DISPATCHES.labels(provider=provider.name, outcome="accepted").inc()
        log.info(
            "queued prediction sent",
            extra={"prediction_id": prediction.id, "provider": provider.name, "cost_cents": confirm.cost},
        )

    async def _requeue(self, claim: Claim, reason: str) -> None:
        """Back at the head of its tenant's queue (its place kept), its turn given back; nothing charged."""
        async with transaction(self.runtime.sessions) as session:
            mine = await session.scalar(
                update(QueueEntry)
                .where(
                    QueueEntry.prediction_id == claim.entry_id,
                    QueueEntry.state == QueueState.SENDING,
                    QueueEntry.lease_owner == self.owner,
                )
                .values(state=QueueState.QUEUED, lease_owner=None, lease_expires_at=None)
                .returning(QueueEntry.prediction_id)
                .execution_options(synchronize_session=False)
            )
            if mine is None:
                return  # recovery took it over meanwhile (it failed it)
            slot = await session.scalar(
                select(Prediction.holds_provider_slot).where(Prediction.id == claim.entry_id).with_for_update()
            )
            await session.execute(
                update(Prediction)
                .where(Prediction.id == claim.entry_id, Prediction.status == PredictionStatus.SENDING)
                .values(status=PredictionStatus.QUEUED, provider=None, holds_provider_slot=False)
                .execution_options(synchronize_session=False)
            )
            if slot:
                await provider_health.give_slots(session, {claim.provider.name: 1})
            await session.execute(
                update(QueueTenant)
                .where(QueueTenant.tenant_id == claim.tenant.id)
                .values(depth=QueueTenant.depth + 1, pass_=QueueTenant.pass_ - claim.stride)
            )
        metrics.QUEUE_DISPATCHES.labels(provider=claim.provider.name, outcome="requeued").inc()
        log.info(
            "queued prediction put back: the provider could not take it",
            extra={"prediction_id": claim.entry_id, "provider": claim.provider.name, "reason": reason[:300]},
        )

    async def _fail(self, claim: Claim, message: str, outcome: str) -> None:
        async with transaction(self.runtime.sessions) as session:
            still_mine = await session.scalar(
                select(_entries.prediction_id).where(
                    _entries.prediction_id == claim.entry_id, _entries.lease_owner == self.owner
                )
            )
            if still_mine is not None:
                await service.fail_entries(session, self.runtime, {claim.entry_id: message}, outcome=outcome)
        metrics.QUEUE_DISPATCHES.labels(provider=claim.provider.name, outcome=outcome).inc()

    async def drain(self, timeout_s: float) -> None:
        """Graceful stop: sends in flight finish (one abandoned would end failed, outcome unknown)."""
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=timeout_s)
