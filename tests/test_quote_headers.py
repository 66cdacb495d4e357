"""SPEC §2: the quote endpoint, the budget headers on every tenant answer, Retry-After on processing answers."""

from __future__ import annotations

import asyncio
import math
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from app.core import clock
from app.core.database import transaction
from app.predictions.models import Prediction
from app.tenants import cache as key_cache
from app.upstream.simulator import SimState
from tests.conftest import ADMIN_TOKEN, Api, eventually, valid_body

TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


async def quote(tenant: Any, body: dict[str, Any], model: str = "ltx-2-19b") -> Any:
    return await tenant.api.http.post(f"/api/v1/models/{model}/quote", json=body, headers=tenant.headers())


async def test_quote_estimates_without_sending_or_holding(api: Api, sim: SimState) -> None:
    tenant = await api.tenant(budgetCents=100, budgetPeriod="month")
    answer = await quote(tenant, valid_body())
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["estimateCents"] == 9 and body["fits"] is True
    assert body["remainingCents"] == 100 and body["budgetCents"] == 100
    assert TIMESTAMP.match(answer.headers["x-budget-resets-at"])
    assert datetime.fromisoformat(body["resetsAt"]) > datetime.now(UTC)
    usage = (await tenant.get("/api/v1/usage")).json()
    assert sim.submits == 0 and usage["reservedCents"] == 0 and usage["spentCents"] == 0
    # The estimate is the one a submit holds: the submit's charge leaves what the quote said.
    assert (await tenant.submit()).status_code == 200
    assert (await tenant.get("/api/v1/usage")).json()["remainingCents"] == 100 - body["estimateCents"]


async def test_quote_is_validated_like_a_submit(api: Api, sim: SimState) -> None:
    tenant = await api.tenant()
    assert (await quote(tenant, valid_body(duration=4))).json()["field"] == "duration"
    assert (await quote(tenant, valid_body(), model="sora")).json()["code"] == "model_not_found"
    assert (await quote(tenant, {**valid_body(), "colour": "red"})).status_code == 422
    unauthenticated = await api.http.post("/api/v1/models/ltx-2-19b/quote", json=valid_body())
    assert unauthenticated.json()["code"] == "invalid_api_key"
    assert sim.submits == 0


async def test_quote_fits_follows_budget_concurrency_and_rate(api: Api, sim: SimState) -> None:
    poor = await api.tenant(name="poor", budgetCents=8)
    answer = (await quote(poor, valid_body())).json()
    assert answer["fits"] is False and answer["remainingCents"] == 8
    assert (await poor.submit()).status_code == 402

    busy = await api.tenant(name="busy", maxConcurrent=1)
    assert (await quote(busy, valid_body())).json()["fits"] is True
    assert (await busy.submit()).status_code == 200
    assert (await quote(busy, valid_body())).json() == {
        "estimateCents": 9,
        "fits": False,
        "remainingCents": None,
        "budgetCents": None,
        "resetsAt": (await quote(busy, valid_body())).json()["resetsAt"],
    }
    assert (await busy.submit()).status_code == 429

    hasty = await api.tenant(name="hasty", ratePerMinute=1)
    assert (await quote(hasty, valid_body())).json()["fits"] is True
    assert (await hasty.submit()).status_code == 200
    assert (await quote(hasty, valid_body())).json()["fits"] is False


async def test_budget_headers_on_every_tenant_answer(api: Api, sim: SimState) -> None:
    tenant = await api.tenant(budgetCents=20, budgetPeriod="day")
    usage = await tenant.get("/api/v1/usage")
    assert usage.headers["x-budget-remaining-cents"] == "20"
    resets = usage.headers["x-budget-resets-at"]
    assert TIMESTAMP.match(resets) and resets.endswith("T00:00:00.000Z")
    submitted = await tenant.submit()
    # The answer to the submit shows the balance after its own charge.
    assert submitted.headers["x-budget-remaining-cents"] == "11"
    prediction_id = submitted.json()["id"]
    got = await tenant.get(f"/api/v1/predictions/{prediction_id}")
    assert got.headers["x-budget-remaining-cents"] == "11"
    assert (await tenant.submit()).headers["x-budget-remaining-cents"] == "2"
    refused = await tenant.submit()
    assert refused.status_code == 402 and refused.headers["x-budget-remaining-cents"] == "2"
    missing = await tenant.get("/api/v1/predictions/pred_nope")
    assert missing.status_code == 404 and missing.headers["x-budget-remaining-cents"] == "2"
    for path in ("/api/v1/predictions", "/api/v1/webhook-deliveries"):
        assert (await tenant.get(path)).headers["x-budget-remaining-cents"] == "2"
    # Not on answers to anyone else.
    assert "x-budget-remaining-cents" not in (await api.admin("GET", "/admin/v1/tenants")).headers
    assert "x-budget-remaining-cents" not in (await api.http.get("/api/v1/usage")).headers


