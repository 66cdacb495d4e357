"""GET /api/v1/predictions/{id} costs at most one statement: the key check from the key cache, and the
prediction, its current links and the balance read together. A final prediction (terminal, never
rehosted: it cannot change again) is answered from memory, with the balance snapshot for the headers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import event

from app.core.database import transaction
from app.predictions import service as predictions_service
from app.predictions.cache import FinalPredictions
from app.predictions.models import PredictionStatus
from app.runtime import Runtime
from tests.conftest import Api, Tenant


@contextmanager
def statements(runtime: Runtime) -> Iterator[list[str]]:
    """The SQL statements run meanwhile; SQLite's BEGIN is left out (transaction control, no round trip:
    PostgreSQL reads run without one)."""
    seen: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if not statement.lstrip().upper().startswith("BEGIN"):
            seen.append(statement)

    event.listen(runtime.engine.sync_engine, "before_cursor_execute", count)
    try:
        yield seen
    finally:
        event.remove(runtime.engine.sync_engine, "before_cursor_execute", count)


async def finish(runtime: Runtime, prediction_id: str, status: str) -> None:
    async with transaction(runtime.sessions) as session:
        finishing = predictions_service.Finish(
            prediction_id,
            PredictionStatus(status),
            outputs=["https://cdn.example.com/x.mp4"] if status == "completed" else None,
            error="the vendor failed" if status == "failed" else None,
            completed_at=None,
        )
        done = await predictions_service.finish_many(session, runtime, [finishing], lease_owner=None)
        assert prediction_id in done


async def get(tenant: Tenant, prediction_id: str) -> Any:
    answer = await tenant.get(f"/api/v1/predictions/{prediction_id}")
    assert answer.status_code == 200, answer.text
    return answer


async def test_a_final_prediction_costs_no_statement_and_a_processing_one_exactly_one(
    live_api: Api, live_runtime: Runtime
) -> None:
    tenant = await live_api.tenant(budgetCents=1000, budgetPeriod="day")
    processing = (await tenant.submit()).json()["id"]
    completed = (await tenant.submit()).json()["id"]
    failed = (await tenant.submit()).json()["id"]
    await finish(live_runtime, completed, "completed")
    await finish(live_runtime, failed, "failed")

    for _ in range(2):
        with statements(live_runtime) as seen:
            answer = await get(tenant, processing)
        assert len(seen) == 1, seen
        assert answer.json()["status"] == "processing" and "retry-after" in answer.headers

    for prediction_id in (completed, failed):
        with statements(live_runtime) as seen:
            first = await get(tenant, prediction_id)
        assert len(seen) == 1, seen
        with statements(live_runtime) as seen:
            again = await get(tenant, prediction_id)
        assert seen == []
        assert again.content == first.content and again.headers["content-type"] == "application/json"
        assert again.headers["x-budget-remaining-cents"] == first.headers["x-budget-remaining-cents"]
        assert again.headers["x-budget-resets-at"] == first.headers["x-budget-resets-at"]
        assert "retry-after" not in again.headers

    # This process's own charge shows at once on the remembered answer's headers, as on a submit's.
    remaining = (await tenant.submit()).headers["x-budget-remaining-cents"]
    with statements(live_runtime) as seen:
        again = await get(tenant, completed)
    assert seen == [] and again.headers["x-budget-remaining-cents"] == remaining

    # Another tenant's id is still not found, though the prediction is remembered.
    other = await live_api.tenant(name="other")
    assert (await other.get(f"/api/v1/predictions/{completed}")).status_code == 404


async def test_a_final_prediction_is_read_again_once_the_balance_snapshot_expires(
    live_api: Api, live_runtime: Runtime
) -> None:
    tenant = await live_api.tenant(budgetCents=1000)
    prediction_id = (await tenant.submit()).json()["id"]
    await finish(live_runtime, prediction_id, "failed")
    await get(tenant, prediction_id)
    from app.tenants.cache import CACHE

    CACHE.invalidate(tenant.id)  # what a tenant change, or the snapshot's TTL, does
    with statements(live_runtime) as seen:
        await get(tenant, prediction_id)
    # The key check and the read (the key entry went with the tenant's), then memory again.
    assert len(seen) == 2, seen
    with statements(live_runtime) as seen:
        await get(tenant, prediction_id)
    assert seen == []


def test_the_final_cache_is_bounded_and_drops_the_least_recently_used() -> None:
    cache = FinalPredictions(max_predictions=2)
    cache.put("ten_1", "a", b"A")
    cache.put("ten_1", "b", b"B")
    assert cache.get("ten_1", "a") == b"A"
    cache.put("ten_1", "c", b"C")
    assert cache.get("ten_1", "b") is None and cache.get("ten_1", "a") == b"A" and len(cache) == 2
    assert cache.get("ten_2", "a") is None  # keyed by tenant too


def test_the_final_cache_is_bounded_by_bytes_too() -> None:
    cache = FinalPredictions(max_predictions=100, max_bytes=64)
    cache.put("ten_1", "a", b"x" * 4)
    cache.put("ten_1", "big", b"x" * 5)  # above a sixteenth of the bytes: not kept
    assert cache.get("ten_1", "big") is None and len(cache) == 1
    for name in "bcdefghijklmnopq":
        cache.put("ten_1", name, b"x" * 4)
    # 17 bodies of 4 bytes do not fit in 64: the least recently used went.
    assert cache.get("ten_1", "a") is None and cache.get("ten_1", "q") == b"xxxx" and len(cache) == 16
    cache.put("ten_1", "q", b"y" * 4)  # replacing a body counts its bytes once
    assert len(cache) == 16 and cache.get("ten_1", "b") == b"xxxx"
