"""The client against a real gateway and simulator: waiting, deadlines, typed errors, paging, money safety."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest
from conftest import BODY, COST, FaultProxy, Gateway, free_port

from vidgate_client import (
    APIConnectionError,
    AsyncVidgate,
    AuthenticationError,
    BudgetExceeded,
    InvalidRequest,
    NotFound,
    Prediction,
    PredictionTimeout,
    RateLimited,
    Vidgate,
)
from vidgate_client._client import _Settings
from vidgate_client._retry import backoff_s, parse_retry_after


def spent(gateway: Gateway, key: str) -> int:
    with Vidgate(key, gateway.url) as client:
        return client.usage().spent_cents


def test_generate_waits_until_completed(sim_defaults: Gateway) -> None:
    _, key = sim_defaults.tenant(budgetCents=100)
    with Vidgate(key, sim_defaults.url) as client:
        prediction = client.generate("ltx-2-19b", **BODY, metadata={"job": 7})
        assert isinstance(prediction, Prediction)
        assert prediction.status == "completed" and prediction.outputs and prediction.completed_at
        assert prediction.cost_cents == COST and prediction.metadata == {"job": 7}
        assert prediction.model_id == "ltx-2-19b" and prediction.id.startswith("pred")
        assert client.predictions.get(prediction.id) == prediction.model_copy(
            update={"status_url": None, "estimated_time": None, "model_name": "LTX-2 19B"}
        )
        usage = client.usage()
        assert usage.spent_cents == COST and usage.remaining_cents == 100 - COST and usage.budget_cents == 100


def test_generate_waits_across_the_fair_queue(sim_defaults: Gateway) -> None:
    """No provider can take the submit (the vendor answers it 503): the gateway holds and queues it
    (SPEC §12), its worker sends it when the vendor recovers, and generate(wait=True) returns it done."""
    _, key = sim_defaults.tenant(budgetCents=100)
    submits = sim_defaults.upstream_submits()
    sim_defaults.sim("/_sim/faults", submit_status=503, submit_count=1)
    with Vidgate(key, sim_defaults.url) as client:
        prediction = client.generate("ltx-2-19b", **BODY, deadline_s=60)
        assert prediction.status == "completed" and prediction.outputs and prediction.cost_cents == COST
        assert client.usage().spent_cents == COST
    assert sim_defaults.upstream_submits() == submits + 2  # refused once, then sent from the queue once


async def test_async_generate_waits_until_completed(sim_defaults: Gateway) -> None:
    _, key = sim_defaults.tenant()
    async with AsyncVidgate(key, sim_defaults.url) as client:
        prediction = await client.generate("ltx-2-19b", **BODY)
        assert prediction.status == "completed" and prediction.outputs
        assert (await client.predictions.get(prediction.id)).status == "completed"
        assert (await client.usage()).spent_cents == COST


def test_generate_polls_past_the_held_answer_when_retry_after_says(
    sim_defaults: Gateway, fault_proxy: FaultProxy
) -> None:
    """A prediction that outlasts the held answer (the gateway holds 2 s at most here) is then polled when
    the gateway's Retry-After says a poll is worth making: its first poll is due 8 s after the submit."""
    sim_defaults.sim("/_sim/config", completion_s=9, estimated_time="8-20s")
    _, key = sim_defaults.tenant()
    with Vidgate(key, fault_proxy.url) as client:
        prediction = client.generate("ltx-2-19b", **BODY, deadline_s=60)
        assert prediction.status == "completed"
    polls = [path for path in fault_proxy.gets if path.endswith(prediction.id)]
    # Held 2 s, then told to come back at 8 s, then every second: about 3 GETs. Polling every second
    # from the held answer on, as without Retry-After, would take 8 or more.
    assert 1 <= len(polls) <= 6 and len(fault_proxy.posts) == 1


def test_wait_false_returns_the_submit_answer(sim_defaults: Gateway) -> None:
    _, key = sim_defaults.tenant()
    with Vidgate(key, sim_defaults.url) as client:
        submitted = client.generate("ltx-2-19b", **BODY, wait=False)
        assert submitted.status == "processing" and submitted.status_url and submitted.estimated_time
        assert submitted.status_url.endswith(f"/api/v1/predictions/{submitted.id}")


def test_deadline_raises_with_an_id_the_gateway_knows(sim_defaults: Gateway, fault_proxy: FaultProxy) -> None:
    sim_defaults.sim("/_sim/config", completion_s=300)
    _, key = sim_defaults.tenant()
    # A timeout shorter than the deadline: reads must outlast the Prefer: wait the client sends.
    with Vidgate(key, fault_proxy.url, timeout=1.0) as client:
        with pytest.raises(PredictionTimeout) as caught:
            client.generate("ltx-2-19b", **BODY, deadline_s=3)
        prediction_id = caught.value.prediction_id
        assert prediction_id and caught.value.idempotency_key
        assert len(fault_proxy.posts) == 1 and fault_proxy.posts[0]["prefer"] == "wait=3"
        # The prediction goes on (and is billed): the id finds it.
        assert client.predictions.get(prediction_id).status == "processing"
        assert client.usage().spent_cents == COST


