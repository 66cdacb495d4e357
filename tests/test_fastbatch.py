"""The one-statement batch (app/budgets/fastbatch.py on PostgreSQL, app/budgets/sqlitebatch.py's one step
on SQLite) moves money exactly as the writer's transaction does (app/budgets/movements.py.move_batch): two tenants with the same budget get the same batches, one through
the writer (which takes the one statement where it can), the other through the transaction alone; every
answer, ledger row, counter, day, prediction and threshold notice must match. Hypothesis picks the budgets,
the batch sizes and the costs, so batches that do not fit, settles that cross 50/80/100 %, costs that teach
a new price and late confirms all come up."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncEngine

from app.budgets import service as budgets_service
from app.budgets.models import BudgetCounter, DailyUsage, LedgerEntry, PricePoint, ThresholdNotice
from app.budgets.scopes import tenant_scope
from app.core import clock
from app.core.database import create_engine, create_sessionmaker, transaction
from app.core.ids import new_id
from app.predictions import onestatement
from app.predictions import service as predictions_service
from app.predictions import writer as predictions_writer
from app.predictions.models import Prediction
from app.predictions.schemas import GenerateRequest
from app.runtime import Runtime, build_runtime
from app.tenants.models import ApiKey, Tenant
from app.upstream.schemas import UpstreamSubmitted
from app.webhooks.models import WebhookDelivery
from tests.conftest import make_settings, valid_body

MODEL = "ltx-2-19b"


@dataclass
class Side:
    """One tenant and what its batches answered: the held predictions not settled yet, in hold order."""

    tenant: Tenant
    key: ApiKey
    held: list[Any] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    fast: int = 0  # jobs the one statement applied


async def new_side(runtime: Runtime, budget: int | None) -> Side:
    async with transaction(runtime.sessions) as session:
        tenant = Tenant(
            id=new_id("ten"),
            name="fastbatch",
            budget_cents=budget,
            budget_period="month",
            in_flight=0,
            webhook_secret="whsec_dGVzdA==",
            webhook_url="https://hooks.example.com/budget",
            created_at=clock.now(),
        )
        session.add(tenant)
        await session.flush()
        key = ApiKey(
            id=new_id("key"), tenant_id=tenant.id, prefix="vg_fb", key_hash=new_id("hash"), created_at=clock.now()
        )
        session.add(key)
    return Side(tenant, key)


def answer(result: Any) -> str:
    if isinstance(result, BaseException):
        return f"refused {getattr(result, 'code', type(result).__name__)}"
    if isinstance(result, tuple):
        return f"held {result[0].estimate_cents}"
    return f"{result['status']} {result['costCents']}"


def hold_jobs(side: Side, n: int) -> list[Any]:
    request = GenerateRequest.model_validate(valid_body())
    fingerprint = predictions_service.request_fingerprint(MODEL, request)
    return [
        predictions_writer.HoldJob(side.tenant, side.key, MODEL, request, new_id("pred"), None, fingerprint)
        for _ in range(n)
    ]


def confirm_jobs(side: Side, k: int, cost: int) -> list[Any]:
    taken, side.held = side.held[:k], side.held[k:]
    return [
        predictions_writer.ConfirmJob(
            side.tenant,
            side.key,
            prediction,
            estimate,
            UpstreamSubmitted.model_validate({"id": new_id("up"), "status": "processing", "costCents": cost}),
            None,
            "http://gw/api/v1/predictions",
        )
        for prediction, estimate in taken
    ]


async def run_batch(runtime: Runtime, side: Side, jobs: list[Any], *, one_statement: bool) -> None:
    if one_statement:
        # As the writer does (_in_transactions), with the jobs the one statement applied counted: a
        # statement that failed would leave them all to the transaction and the two sides equal.
        done = await onestatement.apply(runtime, jobs)
        side.fast += len(done)
        rest = [i for i in range(len(jobs)) if i not in done]
        others = dict(
            zip(rest, await predictions_writer._in_one_transaction(runtime, [jobs[i] for i in rest]), strict=True)
        )
        results = [done[i] if i in done else others[i] for i in range(len(jobs))]
    else:
        results = await predictions_writer._in_one_transaction(runtime, jobs)
    side.answers += [answer(r) for r in results]
    side.held += [r for r in results if isinstance(r, tuple)]


async def state(runtime: Runtime, side: Side) -> dict[str, Any]:
    tenant_id = side.tenant.id
    async with transaction(runtime.sessions) as session:
        counters = [
            (c.spent_cents, c.reserved_cents)
            for c in await session.scalars(select(BudgetCounter).where(BudgetCounter.scope == tenant_scope(tenant_id)))
        ]
        ledger = [
            (e.kind, e.reserved_delta, e.spent_delta, e.provider, e.model_id, e.note)
            for e in await session.scalars(
                select(LedgerEntry).where(LedgerEntry.tenant_id == tenant_id).order_by(LedgerEntry.id)
            )
        ]
        days = [
            (d.spent_cents, d.predictions, d.refusals)
            for d in await session.scalars(select(DailyUsage).where(DailyUsage.tenant_id == tenant_id))
        ]
        predictions = sorted(
            (p.status, p.estimate_cents, p.charged_cents, p.provider, p.holds_slot, p.params == {"prompt": "x"})
            for p in await session.scalars(select(Prediction).where(Prediction.tenant_id == tenant_id))
        )
        notices = sorted(
            n.percent
            for n in await session.scalars(select(ThresholdNotice).where(ThresholdNotice.tenant_id == tenant_id))
        )
        deliveries = len(
            list(await session.scalars(select(WebhookDelivery.id).where(WebhookDelivery.tenant_id == tenant_id)))
        )
    return {
        "answers": side.answers,
        "counters": counters,
        "ledger": sorted(ledger, key=repr),
        "days": days,
        "predictions": predictions,
        "notices": notices,
        "deliveries": deliveries,
    }


Step = tuple[str, int, int]  # (kind, how many, cost)
steps = st.lists(
    st.tuples(st.sampled_from(["hold", "settle", "both"]), st.integers(1, 12), st.sampled_from([9, 9, 9, 7, 40])),
    min_size=1,
    max_size=8,
)


async def scenario(runtime: Runtime, budget: int | None, plan: list[Step]) -> None:
    fast, exact = await new_side(runtime, budget), await new_side(runtime, budget)
    for kind, n, cost in plan:
        for side, one_statement in ((fast, True), (exact, False)):
            jobs = []
            if kind in ("settle", "both"):
                jobs += confirm_jobs(side, n, cost)
            if kind in ("hold", "both"):
                jobs += hold_jobs(side, n)
            await run_batch(runtime, side, jobs, one_statement=one_statement)
        assert await state(runtime, fast) == await state(runtime, exact), (budget, plan, (kind, n, cost))
    applied_fast.append(fast.fast)
    async with transaction(runtime.sessions) as session:
        assert await budgets_service.verify_ledger(session) == []


applied_fast: list[int] = []  # per example, the jobs the one statement applied


class Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


async def forget(runtime: Runtime) -> None:
    """Everything the examples committed, the price points they taught included (a bill of 40 cents seen
    here raised the estimates of the tests that ran after it on the same worker)."""
    models = (WebhookDelivery, ThresholdNotice, DailyUsage, LedgerEntry, Prediction, BudgetCounter, ApiKey, PricePoint)
    async with transaction(runtime.sessions) as session:
        for model in models:
            await session.execute(delete(model))
        await session.execute(delete(Tenant).where(Tenant.name == "fastbatch"))


def test_one_statement_batches_move_money_as_the_transaction_does(
    engine: AsyncEngine, database_url: str, sim_url: str
) -> None:
    """Needs `engine` only for the migrated schema; runs on an engine and event loop of its own, with real
    commits (the one statement commits on its own connection)."""
    loop = asyncio.new_event_loop()
    own_engine = create_engine(database_url, pool_size=2)

    async def build() -> Runtime:
        return build_runtime(make_settings(database_url, sim_url), own_engine, create_sessionmaker(own_engine))

    runtime = loop.run_until_complete(build())

    @hsettings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(budget=st.one_of(st.none(), st.integers(0, 400)), plan=steps)
    def check(budget: int | None, plan: list[Step]) -> None:
        loop.run_until_complete(scenario(runtime, budget, plan))

    failures = Captured()
    logging.getLogger("vidgate.predictions").addHandler(failures)
    applied_fast.clear()
    try:
        check()
        assert failures.lines == []
        # The statement, not only the transaction after it, must have applied jobs (in about half of the
        # examples it does; a batch that crosses a line, or costs that teach a price, go to the transaction).
        assert any(n > 0 for n in applied_fast), applied_fast
    finally:
        logging.getLogger("vidgate.predictions").removeHandler(failures)
        loop.run_until_complete(forget(runtime))
        loop.run_until_complete(runtime.close())
        loop.run_until_complete(own_engine.dispose())
        loop.close()
