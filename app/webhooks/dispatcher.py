"""Delivers due webhook rows. Claims by lease (SKIP LOCKED on PostgreSQL) so any number of processes
can deliver, and caps concurrency per endpoint so one slow receiver cannot starve the others."""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import aiohttp
from sqlalchemy import bindparam, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.core import clock, metrics
from app.core.batching import batches
from app.core.database import (
    RowShape,
    store_until_done,
    table_of,
    transaction,
    value_rows,
    value_rows_params,
    value_rows_size,
)
from app.core.retry_after import parse_retry_after
from app.core.ssrf import ForbiddenTarget, check_url
from app.runtime import Runtime
from app.tenants import service as tenants_service
from app.tenants.models import Tenant
from app.webhooks.models import DeliveryStatus, WebhookAttempt, WebhookDelivery
from app.webhooks.signing import signature_header

log = logging.getLogger("vidgate.webhooks")

USER_AGENT = "vidgate-webhooks/1"


WRITE_BATCH = 500

_deliveries = table_of(WebhookDelivery)
# What an attempt changes on its delivery row (Dispatcher._next_state), besides dropping the lease.
_STATE_FIELDS = ("attempts", "last_status_code", "last_error", "status", "delivered_at", "next_attempt_at")
_OUTCOME_SHAPE: RowShape = tuple((name, _deliveries.c[name].type) for name in ("id", *_STATE_FIELDS))


@functools.cache
def _record_statement(n: int) -> Any:
    """The deliveries of `n` attempts, changed in one UPDATE ... FROM (VALUES ...), fenced on the lease."""
    outcomes = value_rows("outcomes", _OUTCOME_SHAPE, n)
    return (
        update(_deliveries)
        .where(_deliveries.c.id == outcomes.c.id, _deliveries.c.lease_owner == bindparam("b_owner"))
        .values(lease_owner=None, lease_expires_at=None, **{name: outcomes.c[name] for name in _STATE_FIELDS})
        .returning(_deliveries.c.id)
    )


@dataclass(frozen=True)
class Attempt:
    delivery: WebhookDelivery
    at: datetime
    status: int | None
    error: str | None
    retry_after_s: float | None
    latency_ms: int


async def post_signed(
    runtime: Runtime, url: str, msg_id: str, payload: str, secrets: list[str]
) -> tuple[int | None, str | None, float | None, int]:
    """One signed POST of an event: (status or None, error, Retry-After seconds, latency ms). Every delivery
    and a tenant's `webhook.test` go through here."""
    timestamp = int(time.time())
    headers = {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature_header(secrets, msg_id, timestamp, payload),
    }
    started = time.perf_counter()
    status: int | None = None
    error: str | None = None
    retry_after: float | None = None
    try:
        # aiohttp dials IP literals without asking the resolver, so those are checked here.
        check_url(url, allow_private=runtime.settings.webhook_allow_private)
        async with runtime.webhook_http.post(
            url, data=payload.encode(), headers=headers, allow_redirects=False
        ) as response:
            status = response.status
            retry_after = parse_retry_after(response.headers.get("Retry-After"), clock.now())
            await response.content.read(1024)  # drain a little so keep-alive can reuse the connection
    except ForbiddenTarget as exc:
        error = f"refused: {exc.reason}"
    except aiohttp.ClientConnectorError as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, ForbiddenTarget) else None
        error = f"refused: {cause.reason}" if cause else f"connection failed ({type(exc).__name__})"
    except TimeoutError:
        error = f"timed out after {runtime.settings.webhook_timeout_s:g} s"
    except aiohttp.ClientError as exc:
        error = f"request failed ({type(exc).__name__})"
    return status, error, retry_after, int((time.perf_counter() - started) * 1000)


