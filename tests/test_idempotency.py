"""Idempotency-Key on submit (SPEC section 2): same key + same body -> the same answer, another body ->
422, still in flight -> 409, kept at least 24 h, scoped to a tenant, forgotten after a failure."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime, timedelta

import httpx
from sqlalchemy import func, select

from app.core import clock
from app.core.database import transaction
from app.predictions.models import IdempotencyKey, Prediction
from app.runtime import Runtime
from app.upstream.simulator import SimState
from app.worker import Worker
from tests.conftest import Api, Tenant, valid_body

PRICE = 9


async def spent(tenant: Tenant) -> tuple[int, int]:
    body = (await tenant.get("/api/v1/usage")).json()
    return body["spentCents"], body["reservedCents"]


async def stored_keys(rt: Runtime, tenant_id: str) -> int:
    async with transaction(rt.sessions) as session:
        count = await session.scalar(
            select(func.count()).select_from(IdempotencyKey).where(IdempotencyKey.tenant_id == tenant_id)
        )
        return int(count or 0)


async def prediction_count(rt: Runtime, tenant_id: str) -> int:
    async with transaction(rt.sessions) as session:
        count = await session.scalar(
            select(func.count()).select_from(Prediction).where(Prediction.tenant_id == tenant_id)
        )
        return int(count or 0)


def assert_fresh(response: httpx.Response) -> None:
    assert response.status_code == 200, response.text
    assert "idempotent-replayed" not in response.headers


def assert_replay(response: httpx.Response, original: httpx.Response) -> None:
    assert response.status_code == 200, response.text
    assert response.headers["idempotent-replayed"] == "true"
    assert response.json() == original.json()


async def test_concurrent_submits_with_one_key(live_api: Api, sim: SimState) -> None:
    tenant = await live_api.tenant(budgetCents=1000)
    headers = {"Idempotency-Key": "order-4711"}

    responses = await asyncio.gather(*(tenant.submit(valid_body(), **headers) for _ in range(50)))

    statuses = Counter(r.status_code for r in responses)
    assert set(statuses) <= {200, 409}, [r.text for r in responses if r.status_code not in (200, 409)][:3]
    fresh = [r for r in responses if r.status_code == 200 and "idempotent-replayed" not in r.headers]
    assert len(fresh) == 1
    original = fresh[0]
    prediction_id = original.json()["id"]
    for response in responses:
        if response.status_code == 200:
            assert response.json()["id"] == prediction_id
            if response is not original:
                assert_replay(response, original)
        else:
            assert response.headers["content-type"] == "application/problem+json"
            assert response.json()["code"] == "idempotency_key_in_flight"
    assert sim.submits == 1
    assert await spent(tenant) == (PRICE, 0)
    assert await prediction_count(live_api.runtime, tenant.id) == 1

    # Once the first request has finished, every retry is a replay of its answer.
    later = await tenant.submit(valid_body(), **headers)
    assert_replay(later, original)
    assert sim.submits == 1


async def test_same_key_other_body_is_refused(api: Api, sim: SimState) -> None:
    tenant = await api.tenant()
    first = await tenant.submit(valid_body(), **{"Idempotency-Key": "k1"})
    assert_fresh(first)

    for other in (valid_body(prompt="a dog"), valid_body(duration=6), valid_body(metadata={"a": 1})):
        reused = await tenant.submit(other, **{"Idempotency-Key": "k1"})
        assert reused.status_code == 422, reused.text
        assert reused.headers["content-type"] == "application/problem+json"
        problem = reused.json()
        assert problem["code"] == "idempotency_key_reused"
        assert problem["field"] == "Idempotency-Key"
    # Another model with the same body is another request too.
    api.runtime.settings.allowed_models = ["ltx-2-19b", "ltx-2-fast"]
    other_model = await tenant.submit(valid_body(), model="ltx-2-fast", **{"Idempotency-Key": "k1"})
    assert other_model.status_code == 422
    assert other_model.json()["code"] == "idempotency_key_reused"

    assert sim.submits == 1
    assert await spent(tenant) == (PRICE, 0)
    assert_replay(await tenant.submit(valid_body(), **{"Idempotency-Key": "k1"}), first)


async def test_same_body_with_fields_in_another_order_is_a_replay(api: Api, sim: SimState) -> None:
    tenant = await api.tenant()
    body = valid_body(seed=7, metadata={"x": 1, "y": 2})
    first = await tenant.submit(body, **{"Idempotency-Key": "k-order"})
    assert_fresh(first)
    shuffled = dict(reversed(list(body.items())))
    shuffled["metadata"] = {"y": 2, "x": 1}
    assert_replay(await tenant.submit(shuffled, **{"Idempotency-Key": "k-order"}), first)
    assert sim.submits == 1


async def test_same_key_from_two_tenants_is_two_predictions(api: Api, sim: SimState) -> None:
    a = await api.tenant(name="a")
    b = await api.tenant(name="b")
    first = await a.submit(valid_body(), **{"Idempotency-Key": "shared"})
    second = await b.submit(valid_body(), **{"Idempotency-Key": "shared"})
    assert_fresh(first)
    assert_fresh(second)
    assert first.json()["id"] != second.json()["id"]
    assert sim.submits == 2
    assert await spent(a) == (PRICE, 0)
    assert await spent(b) == (PRICE, 0)
    # And neither tenant can read the other's prediction through its replay.
    assert (await b.get(f"/api/v1/predictions/{first.json()['id']}")).status_code == 404


async def test_key_is_freed_after_upstream_failure(api: Api, sim: SimState) -> None:
    tenant = await api.tenant()
    sim.faults.submit_status, sim.faults.submit_count = 500, 1
    failed = await tenant.submit(valid_body(queue=False), **{"Idempotency-Key": "retry-me"})
    assert failed.status_code == 503
    assert failed.json()["code"] == "upstream_unavailable"
    assert await stored_keys(api.runtime, tenant.id) == 0

    retried = await tenant.submit(valid_body(), **{"Idempotency-Key": "retry-me"})
    assert_fresh(retried)
    assert sim.submits == 2
    assert await spent(tenant) == (PRICE, 0)
    assert_replay(await tenant.submit(valid_body(), **{"Idempotency-Key": "retry-me"}), retried)
    assert sim.submits == 2


async def test_key_is_freed_after_upstream_refusal(api: Api, sim: SimState) -> None:
    tenant = await api.tenant()
    sim.faults.submit_status, sim.faults.submit_count = 400, 1
    refused = await tenant.submit(valid_body(), **{"Idempotency-Key": "refused"})
    assert refused.status_code == 422
    assert refused.json()["code"] == "upstream_rejected"
    assert_fresh(await tenant.submit(valid_body(), **{"Idempotency-Key": "refused"}))
    assert sim.submits == 2


async def test_key_is_not_burnt_by_a_budget_refusal(api: Api, sim: SimState) -> None:
    tenant = await api.tenant(budgetCents=5)
    refused = await tenant.submit(valid_body(), **{"Idempotency-Key": "later"})
    assert refused.status_code == 402
    assert await stored_keys(api.runtime, tenant.id) == 0
    patched = await api.admin("PATCH", f"/admin/v1/tenants/{tenant.id}", json={"budgetCents": 100})
    assert patched.status_code == 200
    assert_fresh(await tenant.submit(valid_body(), **{"Idempotency-Key": "later"}))
    assert sim.submits == 1


async def test_key_kept_for_24_hours_then_new(api: Api, sim: SimState) -> None:
    start = datetime(2030, 6, 10, 12, 0, tzinfo=UTC)
    clock.shift_to(start)
    tenant = await api.tenant()
    first = await tenant.submit(valid_body(), **{"Idempotency-Key": "daily"})
    assert_fresh(first)

    clock.shift_to(start + timedelta(hours=23, minutes=59))
    assert_replay(await tenant.submit(valid_body(), **{"Idempotency-Key": "daily"}), first)
    other = await tenant.submit(valid_body(prompt="another"), **{"Idempotency-Key": "daily"})
    assert other.status_code == 422

    clock.shift_to(start + timedelta(hours=24, seconds=5))
    # Expired: the same key behaves like a new key, even with another body.
    renewed = await tenant.submit(valid_body(prompt="another"), **{"Idempotency-Key": "daily"})
    assert_fresh(renewed)
    assert renewed.json()["id"] != first.json()["id"]
    assert sim.submits == 2
    assert await spent(tenant) == (2 * PRICE, 0)
    assert_replay(await tenant.submit(valid_body(prompt="another"), **{"Idempotency-Key": "daily"}), renewed)


async def test_housekeeping_deletes_expired_keys(api: Api, sim: SimState) -> None:
    start = datetime(2030, 6, 10, 12, 0, tzinfo=UTC)
    clock.shift_to(start)
    tenant = await api.tenant()
    first = await tenant.submit(valid_body(), **{"Idempotency-Key": "old"})
    assert_fresh(first)
    clock.shift_to(start + timedelta(hours=12))
    assert_fresh(await tenant.submit(valid_body(), **{"Idempotency-Key": "young"}))

    worker = Worker(api.runtime)
    await worker.housekeeping()
    assert await stored_keys(api.runtime, tenant.id) == 2

    clock.shift_to(start + timedelta(hours=24, seconds=5))
    await worker.housekeeping()
    assert await stored_keys(api.runtime, tenant.id) == 1
    again = await tenant.submit(valid_body(), **{"Idempotency-Key": "old"})
    assert_fresh(again)
    assert again.json()["id"] != first.json()["id"]
    assert sim.submits == 3


async def test_key_length_limits(api: Api, sim: SimState) -> None:
    tenant = await api.tenant()
    too_long = await tenant.submit(valid_body(), **{"Idempotency-Key": "k" * 256})
    assert too_long.status_code == 422, too_long.text
    assert too_long.headers["content-type"] == "application/problem+json"
    problem = too_long.json()
    assert problem["code"] == "validation_error"
    assert problem["field"] == "Idempotency-Key"
    empty = await tenant.submit(valid_body(), **{"Idempotency-Key": ""})
    assert empty.status_code == 422
    assert empty.json()["field"] == "Idempotency-Key"
    assert sim.submits == 0

    longest = "k" * 255
    first = await tenant.submit(valid_body(), **{"Idempotency-Key": longest})
    assert_fresh(first)
    assert_replay(await tenant.submit(valid_body(), **{"Idempotency-Key": longest}), first)
    assert sim.submits == 1
