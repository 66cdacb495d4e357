"""Webhooks end to end (SPEC section 4): Standard Webhooks signatures, event types and filters,
budget thresholds, secret rotation, retries, dead letters, receiver answers (3xx, 410, 429),
per-endpoint isolation, the outbox's crash safety and the SSRF guard at delivery time.

Every delivery goes over real HTTP to a receiver on loopback and is checked with the
`standardwebhooks` package, the way a tenant would check it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import orjson
import pytest
from aiohttp import web
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from app.core import clock
from app.core.database import create_sessionmaker, transaction
from app.core.ids import new_id
from app.core.ssrf import forbidden_reason, parse_ip_literal
from app.predictions import service as predictions_service
from app.predictions.models import PredictionStatus
from app.runtime import Runtime, build_runtime
from app.tenants.service import new_webhook_secret
from app.upstream.simulator import SimState
from app.webhooks.models import WebhookAttempt, WebhookDelivery
from app.webhooks.service import target_host
from app.worker import Worker
from tests.conftest import Api, Received, Receiver, Tenant, eventually, make_settings, valid_body

FAST = dict(webhook_retry_schedule_s=[0, 0.2, 0.2], webhook_timeout_s=2.0)


def fast(**overrides: Any) -> dict[str, Any]:
    return {**FAST, **overrides}


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    """Module default: retries a fifth of a second apart. Tests parametrize their own on top of `fast()`."""
    return fast()


# ---------------------------------------------------------------- helpers


def header(item: Received, name: str) -> str:
    for key, value in item.headers.items():
        if key.lower() == name:
            return value
    raise AssertionError(f"delivery has no {name!r} header: {item.headers}")


def verify(secret: str, item: Received) -> dict[str, Any]:
    """What a tenant's receiver does. Also checks the envelope every event shares."""
    event = Webhook(secret).verify(item.body, item.headers)
    assert isinstance(event, dict)
    assert set(event) == {"type", "timestamp", "data"}, event
    assert datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).tzinfo is not None
    assert header(item, "webhook-id").startswith("msg_")
    assert header(item, "content-type").startswith("application/json")
    sent_at = int(header(item, "webhook-timestamp"))
    assert sent_at <= datetime.now(UTC).timestamp()  # signed when sent (verify() above checks it is recent)
    for signature in header(item, "webhook-signature").split(" "):
        assert signature.startswith("v1,"), signature
    return event


def signatures(item: Received) -> list[str]:
    return header(item, "webhook-signature").split(" ")


async def submit(tenant: Tenant, **body: Any) -> dict[str, Any]:
    response = await tenant.submit(valid_body(**body))
    assert response.status_code == 200, response.text
    return dict(response.json())


async def prediction(tenant: Tenant, prediction_id: str) -> dict[str, Any]:
    response = await tenant.get(f"/api/v1/predictions/{prediction_id}")
    assert response.status_code == 200, response.text
    return dict(response.json())


async def wait_terminal(tenant: Tenant, prediction_id: str) -> dict[str, Any]:
    async def done() -> bool:
        return (await prediction(tenant, prediction_id))["status"] in ("completed", "failed")

    await eventually(done, what=f"{prediction_id} terminal")
    return await prediction(tenant, prediction_id)


async def deliveries(tenant: Tenant, **params: str) -> list[dict[str, Any]]:
    response = await tenant.get("/api/v1/webhook-deliveries", params=params)
    assert response.status_code == 200, response.text
    return list(response.json()["data"])


async def delivery(tenant: Tenant, delivery_id: str) -> dict[str, Any]:
    response = await tenant.get(f"/api/v1/webhook-deliveries/{delivery_id}")
    assert response.status_code == 200, response.text
    return dict(response.json())


async def wait_delivery(tenant: Tenant, delivery_id: str, check: Callable[[dict[str, Any]], bool], what: str) -> dict:
    async def ok() -> bool:
        return check(await delivery(tenant, delivery_id))

    await eventually(ok, what=what)
    return await delivery(tenant, delivery_id)


async def only_delivery(tenant: Tenant) -> dict[str, Any]:
    async def one() -> bool:
        return len(await deliveries(tenant)) == 1

    await eventually(one, what="one delivery row")
    return (await deliveries(tenant))[0]


async def db_row(rt: Runtime, delivery_id: str) -> WebhookDelivery:
    async with transaction(rt.sessions) as session:
        row = await session.get(WebhookDelivery, delivery_id)
        assert row is not None
        return row


