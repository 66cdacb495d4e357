"""Submit to terminal through the real poller, in process, against the simulator over HTTP."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook

from app.upstream.simulator import SimState
from tests.conftest import Api, Receiver, eventually, valid_body


async def _status(tenant: Any, prediction_id: str) -> str:
    return str((await tenant.get(f"/api/v1/predictions/{prediction_id}")).json()["status"])


async def test_submit_poll_complete_and_webhook(
    live_api: Api, worker: Any, sim: SimState, receiver_factory: Any
) -> None:
    receiver: Receiver = await receiver_factory()
    tenant = await live_api.tenant(webhookUrl=receiver.url)
    submitted = await tenant.submit(valid_body(metadata={"order": 7}))
    assert submitted.status_code == 200, submitted.text
    body = submitted.json()
    assert body["id"].startswith("pred_")
    assert body["status"] == "processing"
    assert body["statusUrl"] == f"http://gateway.test/api/v1/predictions/{body['id']}"
    assert body["costCents"] == 9
    assert not body["id"].startswith("vd_")

    delivery = await receiver.next()
    event = Webhook(tenant.data["webhookSecret"]).verify(delivery.body, delivery.headers)
    assert event["type"] == "prediction.completed"

    final = (await tenant.get(f"/api/v1/predictions/{body['id']}")).json()
    assert final["status"] == "completed"
    (link,) = final["outputs"]  # our copy, not the vendor's URL (SPEC section 8)
    assert link.startswith(f"http://gateway.test/outputs/{body['id']}/0.mp4?")
    assert final["metadata"] == {"order": 7}
    assert event["data"] == final
    polls = sim.polls_by_id[next(iter(sim.predictions))]
    assert 1 <= polls <= 3


async def test_prefer_wait_returns_terminal_state(live_api: Api, worker: Any, sim: SimState) -> None:
    tenant = await live_api.tenant()
    response = await tenant.submit(valid_body(), Prefer="wait=10")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "completed"
    assert body["outputs"] and body["completedAt"]
    assert response.headers["preference-applied"] == "wait=10"


async def test_prefer_wait_times_out_with_current_state(live_api: Api, sim: SimState) -> None:
    # No worker runs, so the prediction cannot finish: the answer comes back after N s, still processing.
    tenant = await live_api.tenant()
    response = await tenant.submit(valid_body(), Prefer="wait=1")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "processing"
    assert body["outputs"] is None and body["completedAt"] is None


@pytest.mark.parametrize("settings_overrides", [{"keep_failed_charge": True}, {"keep_failed_charge": False}])
async def test_failed_prediction_copies_upstream_error(
    live_api: Api, worker: Any, sim: SimState, settings_overrides: dict[str, Any]
) -> None:
    sim.config.failure_ratio = 1.0
    tenant = await live_api.tenant()
    pred = (await tenant.submit()).json()
    await eventually(lambda: _is(tenant, pred["id"], "failed"), what="failed status")
    final = (await tenant.get(f"/api/v1/predictions/{pred['id']}")).json()
    assert final["error"] == "Content moderation: the prompt was flagged (simulated)"
    usage = (await tenant.get("/api/v1/usage")).json()
    expected = 9 if settings_overrides["keep_failed_charge"] else 0
    assert usage["spentCents"] == expected
    assert final["costCents"] == expected


async def _is(tenant: Any, prediction_id: str, status: str) -> bool:
    return await _status(tenant, prediction_id) == status


async def test_upstream_500s_then_outage_every_prediction_still_ends(live_api: Api, worker: Any, sim: SimState) -> None:
    tenant = await live_api.tenant()
    sim.config.completion_s = 3600  # nothing finishes until the outage is over
    sim.faults.poll_count = 6
    sim.faults.poll_status = 500
    ids = [(await tenant.submit()).json()["id"] for _ in range(5)]
    await eventually(lambda: _faults_used(sim), what="the 500s to be served")
    # Then the upstream is unreachable (connection refused) for a while.
    upstream = live_api.runtime.upstream
    real_base = upstream._base
    upstream._base = "http://127.0.0.1:9"
    refused_before = _poll_errors()
    await eventually(lambda: _more_errors(refused_before, 5), what="polls against the dead upstream")
    assert all([await _is(tenant, pid, "processing") for pid in ids])
    upstream._base = real_base
    for simulated in sim.predictions.values():
        simulated.done_at = time.time()
    for prediction_id in ids:
        await eventually(lambda pid=prediction_id: _is(tenant, pid, "completed"), timeout=30, what="completion")


async def _faults_used(sim: SimState) -> bool:
    return sim.faults.poll_count == 0


def _poll_errors() -> float:
    from app.core import metrics

    return sum(
        sample.value
        for family in metrics.UPSTREAM_ERRORS.collect()
        for sample in family.samples
        if sample.name.endswith("_total") and sample.labels.get("op") == "poll"
    )


async def _more_errors(before: float, count: int) -> bool:
    return _poll_errors() - before >= count


@pytest.mark.parametrize("settings_overrides", [{"prediction_max_age_s": 1.0}])
async def test_prediction_past_max_age_fails_with_gateway_message(
    live_api: Api, worker: Any, sim: SimState, settings_overrides: dict[str, Any]
) -> None:
    sim.config.completion_s = 3600
    tenant = await live_api.tenant()
    pred = (await tenant.submit()).json()
    await eventually(lambda: _is(tenant, pred["id"], "failed"), what="max-age failure")
    final = (await tenant.get(f"/api/v1/predictions/{pred['id']}")).json()
    assert final["error"].startswith("vidgate gave up")


@pytest.mark.parametrize("settings_overrides", [{"worker_concurrency": 2}])
async def test_a_full_poller_refills_when_results_are_stored_not_on_its_idle_timer(
    live_api: Api, sim: SimState, monkeypatch: pytest.MonkeyPatch, settings_overrides: dict[str, Any]
) -> None:
    import app.worker

    # Were the refill left to the idle timer, 2 rows in flight for 8 predictions would take minutes.
    monkeypatch.setattr(app.worker, "IDLE_POLL_S", 60.0)
    monkeypatch.setattr(app.worker, "IDLE_DISPATCH_S", 60.0)
    sim.config.completion_s = 0  # every first poll sees the end
    tenant = await live_api.tenant()
    ids = [(await tenant.submit(valid_body())).json()["id"] for _ in range(8)]
    process = app.worker.Worker(live_api.runtime)
    task = asyncio.create_task(process.run())
    try:

        async def all_completed() -> bool:
            return all([await _status(tenant, i) == "completed" for i in ids])

        await eventually(all_completed, timeout=10, what="every prediction to be polled to its end")
    finally:
        process.stop()
        await asyncio.wait_for(task, 30)