async def test_async_deadline_raises_with_the_id(sim_defaults: Gateway) -> None:
    sim_defaults.sim("/_sim/config", completion_s=300)
    _, key = sim_defaults.tenant()
    async with AsyncVidgate(key, sim_defaults.url) as client:
        with pytest.raises(PredictionTimeout) as caught:
            await client.generate("ltx-2-19b", **BODY, deadline_s=1)
        assert caught.value.prediction_id is not None
        assert (await client.predictions.get(caught.value.prediction_id)).status == "processing"


def test_budget_exceeded_is_typed_and_not_retried(sim_defaults: Gateway, fault_proxy: FaultProxy) -> None:
    _, key = sim_defaults.tenant(budgetCents=5)
    submits = sim_defaults.upstream_submits()
    with Vidgate(key, fault_proxy.url) as client, pytest.raises(BudgetExceeded) as caught:
        client.generate("ltx-2-19b", **BODY)
    assert caught.value.status == 402 and caught.value.code == "budget_exceeded"
    assert caught.value.remaining_cents == 5 and caught.value.estimate_cents == COST
    assert len(fault_proxy.posts) == 1  # a 4xx a retry cannot fix is not retried
    assert sim_defaults.upstream_submits() == submits


def test_rate_limited_is_typed_with_retry_after(sim_defaults: Gateway) -> None:
    _, key = sim_defaults.tenant(ratePerMinute=1)
    with Vidgate(key, sim_defaults.url, max_retries=0) as client:
        client.generate("ltx-2-19b", **BODY, wait=False)
        with pytest.raises(RateLimited) as caught:
            client.generate("ltx-2-19b", **BODY, wait=False)
    assert caught.value.status == 429 and caught.value.code == "rate_limited"
    assert caught.value.retry_after is not None and 1 <= caught.value.retry_after <= 60


def test_concurrency_limit_is_rate_limited(sim_defaults: Gateway) -> None:
    sim_defaults.sim("/_sim/config", completion_s=300)
    _, key = sim_defaults.tenant(maxConcurrent=1)
    with Vidgate(key, sim_defaults.url, max_retries=0) as client:
        client.generate("ltx-2-19b", **BODY, wait=False)
        with pytest.raises(RateLimited) as caught:
            client.generate("ltx-2-19b", **BODY, wait=False)
    assert caught.value.code == "concurrency_limited" and caught.value.retry_after is not None


def test_other_problems_are_typed(sim_defaults: Gateway) -> None:
    _, key = sim_defaults.tenant()
    with Vidgate("vg_not-a-real-key", sim_defaults.url) as client, pytest.raises(AuthenticationError) as denied:
        client.usage()
    assert denied.value.status == 401 and denied.value.code == "invalid_api_key"
    with Vidgate(key, sim_defaults.url) as client:
        with pytest.raises(NotFound) as missing:
            client.predictions.get("pred_missing")
        assert missing.value.code == "prediction_not_found"
        with pytest.raises(InvalidRequest) as invalid:
            client.generate("ltx-2-19b", **{**BODY, "duration": 4})
        assert invalid.value.field == "duration" and invalid.value.idempotency_key
        with pytest.raises(NotFound):
            client.quote("no-such-model", **BODY)


def test_list_iterates_every_page(sim_defaults: Gateway) -> None:
    _, key = sim_defaults.tenant()
    with Vidgate(key, sim_defaults.url) as client:
        made = [client.generate("ltx-2-19b", **BODY, wait=False).id for _ in range(7)]
        listed = [p.id for p in client.predictions.list(page_size=3)]
        assert listed == sorted(made, reverse=True)  # newest first, all three pages
        assert [p.id for p in client.predictions.list(status="failed", page_size=3)] == []


async def test_async_list_iterates_every_page(sim_defaults: Gateway) -> None:
    _, key = sim_defaults.tenant()
    async with AsyncVidgate(key, sim_defaults.url) as client:
        made = {(await client.generate("ltx-2-19b", **BODY, wait=False)).id for _ in range(5)}
        assert {p.id async for p in client.predictions.list(page_size=2)} == made