async def db_attempts(rt: Runtime, delivery_id: str) -> list[WebhookAttempt]:
    async with transaction(rt.sessions) as session:
        rows = await session.scalars(
            select(WebhookAttempt).where(WebhookAttempt.delivery_id == delivery_id).order_by(WebhookAttempt.id)
        )
        return list(rows)


async def insert_deliveries(rt: Runtime, rows: list[dict[str, Any]]) -> list[str]:
    """Outbox rows written straight into the database (one transaction), bypassing the API."""
    ids = []
    async with transaction(rt.sessions) as session:
        for spec in rows:
            now = clock.now()
            url = spec.pop("url")
            data = spec.pop("data", {"n": len(ids)})
            event_type = spec.pop("event_type", "prediction.completed")
            delivery_id = new_id("msg")
            body = orjson.dumps({"type": event_type, "timestamp": now.isoformat(), "data": data}).decode()
            values: dict[str, Any] = dict(
                id=delivery_id,
                prediction_id=None,
                event_type=event_type,
                url=url,
                target_host=target_host(url),
                payload=body,
                status="pending",
                attempts=0,
                next_attempt_at=now,
                created_at=now,
            )
            values.update(spec)
            session.add(WebhookDelivery(**values))
            ids.append(delivery_id)
    return ids


@contextlib.asynccontextmanager
async def fresh_worker(
    engine: AsyncEngine, database_url: str, sim_url: str, overrides: dict[str, Any]
) -> AsyncIterator[Runtime]:
    """A new process's worth of background work: its own runtime, pool of HTTP clients and worker id."""
    rt = build_runtime(make_settings(database_url, sim_url, **overrides), engine, create_sessionmaker(engine))
    process = Worker(rt)
    task = asyncio.create_task(process.run())
    try:
        yield rt
    finally:
        process.stop()
        await asyncio.wait_for(task, 30)
        await rt.close()


# A receiver the conftest one cannot be: records every method, counts requests open at once, notices
# when the client hangs up (handler cancellation), and can hold requests until the test ends.


@dataclass
class Server:
    url: str
    status: int = 204
    delay_s: float = 0.0
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path)
    open_now: int = 0
    max_open: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)


@pytest.fixture
async def server_factory() -> AsyncIterator[Callable[..., Awaitable[Server]]]:
    runners: list[tuple[web.AppRunner, Server]] = []

    async def make(**options: Any) -> Server:
        server: Server | None = None

        async def handle(request: web.Request) -> web.Response:
            assert server is not None
            server.requests.append((request.method, request.path))
            server.open_now += 1
            server.max_open = max(server.max_open, server.open_now)
            try:
                await request.read()
                if server.delay_s:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(server.release.wait(), server.delay_s)
                return web.Response(status=server.status)
            finally:
                server.open_now -= 1

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        server = Server(url=f"http://127.0.0.1:{port}/hooks", **options)
        runners.append((runner, server))
        return server

    yield make
    for runner, server in runners:
        server.release.set()
        await runner.cleanup()


# ---------------------------------------------------------------- signatures and event shapes