class Dispatcher:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.tasks: set[asyncio.Task[None]] = set()
        self.attempts: asyncio.Queue[Attempt] = asyncio.Queue()
        self.busy_hosts: Counter[str] = Counter()
        # Endpoints whose last attempt got no answer (timeout, refused): one delivery at a time until
        # one is answered, so a dead receiver does not sit on slots that healthy ones could use.
        self.unanswered_hosts: set[str] = set()
        # Set when a delivery ends after run_once found every slot, or every due endpoint's, taken.
        self.room = asyncio.Event()
        self.waiting_for_room = False
        self.unrecorded: set[str] = set()  # deliveries attempted whose outcome is not stored yet

    def wake(self) -> None:
        """Deliveries were queued in this process (a terminal transition committed): claim now."""
        self.room.set()

    def _cap(self, host: str) -> int:
        return 1 if host in self.unanswered_hosts else self.runtime.settings.webhook_per_endpoint_concurrency

    def _saturated(self) -> list[str]:
        return [host for host, n in self.busy_hosts.items() if n >= self._cap(host)]

    async def run_once(self) -> int:
        settings = self.runtime.settings
        free = settings.webhook_concurrency - len(self.tasks)
        if free <= 0:
            self.waiting_for_room = True
            return 0
        # Every database call comes before a host is counted busy: one failing (an outage) must not
        # leave a host counted busy by a delivery that never started. The claim reads the signing
        # secrets in its own transaction: when webhooks come due hundreds at a time, the dispatcher
        # claims each time slots free up, and a second transaction per claim was a third of its cost.
        claimed, secrets = await self._claim_signed(free)
        started, excess = [], []
        for delivery in claimed:
            if self.busy_hosts[delivery.target_host] >= self._cap(delivery.target_host):
                excess.append(delivery.id)
                continue
            self.busy_hosts[delivery.target_host] += 1
            started.append(delivery)
            task = asyncio.create_task(self._deliver(delivery, secrets.get(delivery.tenant_id, [])))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        self.waiting_for_room = not started and bool(self.busy_hosts)
        if excess:
            await self._unlease(excess)
        return len(started)

    async def _claim(self, limit: int) -> list[WebhookDelivery]:
        return (await self._claim_signed(limit))[0]

    async def _claim_signed(self, limit: int) -> tuple[list[WebhookDelivery], dict[str, list[str]]]:
        """Lease up to `limit` due deliveries and read their tenants' signing secrets, in one transaction."""
        now = clock.now()
        # The attempt itself is bounded by the timeout; the margin covers storing its outcome.
        lease = timedelta(seconds=self.runtime.settings.webhook_timeout_s + 5)
        due = (
            select(WebhookDelivery.id)
            .where(
                WebhookDelivery.status == DeliveryStatus.PENDING,
                WebhookDelivery.next_attempt_at <= now,
                (WebhookDelivery.lease_expires_at.is_(None)) | (WebhookDelivery.lease_expires_at < now),
            )
            .order_by(WebhookDelivery.next_attempt_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        saturated = self._saturated()
        if saturated:
            due = due.where(WebhookDelivery.target_host.not_in(saturated))
        if self.unrecorded:
            # Attempted, but not yet recorded (the database was away): their lease may have run out,
            # yet sending them again would notify twice.
            due = due.where(WebhookDelivery.id.not_in(self.unrecorded))
        async with transaction(self.runtime.sessions) as session:
            rows = list(
                await session.scalars(
                    update(WebhookDelivery)
                    .where(WebhookDelivery.id.in_(due.scalar_subquery()))
                    .values(lease_owner=self.runtime.worker_id, lease_expires_at=now + lease)
                    .returning(WebhookDelivery)
                    .execution_options(synchronize_session=False)
                )
            )
            secrets = await self._secrets_in(session, {d.tenant_id for d in rows}) if rows else {}
            return rows, secrets

    async def _unlease(self, ids: list[str]) -> None:
        async with transaction(self.runtime.sessions) as session:
            await session.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.id.in_(ids), WebhookDelivery.lease_owner == self.runtime.worker_id)
                .values(lease_owner=None, lease_expires_at=None)
            )

    @staticmethod
    async def _secrets_in(session: AsyncSession, tenant_ids: set[str]) -> dict[str, list[str]]:
        tenants = await session.scalars(select(Tenant).where(Tenant.id.in_(tenant_ids)))
        return {t.id: tenants_service.active_webhook_secrets(t) for t in tenants}

    async def _deliver(self, delivery: WebhookDelivery, secrets: list[str]) -> None:
        try:
            status, error, retry_after, latency_ms = await self._post(delivery, secrets)
            if status is None:
                self.unanswered_hosts.add(delivery.target_host)
            else:
                self.unanswered_hosts.discard(delivery.target_host)
            self.unrecorded.add(delivery.id)
            self.attempts.put_nowait(Attempt(delivery, clock.now(), status, error, retry_after, latency_ms))
        finally:
            self.busy_hosts[delivery.target_host] -= 1
            if self.busy_hosts[delivery.target_host] <= 0:
                del self.busy_hosts[delivery.target_host]
            if self.waiting_for_room:
                self.waiting_for_room = False
                self.room.set()

    async def write_loop(self, stopping: asyncio.Event) -> None:
        """Record attempts as they finish, many per transaction. Runs until stopped and drained."""

        def done() -> bool:
            return stopping.is_set() and not self.tasks

        async for batch in batches(self.attempts, done=done, max_size=WRITE_BATCH):
            # Waits out a database outage, so a delivered webhook is not sent again; if it fails
            # otherwise, the leases expire and the deliveries are attempted again: never lost.
            if not await store_until_done(functools.partial(self.record, batch), "webhook attempts"):
                self.unrecorded.difference_update(attempt.delivery.id for attempt in batch)

    async def _post(
        self, delivery: WebhookDelivery, secrets: list[str]
    ) -> tuple[int | None, str | None, float | None, int]:
        return await post_signed(self.runtime, delivery.url, delivery.id, delivery.payload, secrets)

    def _next_state(self, attempt: Attempt) -> tuple[str, dict[str, object]]:
        """What one attempt's answer means for its delivery: the outcome and the row's new values."""
        settings = self.runtime.settings
        delivery, status, now = attempt.delivery, attempt.status, attempt.at
        attempts = delivery.attempts + 1
        values: dict[str, object] = dict(
            attempts=attempts,
            last_status_code=status,
            last_error=attempt.error if status is None else None,
            lease_owner=None,
            lease_expires_at=None,
            status=DeliveryStatus.PENDING,
            delivered_at=None,
            next_attempt_at=None,
        )
        if status is not None and 200 <= status < 300:
            values.update(status=DeliveryStatus.SUCCEEDED, delivered_at=now)
            return "succeeded", values
        if status is not None:
            values["last_error"] = f"receiver answered {status}"
        if status == 410:
            values.update(status=DeliveryStatus.DEAD, last_error="receiver answered 410 Gone; endpoint disabled")
            return "gone", values
        if attempts >= len(settings.webhook_retry_schedule_s):
            values.update(status=DeliveryStatus.DEAD)
            return "dead", values
        delay = settings.webhook_retry_schedule_s[attempts] * random.uniform(0.9, 1.1)
        if status in (429, 503) and attempt.retry_after_s is not None:
            delay = max(delay, attempt.retry_after_s)
        values.update(next_attempt_at=now + timedelta(seconds=delay))
        return "failed", values

    async def record(self, batch: list[Attempt]) -> None:
        """Store a batch of attempts in one transaction, fenced on our lease: a worker whose lease was
        taken over records nothing, and the new holder records its own attempt. The deliveries change
        in one UPDATE ... FROM (VALUES ...), the attempts go in as one multi-row INSERT."""
        owner = self.runtime.worker_id
        # One attempt per delivery: after the first is stored the lease is ours no more.
        first: dict[str, Attempt] = {}
        for attempt in batch:
            first.setdefault(attempt.delivery.id, attempt)
        states = [(attempt, *self._next_state(attempt)) for attempt in first.values()]
        rows = [(attempt.delivery.id, *(new[name] for name in _STATE_FIELDS)) for attempt, _, new in states]
        async with transaction(self.runtime.sessions) as session:
            stored = set(
                await session.scalars(
                    _record_statement(value_rows_size(len(rows))),
                    {"b_owner": owner, **value_rows_params("outcomes", _OUTCOME_SHAPE, rows)},
                )
            )
            for attempt, outcome, new in states:
                delivery = attempt.delivery
                if delivery.id not in stored:
                    continue
                metrics.WEBHOOK_ATTEMPTS.labels(outcome=outcome).inc()
                if outcome == "succeeded":
                    metrics.NOTIFICATION_LAG.observe(max((attempt.at - delivery.created_at).total_seconds(), 0.0))
                error = new["last_error"]
                session.add(
                    WebhookAttempt(
                        delivery_id=delivery.id,
                        attempted_at=attempt.at,
                        status_code=attempt.status,
                        latency_ms=attempt.latency_ms,
                        error=str(error)[:500] if error else None,
                        worker=owner,
                    )
                )
                if outcome == "gone":
                    await session.execute(
                        update(Tenant)
                        .where(Tenant.id == delivery.tenant_id, Tenant.webhook_url == delivery.url)
                        .values(webhook_disabled_at=attempt.at)
                        .execution_options(synchronize_session=False)
                    )
        self.unrecorded.difference_update(attempt.delivery.id for attempt in batch)

    async def _record(
        self,
        delivery: WebhookDelivery,
        status: int | None,
        error: str | None,
        retry_after: float | None,
        latency_ms: int,
    ) -> None:
        await self.record([Attempt(delivery, clock.now(), status, error, retry_after, latency_ms)])

    async def release_leases(self) -> None:
        async with transaction(self.runtime.sessions) as session:
            await session.execute(
                update(WebhookDelivery)
                .where(
                    WebhookDelivery.lease_owner == self.runtime.worker_id,
                    WebhookDelivery.status == DeliveryStatus.PENDING,
                )
                .values(lease_owner=None, lease_expires_at=None)
            )
