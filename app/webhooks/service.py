"""Webhook outbox: deliveries are rows written in the transaction of the change that causes them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import orjson
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.core import clock
from app.core.errors import InvalidRequest, NotFound
from app.core.ids import new_id
from app.core.settings import Settings
from app.core.ssrf import ForbiddenTarget, check_url
from app.tenants.models import Tenant
from app.webhooks.models import DeliveryStatus, WebhookAttempt, WebhookDelivery

if TYPE_CHECKING:
    from app.budgets.service import Usage


class PredictionEvent(Protocol):
    """What a prediction's event needs of the prediction (app/predictions depends on webhooks, so the
    outbox names the fields it reads rather than the model)."""

    @property
    def id(self) -> str: ...

    @property
    def status(self) -> str: ...

    @property
    def webhook_url(self) -> str | None: ...

    @property
    def webhook_events(self) -> list[str] | None: ...


class WebhookUrlForbidden(InvalidRequest):
    code = "webhook_url_forbidden"
    title = "Webhook URL not allowed"


def check_webhook_url(settings: Settings, url: str | None, field: str) -> None:
    """The one check of a webhook URL a caller hands in (API, operator API, CLI): a public http(s) target,
    unless VIDGATE_WEBHOOK_ALLOW_PRIVATE. The dispatcher checks again at each delivery (DNS may change)."""
    if url is None:
        return
    try:
        check_url(url, allow_private=settings.webhook_allow_private)
    except ForbiddenTarget as exc:
        raise WebhookUrlForbidden(f"{field}: {exc.reason}", field=field) from exc


class DeliveryNotFound(NotFound):
    code = "webhook_delivery_not_found"
    title = "No such webhook delivery"


def target_host(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"


def tenant_endpoint(tenant: Tenant) -> str | None:
    return tenant.webhook_url if tenant.webhook_disabled_at is None else None


def _add(
    session: AsyncSession,
    tenant: Tenant,
    url: str,
    event_type: str,
    data: dict[str, Any],
    prediction_id: str | None,
) -> None:
    now = clock.now()
    body = orjson.dumps({"type": event_type, "timestamp": clock.iso(now), "data": data}).decode()
    session.add(
        WebhookDelivery(
            id=new_id("msg"),
            tenant_id=tenant.id,
            prediction_id=prediction_id,
            event_type=event_type,
            url=url,
            target_host=target_host(url),
            payload=body,
            status=DeliveryStatus.PENDING,
            attempts=0,
            next_attempt_at=now,
            created_at=now,
        )
    )


async def enqueue_prediction_event(
    session: AsyncSession, settings: Settings, tenant: Tenant, prediction: PredictionEvent, data: dict[str, Any]
) -> None:
    await enqueue_prediction_events(session, settings, [(tenant, prediction, data)])


async def enqueue_prediction_events(
    session: AsyncSession, settings: Settings, events: list[tuple[Tenant, PredictionEvent, dict[str, Any]]]
) -> None:
    """The deliveries of many predictions' events, written by one flush (one multi-row INSERT)."""
    for tenant, prediction, data in events:
        status = prediction.status
        if prediction.webhook_events is not None and status not in prediction.webhook_events:
            continue
        url = prediction.webhook_url
        if url is None:
            url = tenant_endpoint(tenant)
            wanted = tenant.webhook_events_filter
            if wanted is not None and f"prediction.{status}" not in wanted:
                continue
        if url is not None:
            _add(session, tenant, url, f"prediction.{status}", data, prediction.id)
    await session.flush()


async def enqueue_budget_threshold(session: AsyncSession, tenant: Tenant, percent: int, usage: Usage) -> None:
    url = tenant_endpoint(tenant)
    wanted = tenant.webhook_events_filter
    if url is None or (wanted is not None and "budget.threshold" not in wanted):
        return
    data = {"tenantId": tenant.id, "percent": percent, **usage.present()}
    _add(session, tenant, url, "budget.threshold", data, None)
    await session.flush()


def present(delivery: WebhookDelivery) -> dict[str, Any]:
    parts = urlsplit(delivery.url)
    # Query strings often carry tokens: show where it goes, not how it authenticates.
    shown_url = f"{parts.scheme}://{parts.netloc}{parts.path}" + ("?…" if parts.query else "")
    return {
        "id": delivery.id,
        "tenantId": delivery.tenant_id,
        "predictionId": delivery.prediction_id,
        "eventType": delivery.event_type,
        "url": shown_url,
        "status": delivery.status,
        "attempts": delivery.attempts,
        "nextAttemptAt": delivery.next_attempt_at if delivery.status == DeliveryStatus.PENDING else None,
        "lastStatusCode": delivery.last_status_code,
        "lastError": delivery.last_error,
        "createdAt": delivery.created_at,
        "deliveredAt": delivery.delivered_at,
    }


async def list_deliveries(
    session: AsyncSession, *, tenant_id: str | None, status: DeliveryStatus | None, limit: int, cursor: str | None
) -> tuple[list[WebhookDelivery], str | None]:
    stmt = select(WebhookDelivery)
    if tenant_id:
        stmt = stmt.where(WebhookDelivery.tenant_id == tenant_id)
    if status:
        stmt = stmt.where(WebhookDelivery.status == status)
    if cursor:
        stmt = stmt.where(WebhookDelivery.id < cursor)
    rows = list(await session.scalars(stmt.order_by(WebhookDelivery.id.desc()).limit(limit + 1)))
    return rows[:limit], rows[limit - 1].id if len(rows) > limit else None


async def get_delivery(session: AsyncSession, delivery_id: str, tenant_id: str | None = None) -> WebhookDelivery:
    delivery = await session.get(WebhookDelivery, delivery_id, populate_existing=True)
    if delivery is None or (tenant_id is not None and delivery.tenant_id != tenant_id):
        raise DeliveryNotFound(f"There is no webhook delivery {delivery_id!r}.")
    return delivery


async def list_attempts(session: AsyncSession, delivery_id: str) -> list[WebhookAttempt]:
    rows = await session.scalars(
        select(WebhookAttempt).where(WebhookAttempt.delivery_id == delivery_id).order_by(WebhookAttempt.id)
    )
    return list(rows)


async def attempts_of(session: AsyncSession, delivery_ids: list[str]) -> dict[str, list[WebhookAttempt]]:
    """The attempts of many deliveries (a page of them), read by one statement."""
    found: dict[str, list[WebhookAttempt]] = {d: [] for d in delivery_ids}
    if delivery_ids:
        rows = await session.scalars(
            select(WebhookAttempt).where(WebhookAttempt.delivery_id.in_(delivery_ids)).order_by(WebhookAttempt.id)
        )
        for attempt in rows:
            found[attempt.delivery_id].append(attempt)
    return found


def present_attempt(attempt: WebhookAttempt) -> dict[str, Any]:
    return {
        "attemptedAt": attempt.attempted_at,
        "statusCode": attempt.status_code,
        "latencyMs": attempt.latency_ms,
        "error": attempt.error,
    }


async def redeliver(session: AsyncSession, delivery: WebhookDelivery) -> WebhookDelivery:
    """Queue the same event again, same webhook-id, with a fresh retry schedule."""
    await session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery.id)
        .values(
            status=DeliveryStatus.PENDING,
            attempts=0,
            next_attempt_at=clock.now(),
            lease_owner=None,
            lease_expires_at=None,
        )
    )
    return await get_delivery(session, delivery.id)
