"""What one ledger writer batch costs the database, for a batch of 1 and of 32 submits (issue 25): on
PostgreSQL the common holds, and the common settles, are one statement that commits on its own
(app/budgets/fastbatch.py); on SQLite a batch is one transaction whose statements do not grow with it.
Counted at the driver: every statement SQLAlchemy or app/core/prebuilt.py sends, and every commit (a
COMMIT, or a statement on an AUTOCOMMIT connection)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import event, func, select

from app.budgets import service as budgets_service
from app.core.database import transaction
from app.core.ids import new_id
from app.predictions import service as predictions_service
from app.predictions import writer as predictions_writer
from app.predictions.models import Prediction
from app.predictions.schemas import GenerateRequest
from app.runtime import Runtime
from app.tenants.models import ApiKey, Tenant
from app.upstream.schemas import UpstreamSubmitted
from tests.conftest import TEST_DB, Api, valid_body

MODEL = "ltx-2-19b"


@dataclass
class Seen:
    statements: list[str] = field(default_factory=list)
    commits: int = 0


@contextmanager
def counted(runtime: Runtime) -> Iterator[Seen]:
    seen = Seen()

    def statement(conn: Any, _cursor: Any, sql: str, *_: Any) -> None:
        if sql.lstrip().upper().startswith(("BEGIN", "SAVEPOINT", "RELEASE SAVEPOINT")):
            return
        seen.statements.append(sql)
        if conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
            seen.commits += 1

    def commit(_conn: Any) -> None:
        seen.commits += 1

    engine = runtime.engine.sync_engine
    event.listen(engine, "before_cursor_execute", statement)
    event.listen(engine, "commit", commit)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", statement)
        event.remove(engine, "commit", commit)


async def caller(api: Api, runtime: Runtime) -> tuple[Tenant, ApiKey]:
    tenant = await api.tenant(budgetCents=1_000_000)
    async with transaction(runtime.sessions) as session:
        tenant_row = await session.get(Tenant, tenant.id)
        key_row = await session.scalar(select(ApiKey).where(ApiKey.tenant_id == tenant.id))
        assert tenant_row is not None and key_row is not None
        return tenant_row, key_row


def hold_jobs(tenant: Tenant, key: ApiKey, n: int) -> list[predictions_writer.HoldJob]:
    request = GenerateRequest.model_validate(valid_body())
    fingerprint = predictions_service.request_fingerprint(MODEL, request)
    return [
        predictions_writer.HoldJob(tenant, key, MODEL, request, new_id("pred"), None, fingerprint) for _ in range(n)
    ]


def confirm_jobs(tenant: Tenant, key: ApiKey, held: list[Any]) -> list[predictions_writer.ConfirmJob]:
    return [
        predictions_writer.ConfirmJob(
            tenant,
            key,
            prediction,
            estimate,
            UpstreamSubmitted.model_validate(
                {"id": new_id("up"), "status": "processing", "costCents": 9, "estimatedTime": "5-20s"}
            ),
            None,
            "http://gw/api/v1/predictions",
        )
        for prediction, estimate in held
    ]


async def one_batch(runtime: Runtime, jobs: list[Any]) -> tuple[list[Any], Seen]:
    """The jobs handed to the process's writer at once: one batch (the writer takes everything queued)."""
    writer = predictions_writer._writer(runtime)
    with counted(runtime) as seen:
        results = await asyncio.gather(*(writer.submit(job) for job in jobs))
    return list(results), seen


@pytest.mark.parametrize("size", [1, 32])
async def test_a_batch_of_holds_then_of_settles_costs_a_fixed_number_of_statements(
    live_api: Api, live_runtime: Runtime, size: int
) -> None:
    tenant, key = await caller(live_api, live_runtime)
    # One batch before, so that the price point is known and the settles below learn nothing.
    warm, _ = await one_batch(live_runtime, hold_jobs(tenant, key, 1))
    await one_batch(live_runtime, confirm_jobs(tenant, key, warm))

    held, holding = await one_batch(live_runtime, hold_jobs(tenant, key, size))
    bodies, settling = await one_batch(live_runtime, confirm_jobs(tenant, key, held))

    assert all(isinstance(h, tuple) for h in held), held
    assert [b["status"] for b in bodies] == ["processing"] * size
    if TEST_DB == "postgresql":
        assert (len(holding.statements), holding.commits) == (1, 1), holding.statements
        assert (len(settling.statements), settling.commits) == (1, 1), settling.statements
    else:
        # A transaction: the price point, the counter's conditional UPDATE, the ledger rows, the
        # predictions; then the confirms, charges, counters, ledger rows and the day.
        assert holding.commits == settling.commits == 1
        assert len(holding.statements) == 4, holding.statements
        assert len(settling.statements) == 5, settling.statements
    async with transaction(live_runtime.sessions) as session:
        charged = await session.scalar(
            select(func.sum(Prediction.charged_cents)).where(Prediction.tenant_id == tenant.id)
        )
        assert charged == 9 * (size + 1)
        assert await budgets_service.verify_ledger(session) == []


async def test_holds_and_settles_in_one_batch_are_one_statement(live_api: Api, live_runtime: Runtime) -> None:
    """The writer takes holds and settles together: on PostgreSQL one statement holds the new ones and
    settles the others."""
    tenant, key = await caller(live_api, live_runtime)
    warm, _ = await one_batch(live_runtime, hold_jobs(tenant, key, 1))
    await one_batch(live_runtime, confirm_jobs(tenant, key, warm))
    held, _ = await one_batch(live_runtime, hold_jobs(tenant, key, 16))

    results, seen = await one_batch(live_runtime, [*confirm_jobs(tenant, key, held), *hold_jobs(tenant, key, 16)])

    assert [r["status"] for r in results[:16]] == ["processing"] * 16
    assert all(isinstance(r, tuple) for r in results[16:])
    if TEST_DB == "postgresql":
        assert (len(seen.statements), seen.commits) == (1, 1), seen.statements
    else:
        assert seen.commits == 1
    async with transaction(live_runtime.sessions) as session:
        assert await budgets_service.verify_ledger(session) == []