def test_quote(sim_defaults: Gateway) -> None:
    _, key = sim_defaults.tenant(budgetCents=10, budgetPeriod="day")
    with Vidgate(key, sim_defaults.url) as client:
        quote = client.quote("ltx-2-19b", **BODY)
        assert quote.estimate_cents == COST and quote.fits and quote.remaining_cents == 10
        assert quote.resets_at is not None and quote.resets_at > datetime.now(UTC)
        client.generate("ltx-2-19b", **BODY, wait=False)
        assert not client.quote("ltx-2-19b", **BODY).fits


# ---------------------------------------------------------------- money safety


def test_lost_answer_is_retried_without_a_second_prediction(sim_defaults: Gateway, fault_proxy: FaultProxy) -> None:
    _, key = sim_defaults.tenant()
    submits = sim_defaults.upstream_submits()
    fault_proxy.post_faults = ["drop"]
    with Vidgate(key, fault_proxy.url) as client:
        prediction = client.generate("ltx-2-19b", **BODY)
        assert prediction.status == "completed"
        assert [p.id for p in client.predictions.list()] == [prediction.id]
    assert len(fault_proxy.posts) == 2
    assert fault_proxy.posts[0]["idempotency-key"] == fault_proxy.posts[1]["idempotency-key"]
    assert sim_defaults.upstream_submits() == submits + 1
    assert spent(sim_defaults, key) == COST


async def test_503_twice_is_retried_without_a_second_charge(sim_defaults: Gateway, fault_proxy: FaultProxy) -> None:
    _, key = sim_defaults.tenant()
    submits = sim_defaults.upstream_submits()
    # Both 503s come after the gateway got the request: only the key keeps it to one prediction.
    fault_proxy.post_faults = ["503", "503-date"]
    async with AsyncVidgate(key, fault_proxy.url) as client:
        prediction = await client.generate("ltx-2-19b", **BODY)
        assert prediction.status == "completed"
        assert [p.id async for p in client.predictions.list()] == [prediction.id]
    assert len(fault_proxy.posts) == 3
    assert len({post["idempotency-key"] for post in fault_proxy.posts}) == 1
    assert sim_defaults.upstream_submits() == submits + 1
    assert spent(sim_defaults, key) == COST


def test_each_generate_call_has_its_own_key(sim_defaults: Gateway, fault_proxy: FaultProxy) -> None:
    _, key = sim_defaults.tenant()
    with Vidgate(key, fault_proxy.url) as client:
        first = client.generate("ltx-2-19b", **BODY, wait=False)
        second = client.generate("ltx-2-19b", **BODY, wait=False)
        given = client.generate("ltx-2-19b", **BODY, wait=False, idempotency_key="mine-1")
        again = client.generate("ltx-2-19b", **BODY, wait=False, idempotency_key="mine-1")
    assert first.id != second.id and given.id == again.id
    assert len({post["idempotency-key"] for post in fault_proxy.posts}) == 3


def test_connection_refused_is_retried_then_raised() -> None:
    with (
        Vidgate("vg_x", f"http://127.0.0.1:{free_port()}", max_retries=1) as client,
        pytest.raises(APIConnectionError) as caught,
    ):
        client.generate("ltx-2-19b", **BODY)
    assert caught.value.idempotency_key and caught.value.prediction_id is None


# ---------------------------------------------------------------- retry arithmetic


def test_retry_after_in_both_forms() -> None:
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(format_datetime(now + timedelta(seconds=30), usegmt=True), now.timestamp()) == 30.0
    assert parse_retry_after(format_datetime(now - timedelta(seconds=30), usegmt=True), now.timestamp()) == 0.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


def test_backoff_is_capped_jittered_and_never_before_retry_after() -> None:
    delays = [backoff_s(attempt, None) for attempt in range(12) for _ in range(20)]
    assert max(delays) <= 8.0 and len(set(delays)) > 100
    assert all(backoff_s(0, 5.0) >= 5.0 for _ in range(50))
    assert backoff_s(0, 3600.0) == 60.0  # an absurd Retry-After is capped, then asked again


def test_read_timeout_outlasts_every_prefer_wait() -> None:
    settings = _Settings("vg_x", "http://gateway", 5.0, 4, 10)
    for deadline_s in (0.5, 10, 59.5, 600):
        wait_s = settings.prefer_wait(deadline_s)
        timeout = settings.timeout_for(wait_s)
        assert 1 <= wait_s <= 60 and timeout.read is not None and timeout.read > wait_s


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIDGATE_API_KEY", "vg_env")
    monkeypatch.setenv("VIDGATE_BASE_URL", "http://gateway.example/")
    with Vidgate() as client:
        assert client._http.base_url == httpx.URL("http://gateway.example")
        assert client._http.headers["authorization"] == "Bearer vg_env"
    monkeypatch.delenv("VIDGATE_API_KEY")
    with pytest.raises(AuthenticationError):
        Vidgate()
