"""The poller wired to the copier (SPEC section 8): a prediction the vendor reports completed stays
`processing` until every output is stored, then completes with the gateway's links and one webhook
whose `data` equals GET; pass-through with rehosting off; the bound on failing copies; `Prefer: wait`."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest
from sqlalchemy import func, select

from app.core import clock
from app.core.database import transaction
from app.outputs.models import OutputCopy
from app.predictions import poller
from app.predictions.models import Prediction
from app.runtime import Runtime
from app.upstream.simulator import SANDBOX_MP4, SimState
from app.webhooks.models import WebhookDelivery
from tests.conftest import Api, Receiver, Tenant, eventually
from tests.test_get_statements import statements
from tests.test_leases import upstream_done

# The ASGI client's base: no VIDGATE_PUBLIC_BASE_URL is set, so links start where the submit came in.
GATEWAY = "http://gateway.test"


@pytest.fixture
def settings_overrides(sim_url: str, tmp_path: Path) -> dict[str, Any]:
    return dict(
        outputs_store=str(tmp_path / "outputs"),
        output_hosts=[urlsplit(sim_url).netloc],
        output_copy_max_s=60.0,
        public_base_url=None,
    )


async def deliveries(runtime: Runtime, prediction_id: str) -> list[dict[str, Any]]:
    async with transaction(runtime.sessions, readonly=True) as session:
        rows = await session.scalars(select(WebhookDelivery).where(WebhookDelivery.prediction_id == prediction_id))
        return [orjson.loads(row.payload) for row in rows]


async def copies(runtime: Runtime) -> int:
    async with transaction(runtime.sessions, readonly=True) as session:
        return int(await session.scalar(select(func.count()).select_from(OutputCopy)) or 0)


async def until_terminal(tenant: Tenant, prediction_id: str, seen: list[str]) -> dict[str, Any]:
    final: dict[str, Any] = {}

    async def done() -> bool:
        nonlocal final
        final = (await tenant.get(f"/api/v1/predictions/{prediction_id}")).json()
        seen.append(final["status"])
        return final["status"] in ("completed", "failed")

    await eventually(done, timeout=30, what="a terminal status")
    return final


async def test_completed_means_copied_with_one_webhook_equal_to_get(
    live_api: Api, live_runtime: Runtime, worker: Any, receiver_factory: Any, sim: SimState
) -> None:
    receiver: Receiver = await receiver_factory()
    tenant = await live_api.tenant(webhookUrl=receiver.url)
    submitted = await tenant.submit()
    assert submitted.status_code == 200, submitted.text
    prediction_id = submitted.json()["id"]

    seen: list[str] = []
    final = await until_terminal(tenant, prediction_id, seen)
    assert final["status"] == "completed", final
    assert set(seen) <= {"processing", "completed"}
    (link,) = final["outputs"]
    assert link.startswith(f"{GATEWAY}/outputs/{prediction_id}/")

    # Exactly one webhook, sent after the copy, whose data is what GET answers.
    (event,) = await deliveries(live_runtime, prediction_id)
    assert event["type"] == "prediction.completed"
    assert event["data"] == final
    await receiver.arrived.get()
    assert [orjson.loads(r.body)["data"] for r in receiver.received] == [final]

    # Our copy, byte for byte, even once the vendor's file is gone.
    sim.faults.output_gone = True
    video = await live_api.http.get(link)
    assert video.status_code == 200
    assert video.content == SANDBOX_MP4.read_bytes()

    # The list shows the same link; after it expires, GET hands out a fresh one that works.
    listed = (await tenant.get("/api/v1/predictions")).json()["data"]
    assert [p["outputs"] for p in listed] == [[link]]
    clock.shift_to(clock.now() + timedelta(seconds=live_runtime.settings.output_url_ttl_s + 1))
    assert (await live_api.http.get(link)).status_code == 403
    (fresh,) = (await tenant.get(f"/api/v1/predictions/{prediction_id}")).json()["outputs"]
    assert fresh != link
    assert (await live_api.http.get(fresh)).content == SANDBOX_MP4.read_bytes()
    # A rehosted prediction is never answered from memory (its links expire): one statement reads it
    # with the files its links are made from. (The worker beside it claims due rows meanwhile, and its
    # idle copier and queue dispatcher read whether anything is due: none of that is counted.)
    with statements(live_runtime) as seen:
        again = (await tenant.get(f"/api/v1/predictions/{prediction_id}")).json()
    worker_sql = (
        "UPDATE",
        "SELECT OUTPUT_COPIES.PREDICTION_ID \nFROM OUTPUT_COPIES",
        "SELECT QUEUE_TENANTS.TENANT_ID \nFROM QUEUE_TENANTS",
    )
    reads = [s for s in seen if not s.lstrip().upper().startswith(worker_sql)]
    assert len(reads) == 1 and again["outputs"] == [fresh]


@pytest.mark.parametrize("settings_overrides", [{"rehost_outputs": False}])
async def test_without_rehosting_the_vendors_urls_pass_through(
    live_api: Api, live_runtime: Runtime, worker: Any, sim_url: str, receiver_factory: Any
) -> None:
    tenant = await live_api.tenant(webhookUrl=(await receiver_factory()).url)
    prediction_id = (await tenant.submit()).json()["id"]
    final = await until_terminal(tenant, prediction_id, [])
    assert final["status"] == "completed"
    (output,) = final["outputs"]
    assert output.startswith(f"{sim_url}/sandbox/outputs/")
    (event,) = await deliveries(live_runtime, prediction_id)
    assert event["data"] == final
    assert await copies(live_runtime) == 0


@pytest.mark.parametrize("keep", [True, False])
async def test_a_copy_failing_until_the_bound_fails_once_with_the_charge_as_set(
    live_api: Api, live_runtime: Runtime, worker: Any, sim: SimState, receiver_factory: Any, keep: bool
) -> None:
    live_runtime.settings.keep_failed_charge = keep
    sim.faults.output_gone = True
    tenant = await live_api.tenant(webhookUrl=(await receiver_factory()).url)
    submitted = (await tenant.submit()).json()
    prediction_id = submitted["id"]

    async def tried() -> bool:
        async with transaction(live_runtime.sessions, readonly=True) as session:
            job = await session.get(OutputCopy, prediction_id)
            return job is not None and job.attempts >= 1

    await eventually(tried, what="a first copy attempt")
    assert (await tenant.get(f"/api/v1/predictions/{prediction_id}")).json()["status"] == "processing"
    clock.shift_to(clock.now() + timedelta(seconds=live_runtime.settings.output_copy_max_s + 1))
    final = await until_terminal(tenant, prediction_id, [])
    assert final["status"] == "failed"
    assert final["error"].startswith("vidgate could not copy the output")
    assert submitted["costCents"] > 0
    assert final["costCents"] == (submitted["costCents"] if keep else 0)  # VIDGATE_KEEP_FAILED_CHARGE
    (event,) = await deliveries(live_runtime, prediction_id)
    assert event["type"] == "prediction.failed" and event["data"] == final
    async with transaction(live_runtime.sessions, readonly=True) as session:
        row = await session.get(Prediction, prediction_id)
        assert row is not None and row.next_poll_at is None


async def test_prefer_wait_answers_with_the_gateway_link(live_api: Api, worker: Any) -> None:
    tenant = await live_api.tenant()
    answer = await tenant.submit(Prefer="wait=20")
    body = answer.json()
    assert body["status"] == "completed", body
    (link,) = body["outputs"]
    assert link.startswith(f"{GATEWAY}/outputs/{body['id']}/")
    assert (await live_api.http.get(link)).content == SANDBOX_MP4.read_bytes()


# ---------------------------------------------------------------- a burst: each stage wakes the next


async def test_a_poll_batch_queues_its_copies_in_one_insert_and_wakes_the_next_stages(
    live_api: Api, live_runtime: Runtime, sim: SimState
) -> None:
    tenant = await live_api.tenant()
    ids = [(await tenant.submit()).json()["id"] for _ in range(6)]
    claimed = await poller.claim_due(live_runtime, 10)
    assert sorted(p.id for p in claimed) == sorted(ids)
    woken: list[str] = []
    writer = poller.Poller(
        live_runtime,
        copies_queued=lambda: woken.append("copier"),
        events_queued=lambda: woken.append("dispatcher"),
    )
    # Five completed with outputs (copied first), one failed (ends now, with its webhook).
    batch = [poller.Outcome(p, seen=upstream_done(p, "failed" if p.id == ids[0] else "completed")) for p in claimed]
    with statements(live_runtime) as seen:
        await writer.write(batch)
    # One INSERT for the batch's copy jobs, not a round trip each inside the poller's transaction.
    assert len([s for s in seen if s.lstrip().upper().startswith("INSERT INTO OUTPUT_COPIES")]) == 1
    assert await copies(live_runtime) == 5
    # Told once committed: the copier has jobs, the dispatcher a webhook.
    assert woken == ["copier", "dispatcher"]


async def test_each_stage_wakes_the_next_instead_of_waiting_for_its_idle_tick(
    live_api: Api, live_runtime: Runtime, receiver_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import app.worker

    # Left to the copier's and the dispatcher's idle ticks, the copy and the delivery would wait a minute.
    monkeypatch.setattr(app.worker, "IDLE_COPY_S", 60.0)
    monkeypatch.setattr(app.worker, "IDLE_DISPATCH_S", 60.0)
    receiver: Receiver = await receiver_factory()
    tenant = await live_api.tenant(webhookUrl=receiver.url)
    process = app.worker.Worker(live_runtime)
    idle = {"copier": asyncio.Event(), "dispatcher": asyncio.Event()}

    def watched(name: str, step: Callable[[], Awaitable[int]]) -> Callable[[], Awaitable[int]]:
        async def run_once() -> int:
            started = await step()
            if started == 0:
                idle[name].set()
            return started

        return run_once

    monkeypatch.setattr(process.copier, "run_once", watched("copier", process.copier.run_once))
    monkeypatch.setattr(process.dispatcher, "run_once", watched("dispatcher", process.dispatcher.run_once))
    task = asyncio.create_task(process.run())
    try:
        # Both found nothing and sleep their minute: from here only a wake-up brings them back sooner.
        await asyncio.wait_for(asyncio.gather(*(event.wait() for event in idle.values())), 15)
        ids = [(await tenant.submit()).json()["id"] for _ in range(3)]
        arrived = [orjson.loads((await receiver.next(timeout=30)).body)["data"] for _ in ids]
        assert sorted(data["id"] for data in arrived) == sorted(ids)
        assert {data["status"] for data in arrived} == {"completed"}
    finally:
        process.stop()
        await asyncio.wait_for(task, 30)