async def test_completed_event_is_signed_and_carries_exactly_the_prediction(
    live_api: Api, worker: Any, sim: SimState, receiver_factory: Any
) -> None:
    receiver: Receiver = await receiver_factory()
    tenant = await live_api.tenant(webhookUrl=receiver.url)
    secret = tenant.data["webhookSecret"]
    assert secret.startswith("whsec_")
    pred = await submit(tenant, metadata={"order": 7, "tags": ["a", "b"], "nested": {"x": None}})

    item = await receiver.next()
    event = verify(secret, item)
    assert event["type"] == "prediction.completed"
    final = await prediction(tenant, pred["id"])
    assert final["status"] == "completed"
    assert event["data"] == final
    assert event["data"]["metadata"] == {"order": 7, "tags": ["a", "b"], "nested": {"x": None}}
    assert len(signatures(item)) == 1
    row = await only_delivery(tenant)
    assert row["id"] == header(item, "webhook-id")
    assert row["eventType"] == "prediction.completed"
    assert row["predictionId"] == pred["id"]

    # A tampered body, a wrong secret and a replayed (stale) message must all be rejected.
    tampered = item.body.replace('"order":7', '"order":8')
    assert tampered != item.body
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(tampered, item.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(new_webhook_secret()).verify(item.body, item.headers)

    msg_id = header(item, "webhook-id")
    stale = datetime.now(UTC) - timedelta(minutes=5, seconds=30)
    resigned = {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(stale.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, stale, item.body),
    }
    with pytest.raises(WebhookVerificationError, match="too old"):
        Webhook(secret).verify(item.body, resigned)
    # The same re-signing inside the tolerance verifies: the failure above is the timestamp's alone.
    recent = datetime.now(UTC) - timedelta(minutes=4)
    resigned_recent = {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(recent.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, recent, item.body),
    }
    assert Webhook(secret).verify(item.body, resigned_recent) == event
    # Moving only the timestamp header breaks the signature, which covers the timestamp.
    shifted = {**item.headers, "webhook-timestamp": str(int(header(item, "webhook-timestamp")) - 1)}
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(item.body, shifted)


async def test_failed_event(live_api: Api, worker: Any, sim: SimState, receiver_factory: Any) -> None:
    sim.config.failure_ratio = 1.0
    receiver: Receiver = await receiver_factory()
    tenant = await live_api.tenant(webhookUrl=receiver.url)
    pred = await submit(tenant, metadata={"job": "f"})

    event = verify(tenant.data["webhookSecret"], await receiver.next())
    assert event["type"] == "prediction.failed"
    final = await prediction(tenant, pred["id"])
    assert final["status"] == "failed"
    assert final["error"]
    assert event["data"] == final
    row = await only_delivery(tenant)
    assert row["eventType"] == "prediction.failed"


async def test_request_webhook_overrides_tenant_endpoint(
    live_api: Api, worker: Any, sim: SimState, receiver_factory: Any
) -> None:
    default: Receiver = await receiver_factory()
    override: Receiver = await receiver_factory()
    tenant = await live_api.tenant(webhookUrl=default.url)
    pred = await submit(tenant, webhook=override.url)

    event = verify(tenant.data["webhookSecret"], await override.next())
    assert event["type"] == "prediction.completed"
    assert event["data"] == await prediction(tenant, pred["id"])
    row = await only_delivery(tenant)
    assert row["url"] == override.url
    # The one row went to the override, so the tenant's default endpoint can never get this event.
    assert default.received == []


async def test_events_filter_suppresses_completed_event(
    live_api: Api, worker: Any, sim: SimState, receiver_factory: Any
) -> None:
    receiver: Receiver = await receiver_factory()
    tenant = await live_api.tenant(webhookUrl=receiver.url)
    filtered = await submit(tenant, webhookEventsFilter=["failed"])
    assert (await wait_terminal(tenant, filtered["id"]))["status"] == "completed"
    # The delivery row would have been written in the transaction that made it completed.
    assert await deliveries(tenant) == []
    assert receiver.received == []

    # Control: the same tenant and endpoint do get an event the filter lets through.
    wanted = await submit(tenant, webhookEventsFilter=["completed"])
    event = verify(tenant.data["webhookSecret"], await receiver.next())
    assert event["type"] == "prediction.completed"
    assert event["data"]["id"] == wanted["id"]
    rows = await deliveries(tenant)
    assert [r["predictionId"] for r in rows] == [wanted["id"]]


# ---------------------------------------------------------------- budget thresholds


@pytest.mark.parametrize("settings_overrides", [fast(price_table={"ltx-2-19b": {"480p": 0.2}})])
async def test_budget_threshold_events_once_per_period(
    live_api: Api, worker: Any, sim: SimState, receiver_factory: Any, settings_overrides: dict[str, Any]
) -> None:
    # The low price table lets a third prediction (a new price point, estimated at 2 cents) be
    # admitted at 18 of 20 cents; the vendor then charges 11, which crosses 100 %.
    receiver: Receiver = await receiver_factory()
    sink: Receiver = await receiver_factory()  # prediction events go here, budget events to the tenant
    tenant = await live_api.tenant(budgetCents=20, budgetPeriod="day", webhookUrl=receiver.url)
    secret = tenant.data["webhookSecret"]

    async def threshold_rows() -> list[dict[str, Any]]:
        return [d for d in await deliveries(tenant, limit="100") if d["eventType"] == "budget.threshold"]

    async def next_threshold() -> dict[str, Any]:
        event = verify(secret, await receiver.next())
        assert event["type"] == "budget.threshold"
        return dict(event["data"])

    p1 = await submit(tenant, webhook=sink.url)
    assert p1["costCents"] == 9
    assert await threshold_rows() == []  # 9 of 20 is 45 %

    await submit(tenant, webhook=sink.url)  # 18 of 20: 90 %, past 50 and 80
    assert len(await threshold_rows()) == 2
    events = [await next_threshold(), await next_threshold()]
    assert sorted(e["percent"] for e in events) == [50, 80]
    for data in events:
        assert data["tenantId"] == tenant.id
        assert data["budgetCents"] == 20
        assert (data["spentCents"], data["reservedCents"]) == (18, 0)  # including the charge that crossed
        assert data["period"] == "day"

    p3 = await submit(tenant, webhook=sink.url, duration=6)
    assert p3["costCents"] == 11
    rows = await threshold_rows()
    assert len(rows) == 3, rows  # 50 and 80 are not sent again
    hundred = await next_threshold()
    assert hundred["percent"] == 100
    assert (hundred["spentCents"], hundred["reservedCents"]) == (29, 0)
    assert hundred["periodStart"] == events[0]["periodStart"]

    refused = await tenant.submit(valid_body())
    assert refused.status_code == 402
    for _ in range(3):
        verify(secret, await sink.next())
    assert len(await threshold_rows()) == 3
    assert len(receiver.received) == 3

    # The next period starts afresh: 50 and 80 again, once, with the new period's start.
    period_end = datetime.fromisoformat(hundred["periodEnd"].replace("Z", "+00:00"))
    clock.shift_to(period_end + timedelta(minutes=1))
    await submit(tenant, webhook=sink.url)
    await submit(tenant, webhook=sink.url)
    assert len(await threshold_rows()) == 5
    again = [await next_threshold(), await next_threshold()]
    assert sorted(e["percent"] for e in again) == [50, 80]
    assert {e["periodStart"] for e in again} == {hundred["periodEnd"]}
    assert {e["spentCents"] for e in again} == {18}


@pytest.mark.parametrize("settings_overrides", [fast(keep_failed_charge=False)])
async def test_budget_threshold_not_repeated_when_spend_dips_and_recrosses(
    live_api: Api, worker: Any, sim: SimState, receiver_factory: Any, settings_overrides: dict[str, Any]
) -> None:
    receiver: Receiver = await receiver_factory()
    sink: Receiver = await receiver_factory()
    tenant = await live_api.tenant(budgetCents=20, webhookUrl=receiver.url)

    async def threshold_rows() -> list[dict[str, Any]]:
        return [d for d in await deliveries(tenant, limit="100") if d["eventType"] == "budget.threshold"]

    await submit(tenant, webhook=sink.url)
    sim.config.failure_ratio = 1.0
    doomed = await submit(tenant, webhook=sink.url)  # 18 of 20: 50 and 80 are reached
    sim.config.failure_ratio = 0.0
    assert len(await threshold_rows()) == 2
    assert (await wait_terminal(tenant, doomed["id"]))["status"] == "failed"
    assert (await tenant.get("/api/v1/usage")).json()["spentCents"] == 9  # refunded: back under 50 %

    await submit(tenant, webhook=sink.url)  # 18 of 20 again, in the same period
    assert len(await threshold_rows()) == 2
    percents = sorted(
        [verify(tenant.data["webhookSecret"], await receiver.next())["data"]["percent"] for _ in range(2)]
    )
    assert percents == [50, 80]
    for _ in range(3):
        await sink.next()
    assert len(await threshold_rows()) == 2
    assert len(receiver.received) == 2


# ---------------------------------------------------------------- secret rotation


async def test_secret_rotation_signs_with_both_until_grace_ends(
    live_api: Api, worker: Any, sim: SimState, receiver_factory: Any
) -> None:
    receiver: Receiver = await receiver_factory()
    tenant = await live_api.tenant(webhookUrl=receiver.url)
    old = tenant.data["webhookSecret"]

    await submit(tenant)
    before = await receiver.next()
    assert len(signatures(before)) == 1
    verify(old, before)

    rotating = clock.now().replace(microsecond=0)
    rotated = await live_api.admin("POST", f"/admin/v1/tenants/{tenant.id}/webhook-secret/rotate")
    rotated_by = clock.now()
    assert rotated.status_code == 200, rotated.text
    new = rotated.json()["webhookSecret"]
    assert new.startswith("whsec_") and new != old
    expires = datetime.fromisoformat(rotated.json()["previousSecretExpiresAt"].replace("Z", "+00:00"))
    grace = live_api.runtime.settings.webhook_secret_grace_s
    assert rotating + timedelta(seconds=grace) <= expires <= rotated_by + timedelta(seconds=grace)

    pred = await submit(tenant)
    during = await receiver.next()
    assert len(signatures(during)) == 2
    assert verify(old, during)["data"]["id"] == pred["id"]
    assert verify(new, during)["data"]["id"] == pred["id"]
    with pytest.raises(WebhookVerificationError):
        Webhook(new_webhook_secret()).verify(during.body, during.headers)

    clock.shift_to(expires + timedelta(seconds=1))
    await submit(tenant)
    after = await receiver.next()
    assert len(signatures(after)) == 1
    verify(new, after)
    with pytest.raises(WebhookVerificationError):
        Webhook(old).verify(after.body, after.headers)


# ---------------------------------------------------------------- retries, dead letters, redelivery


async def test_retries_keep_the_webhook_id_until_a_2xx(
    live_api: Api, worker: Any, sim: SimState, receiver_factory: Any
) -> None:
    receiver: Receiver = await receiver_factory(statuses=[500, 500])
    tenant = await live_api.tenant(webhookUrl=receiver.url)
    pred = await submit(tenant)

    success = await receiver.next()
    msg_id = header(success, "webhook-id")
    assert len(receiver.received) == 3
    assert [header(r, "webhook-id") for r in receiver.received] == [msg_id] * 3
    assert {r.body for r in receiver.received} == {success.body}
    for attempt in receiver.received:
        assert verify(tenant.data["webhookSecret"], attempt)["data"]["id"] == pred["id"]

    row = await wait_delivery(tenant, msg_id, lambda d: d["status"] == "succeeded", "succeeded")
    assert row["attempts"] == 3
    assert row["lastStatusCode"] == 204
    assert row["deliveredAt"] is not None
    assert [a["statusCode"] for a in row["attemptLog"]] == [500, 500, 204]


@pytest.mark.parametrize("settings_overrides", [fast(webhook_retry_schedule_s=[0, 0.1, 0.1])])
async def test_always_failing_receiver_goes_dead_and_operator_redelivers(
    live_api: Api, worker: Any, sim: SimState, receiver_factory: Any, settings_overrides: dict[str, Any]
) -> None:
    schedule = settings_overrides["webhook_retry_schedule_s"]
    receiver: Receiver = await receiver_factory(default_status=500)
    tenant = await live_api.tenant(webhookUrl=receiver.url)
    await submit(tenant)
    row = await only_delivery(tenant)
    dead = await wait_delivery(tenant, row["id"], lambda d: d["status"] == "dead", "dead")
    assert dead["attempts"] == len(schedule)
    assert [a["statusCode"] for a in dead["attemptLog"]] == [500] * len(schedule)
    assert dead["lastStatusCode"] == 500
    assert dead["nextAttemptAt"] is None
    assert len(receiver.received) == len(schedule)
    assert {header(r, "webhook-id") for r in receiver.received} == {row["id"]}
    for attempt in receiver.received:
        verify(tenant.data["webhookSecret"], attempt)

    listed = await live_api.admin("GET", "/admin/v1/webhook-deliveries", params={"status": "dead"})
    assert listed.status_code == 200
    assert [d["id"] for d in listed.json()["data"]] == [row["id"]]
    pending = await live_api.admin("GET", "/admin/v1/webhook-deliveries", params={"status": "pending"})
    assert pending.json()["data"] == []

    receiver.default_status = 204
    again = await live_api.admin("POST", f"/admin/v1/webhook-deliveries/{row['id']}/redeliver")
    assert again.status_code == 202, again.text
    assert again.json()["status"] == "pending"
    item = await receiver.next()
    assert header(item, "webhook-id") == row["id"]
    assert item.body == receiver.received[0].body
    assert verify(tenant.data["webhookSecret"], item)["type"] == "prediction.completed"
    done = await wait_delivery(tenant, row["id"], lambda d: d["status"] == "succeeded", "redelivered")
    assert [a["statusCode"] for a in done["attemptLog"]] == [500] * len(schedule) + [204]
    listed = await live_api.admin("GET", "/admin/v1/webhook-deliveries", params={"status": "dead"})
    assert listed.json()["data"] == []


# ---------------------------------------------------------------- what receivers answer


@pytest.mark.parametrize("status", [302, 307])
@pytest.mark.parametrize("settings_overrides", [fast(webhook_retry_schedule_s=[0])])
async def test_redirect_is_a_failure_and_is_not_followed(
    live_api: Api,
    worker: Any,
    sim: SimState,
    receiver_factory: Any,
    server_factory: Any,
    status: int,
    settings_overrides: dict[str, Any],
) -> None:
    trap: Server = await server_factory()  # answers 204 to any method: following would "succeed"
    receiver: Receiver = await receiver_factory(default_status=status, headers_to_send={"Location": trap.url})
    tenant = await live_api.tenant(webhookUrl=receiver.url)
    await submit(tenant)
    row = await only_delivery(tenant)
    dead = await wait_delivery(tenant, row["id"], lambda d: d["status"] == "dead", "dead after one attempt")
    assert dead["lastStatusCode"] == status
    assert dead["deliveredAt"] is None
    assert [a["statusCode"] for a in dead["attemptLog"]] == [status]
    assert len(receiver.received) == 1
    verify(tenant.data["webhookSecret"], receiver.received[0])
    assert trap.requests == []


async def test_410_gone_kills_the_delivery_and_disables_the_endpoint(
    live_api: Api, worker: Any, sim: SimState, receiver_factory: Any
) -> None:
    receiver: Receiver = await receiver_factory(statuses=[410])
    tenant = await live_api.tenant(webhookUrl=receiver.url)
    await submit(tenant)
    row = await only_delivery(tenant)
    dead = await wait_delivery(tenant, row["id"], lambda d: d["status"] == "dead", "dead on 410")
    assert dead["attempts"] == 1  # no retries, though the schedule has three
    assert dead["lastStatusCode"] == 410
    assert "410" in (dead["lastError"] or "")
    shown = (await live_api.admin("GET", f"/admin/v1/tenants/{tenant.id}")).json()
    assert shown["webhookDisabledAt"] is not None
    assert shown["webhookUrl"] == receiver.url
    verify(tenant.data["webhookSecret"], receiver.received[0])

    # While disabled, events are not queued for the endpoint at all.
    second = await submit(tenant)
    await wait_terminal(tenant, second["id"])
    assert [d["id"] for d in await deliveries(tenant)] == [row["id"]]
    assert len(receiver.received) == 1

    patched = await live_api.admin("PATCH", f"/admin/v1/tenants/{tenant.id}", json={"webhookUrl": receiver.url})
    assert patched.status_code == 200, patched.text
    assert patched.json()["webhookDisabledAt"] is None
    third = await submit(tenant)
    event = verify(tenant.data["webhookSecret"], await receiver.next())
    assert event["data"]["id"] == third["id"]


def _in_60s_as_http_date() -> str:
    return format_datetime(datetime.now(UTC) + timedelta(seconds=60), usegmt=True)


@pytest.mark.parametrize(
    ("retry_after", "at_least_s"),
    [("60", 60), ("http-date", 55)],
    ids=["delay-seconds", "http-date"],
)
async def test_429_retry_after_is_honoured(
    live_api: Api, worker: Any, sim: SimState, receiver_factory: Any, retry_after: str, at_least_s: float
) -> None:
    # RFC 9110 section 10.2.3: Retry-After is delay-seconds or an HTTP-date.
    value = _in_60s_as_http_date() if retry_after == "http-date" else retry_after
    receiver: Receiver = await receiver_factory(default_status=429, headers_to_send={"Retry-After": value})
    tenant = await live_api.tenant(webhookUrl=receiver.url)
    await submit(tenant)
    row = await only_delivery(tenant)
    await wait_delivery(tenant, row["id"], lambda d: d["attempts"] == 1, "first attempt")

    stored = await db_row(live_api.runtime, row["id"])
    attempts = await db_attempts(live_api.runtime, row["id"])
    assert stored.status == "pending"
    assert stored.last_status_code == 429
    assert [a.status_code for a in attempts] == [429]
    assert stored.next_attempt_at is not None
    wait = (stored.next_attempt_at - attempts[0].attempted_at).total_seconds()
    # The schedule alone would retry 0.2 s later.
    assert wait >= at_least_s, f"retry planned {wait:.1f} s after a 429 with Retry-After: {value}"
    assert len(receiver.received) == 1
    verify(tenant.data["webhookSecret"], receiver.received[0])


# ---------------------------------------------------------------- isolation between endpoints


@pytest.mark.parametrize(
    "settings_overrides",
    [fast(webhook_timeout_s=3.0, webhook_per_endpoint_concurrency=4, webhook_retry_schedule_s=[0, 60])],
)
async def test_slow_receiver_neither_blocks_others_nor_exceeds_its_cap(
    live_api: Api,
    worker: Any,
    sim: SimState,
    receiver_factory: Any,
    server_factory: Any,
    settings_overrides: dict[str, Any],
) -> None:
    cap = settings_overrides["webhook_per_endpoint_concurrency"]
    # Holds every request far past the timeout, until the test releases it or the client hangs up.
    slow: Server = await server_factory(delay_s=60.0)
    fast_receiver: Receiver = await receiver_factory()
    slow_tenant = await live_api.tenant(name="slow", webhookUrl=slow.url)
    fast_tenant = await live_api.tenant(name="fast", webhookUrl=fast_receiver.url)
    rt = live_api.runtime
    earlier = clock.now() - timedelta(seconds=10)
    # The slow endpoint's events are older, so they are first in line for every claim.
    inserted = await insert_deliveries(
        rt,
        [{"tenant_id": slow_tenant.id, "url": slow.url, "next_attempt_at": earlier} for _ in range(8)]
        + [{"tenant_id": fast_tenant.id, "url": fast_receiver.url} for _ in range(8)],
    )
    slow_ids = inserted[:8]

    async def slow_attempts() -> list[int]:
        return [(await db_row(rt, i)).attempts for i in slow_ids]

    seen = set()
    for _ in range(8):
        seen.add(header(await fast_receiver.next(timeout=10), "webhook-id"))
    assert seen == set(inserted[8:])
    # All eight fast events arrived before even the first slow request timed out...
    assert await slow_attempts() == [0] * 8, "fast deliveries waited behind a slow timeout"
    # ...while the slow endpoint held as many requests as its cap allows, and no more.
    assert len(slow.requests) == cap
    assert slow.open_now == cap
    for item in fast_receiver.received:
        verify(fast_tenant.data["webhookSecret"], item)

    async def first_batch_timed_out() -> bool:
        return sorted(await slow_attempts()) == [0] * (8 - cap) + [1] * cap and slow.open_now == 1

    # An endpoint that answered nothing gets one delivery at a time until it answers again: a dead
    # receiver must not sit on `cap` slots for a whole timeout, again and again.
    await eventually(first_batch_timed_out, timeout=20, what="the first slow batch to time out, one more to start")
    assert len(slow.requests) == cap + 1
    timed_out = [i for i in slow_ids if (await db_row(rt, i)).attempts == 1]
    for delivery_id in timed_out:
        row = await db_row(rt, delivery_id)
        assert row.status == "pending"
        assert row.last_status_code is None
        assert (row.last_error or "").startswith("timed out"), row.last_error

    slow.release.set()  # the receiver recovers: the held request is answered 204, the rest follow

    async def rest_succeeded() -> bool:
        rows = [await db_row(rt, i) for i in slow_ids if i not in timed_out]
        return all(r.status == "succeeded" for r in rows)

    await eventually(rest_succeeded, what="the held slow deliveries to succeed")
    assert slow.max_open == cap, f"{slow.max_open} requests open at once on one endpoint, cap {cap}"
    assert len(slow.requests) == 8


@pytest.mark.parametrize("settings_overrides", [fast(webhook_concurrency=2, webhook_per_endpoint_concurrency=2)])
async def test_a_full_dispatcher_refills_when_a_delivery_ends_not_on_its_idle_timer(
    live_api: Api, receiver_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import app.worker

    # Were the refill left to the idle timer, 2 slots for 10 deliveries would take 4 more minutes.
    monkeypatch.setattr(app.worker, "IDLE_DISPATCH_S", 60.0)
    monkeypatch.setattr(app.worker, "IDLE_POLL_S", 60.0)
    receiver: Receiver = await receiver_factory()
    tenant = await live_api.tenant(name="refill", webhookUrl=receiver.url)
    inserted = await insert_deliveries(
        live_api.runtime, [{"tenant_id": tenant.id, "url": receiver.url} for _ in range(10)]
    )
    process = Worker(live_api.runtime)
    task = asyncio.create_task(process.run())
    try:
        seen = {header(await receiver.next(timeout=10), "webhook-id") for _ in range(10)}
    finally:
        process.stop()
        await asyncio.wait_for(task, 30)
    assert seen == set(inserted)


# ---------------------------------------------------------------- crash safety


async def test_outbox_row_committed_with_terminal_state_is_delivered_by_a_fresh_worker(
    live_api: Api,
    sim: SimState,
    receiver_factory: Any,
    engine: AsyncEngine,
    database_url: str,
    sim_url: str,
    settings_overrides: dict[str, Any],
) -> None:
    receiver: Receiver = await receiver_factory()
    tenant = await live_api.tenant(webhookUrl=receiver.url)
    pred = await submit(tenant, metadata={"crash": True})
    rt = live_api.runtime

    # The prediction becomes terminal while no worker runs: the outbox row is committed with the state
    # change, and nothing delivers it (as if the process died right after the commit).
    async with transaction(rt.sessions) as session:
        finishing = predictions_service.Finish(
            pred["id"],
            PredictionStatus.COMPLETED,
            outputs=["https://cdn.example.com/out.mp4"],
            error=None,
            completed_at=None,
        )
        done = await predictions_service.finish_many(session, rt, [finishing], lease_owner=None)
        assert pred["id"] in done
    assert (await prediction(tenant, pred["id"]))["status"] == "completed"
    row = await only_delivery(tenant)
    assert row["status"] == "pending"
    assert row["attempts"] == 0
    assert row["predictionId"] == pred["id"]
    assert receiver.received == []

    async with fresh_worker(engine, database_url, sim_url, settings_overrides) as other:
        item = await receiver.next()
        event = verify(tenant.data["webhookSecret"], item)
        assert event["type"] == "prediction.completed"
        assert event["data"] == await prediction(tenant, pred["id"])
        assert header(item, "webhook-id") == row["id"]
        await wait_delivery(tenant, row["id"], lambda d: d["status"] == "succeeded", "succeeded")
        attempts = await db_attempts(other, row["id"])
        assert [(a.status_code, a.worker) for a in attempts] == [(204, other.worker_id)]
    assert len(receiver.received) == 1


async def test_delivery_leased_by_a_dead_worker_is_taken_over_once(
    live_api: Api,
    sim: SimState,
    receiver_factory: Any,
    engine: AsyncEngine,
    database_url: str,
    sim_url: str,
    settings_overrides: dict[str, Any],
) -> None:
    receiver: Receiver = await receiver_factory()
    tenant = await live_api.tenant(webhookUrl=receiver.url)
    rt = live_api.runtime
    now = clock.now()
    orphan, held = await insert_deliveries(
        rt,
        [
            {"tenant_id": tenant.id, "url": receiver.url, "data": {"which": "orphan"}},
            {"tenant_id": tenant.id, "url": receiver.url, "data": {"which": "held"}},
        ],
    )
    async with transaction(rt.sessions) as session:
        await session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == orphan)
            .values(lease_owner="worker-that-died", lease_expires_at=now - timedelta(seconds=1))
        )
        # Control: a lease that is still valid belongs to a live worker and must be left alone.
        await session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == held)
            .values(lease_owner="worker-still-alive", lease_expires_at=now + timedelta(minutes=5))
        )

    async with fresh_worker(engine, database_url, sim_url, settings_overrides) as other:
        item = await receiver.next()
        assert header(item, "webhook-id") == orphan
        assert verify(tenant.data["webhookSecret"], item)["data"] == {"which": "orphan"}
        await wait_delivery(tenant, orphan, lambda d: d["status"] == "succeeded", "orphan delivered")
        attempts = await db_attempts(other, orphan)
        assert [(a.status_code, a.worker) for a in attempts] == [(204, other.worker_id)]
        row = await db_row(other, orphan)
        assert row.attempts == 1 and row.lease_owner is None
        untouched = await db_row(other, held)
        assert untouched.attempts == 0
        assert untouched.lease_owner == "worker-still-alive"
    assert len(receiver.received) == 1