@pytest.mark.parametrize("cached", [True, False], ids=["key-cached", "key-not-cached"])
async def test_budget_headers_on_answers_before_the_route(api: Api, sim: SimState, cached: bool) -> None:
    """Issue 24 B6: a 405, a 413 and a body that is not JSON answer a valid key before any route checks
    it; they carry its balance all the same. A key that does not check out gets none."""
    tenant = await api.tenant(budgetCents=20, budgetPeriod="day")
    if cached:
        assert (await tenant.get("/api/v1/usage")).headers["x-budget-remaining-cents"] == "20"
    else:
        key_cache.CACHE.clear()
    generate = "/api/v1/models/ltx-2-19b/generate"
    answers = {
        "405": await api.http.delete("/api/v1/usage", headers=tenant.headers()),
        "413": await api.http.post(generate, content=b"x" * (65 * 1024), headers=tenant.headers()),
        "json": await api.http.post(
            generate, content=b"{not json", headers=tenant.headers(**{"Content-Type": "application/json"})
        ),
        "404": await api.http.get("/api/v1/nope", headers=tenant.headers()),
    }
    for what, answer in answers.items():
        assert answer.status_code in (405, 413, 422, 404), (what, answer.text)
        assert answer.headers["x-budget-remaining-cents"] == "20", what
        assert TIMESTAMP.match(answer.headers["x-budget-resets-at"]), what
    assert sim.submits == 0
    for headers in ({"Authorization": "Bearer vg_unknown"}, {}, {"Authorization": f"Bearer {ADMIN_TOKEN}"}):
        answer = await api.http.delete("/api/v1/usage", headers=headers)
        assert answer.status_code == 405 and "x-budget-remaining-cents" not in answer.headers


async def test_unlimited_budget_has_no_remaining_header_and_total_no_reset(api: Api, sim: SimState) -> None:
    unlimited = await api.tenant(name="unlimited")
    answer = await unlimited.get("/api/v1/usage")
    assert "x-budget-remaining-cents" not in answer.headers and TIMESTAMP.match(answer.headers["x-budget-resets-at"])
    total = await api.tenant(name="total", budgetCents=50, budgetPeriod="total")
    answer = await total.get("/api/v1/usage")
    assert answer.headers["x-budget-remaining-cents"] == "50" and "x-budget-resets-at" not in answer.headers


async def test_retry_after_on_processing_answers_only(live_api: Api, worker: Any, sim: SimState) -> None:
    sim.config.estimated_time = "3-20s"  # the gateway's first poll is due 3 s after the submit
    tenant = await live_api.tenant()
    submitted = await tenant.submit()
    assert submitted.json()["status"] == "processing"
    assert submitted.headers["retry-after"] in ("3", "4")
    prediction_id = submitted.json()["id"]
    got = await tenant.get(f"/api/v1/predictions/{prediction_id}")
    assert got.json()["status"] == "processing" and 1 <= int(got.headers["retry-after"]) <= 4

    async def completed() -> bool:
        return bool((await tenant.get(f"/api/v1/predictions/{prediction_id}")).json()["status"] == "completed")

    await eventually(completed, what="the prediction to complete")
    assert "retry-after" not in (await tenant.get(f"/api/v1/predictions/{prediction_id}")).headers
    waited = await tenant.submit(valid_body(seed=1), Prefer="wait=10")
    assert waited.json()["status"] == "completed" and "retry-after" not in waited.headers


async def test_openapi_documents_quote_and_headers(api: Api) -> None:
    spec = (await api.http.get("/openapi.json")).json()
    quote_op = spec["paths"]["/api/v1/models/{modelId}/quote"]["post"]
    assert quote_op["security"] and "200" in quote_op["responses"]
    for path, method in (("/api/v1/usage", "get"), ("/api/v1/predictions", "get")):
        assert "X-Budget-Remaining-Cents" in spec["paths"][path][method]["responses"]["200"]["headers"]
    for path, method in (("/api/v1/predictions/{predictionId}", "get"), ("/api/v1/models/{modelId}/generate", "post")):
        headers = spec["paths"][path][method]["responses"]["200"]["headers"]
        assert {"Retry-After", "X-Budget-Remaining-Cents", "X-Budget-Resets-At"} <= set(headers)


async def test_retry_after_counts_from_the_confirm_not_from_the_hold(api: Api, sim: SimState) -> None:
    """The first poll is due the estimate's lower bound after the vendor accepted the prediction. An
    upstream call that took 20 s (the clock moved while it was in flight) must not shorten the submit's
    Retry-After: it says when the poll queue will poll, no earlier, and a replay of the answer too."""
    sim.config.estimated_time = "30-60s"
    sim.faults.submit_arrived, sim.faults.submit_gate = asyncio.Event(), asyncio.Event()
    tenant = await api.tenant()
    submitting = asyncio.create_task(tenant.submit(**{"Idempotency-Key": "slow"}))
    await sim.faults.submit_arrived.wait()
    clock.shift_to(clock.now() + timedelta(seconds=20))
    sim.faults.submit_gate.set()
    submitted = await submitting
    assert submitted.status_code == 200, submitted.text
    async with transaction(api.runtime.sessions) as session:
        row = await session.get(Prediction, submitted.json()["id"])
        assert row is not None and row.next_poll_at is not None
        due_in = (row.next_poll_at - clock.now()).total_seconds()
    assert int(submitted.headers["retry-after"]) in (math.floor(due_in), math.ceil(due_in))
    assert int(submitted.headers["retry-after"]) > 20  # 30 s after the confirm; the hold was 20 s before
    replayed = await tenant.submit(**{"Idempotency-Key": "slow"})
    assert replayed.headers["idempotent-replayed"] == "true"
    assert int(replayed.headers["retry-after"]) in (math.floor(due_in), math.ceil(due_in))