# ---------------------------------------------------------------- SSRF guard at delivery time


def _hostname_resolving_to_forbidden() -> str | None:
    """This machine's name when it resolves only to forbidden addresses: a DNS name the URL check passes
    and the connect-time resolver must refuse."""
    name = socket.gethostname()
    try:
        infos = socket.getaddrinfo(name, 80, type=socket.SOCK_STREAM)
    except OSError:
        return None
    addresses = {info[4][0] for info in infos}
    if not addresses:
        return None
    for address in addresses:
        ip = parse_ip_literal(str(address).split("%")[0])
        if ip is None or forbidden_reason(ip) is None:
            return None
    return name


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "2130706433", "machine-hostname"])
@pytest.mark.parametrize("settings_overrides", [fast(webhook_allow_private=False, webhook_retry_schedule_s=[0, 60])])
async def test_dispatcher_refuses_private_targets_at_delivery_time(
    live_api: Api,
    worker: Any,
    sim: SimState,
    receiver_factory: Any,
    host: str,
    settings_overrides: dict[str, Any],
) -> None:
    if host == "machine-hostname":
        resolved = _hostname_resolving_to_forbidden()
        if resolved is None:
            pytest.skip("this machine's hostname does not resolve to a private address")
        host = resolved
    receiver: Receiver = await receiver_factory()
    port = receiver.url.split(":")[2].split("/")[0]
    url = f"http://{host}:{port}/hooks"
    tenant = await live_api.tenant()
    if host != socket.gethostname():
        # Literals and internal names are refused at registration already; the row below bypasses that.
        refused = await live_api.admin("PATCH", f"/admin/v1/tenants/{tenant.id}", json={"webhookUrl": url})
        assert refused.status_code == 422, refused.text
    [delivery_id] = await insert_deliveries(live_api.runtime, [{"tenant_id": tenant.id, "url": url}])

    row = await wait_delivery(tenant, delivery_id, lambda d: d["attempts"] >= 1, "the attempt")
    assert row["status"] == "pending"
    assert row["lastStatusCode"] is None
    [attempt] = row["attemptLog"]
    assert attempt["statusCode"] is None
    assert (attempt["error"] or "").startswith("refused"), attempt["error"]
    assert receiver.received == []
