"""A stateful property test of app/budgets/movements.py against the real database.

Hypothesis drives random sequences of money movements for a fresh tenant (two API keys, one of them
maybe with a smaller budget of its own) and compares every counter and the tenant's slots with a model
after every step: reserve (exactly the refusals the model predicts), settle at or above the hold, a
second settle of the same prediction (moves nothing), release, the end of a prediction with or without
the refund of a failed one, a submit whose process died after transaction 1 (a real held prediction
row) and its recovery, and period roll-over with holds from the old period settled later. Every
movement goes through the batch API production runs (reserve_many, settle_many, release_many,
end_many), each admitted hold with its prediction row, as the ledger writer inserts it.

Hypothesis state machines are synchronous, so the test is a plain function that owns an event loop
and an engine of its own on the test database; every rule runs its coroutine to completion on that
loop, each movement in its own committed transaction, as the gateway does. A passing run takes a few
seconds; a failing one can spend minutes shrinking (every attempt replays its steps on the database).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from hypothesis import HealthCheck, event
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncEngine

from app.budgets import movements as budgets_movements
from app.budgets import service as budgets_service
from app.budgets.models import BudgetCounter, DailyUsage, LedgerEntry, ThresholdNotice
from app.core import clock
from app.core.database import create_engine, create_sessionmaker, transaction
from app.core.ids import new_id
from app.predictions import service as predictions_service
from app.predictions import writer as predictions_writer
from app.predictions.models import Prediction, PredictionStatus
from app.predictions.schemas import GenerateRequest
from app.runtime import Runtime, build_runtime
from app.tenants.models import ApiKey, Tenant
from tests.conftest import empty_tables, make_settings, valid_body

T = TypeVar("T")
MODEL = "ltx-2-19b"
STEP_S = (50, 200)  # clock steps; with a 120 s recovery delay no hold is ever within 20 s of the cutoff


@dataclass
class Env:
    loop: asyncio.AbstractEventLoop
    engine: AsyncEngine
    runtime: Runtime

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)


@dataclass(frozen=True)
class HeldMoney:
    hold: budgets_service.Hold
    amount: int  # held, or charged once settled


@dataclass(frozen=True)
class Crashed:
    hold: budgets_service.Hold
    amount: int
    created_at: datetime


class LedgerMachine(RuleBasedStateMachine):
    env: Env  # set on the subclass the test builds

    held = Bundle("held")
    charged = Bundle("charged")

    def __init__(self) -> None:
        super().__init__()
        self.ready = False
        self.model: dict[tuple[str, datetime], list[int]] = {}  # (scope, period) -> [spent, reserved]
        self.over_hold: set[tuple[str, datetime]] = set()  # scope-periods where a charge exceeded its hold
        self.crashed: list[Crashed] = []
        self.limits: dict[str, int | None] = {}
        self.rollovers = 0
        self.slots = 0  # the tenant's in_flight: held, charged but not ended, and crashed predictions

    # ------------------------------------------------------------ setup

    @initialize(
        tenant_limit=st.one_of(st.none(), st.integers(0, 150)),
        key_limit=st.one_of(st.none(), st.integers(0, 60)),
        kind=st.sampled_from(["day", "week", "month", "total"]),
        start=st.datetimes(min_value=datetime(2030, 1, 1), max_value=datetime(2035, 12, 31)),
    )
    def setup(self, tenant_limit: int | None, key_limit: int | None, kind: str, start: datetime) -> None:
        self.kind = kind
        self.now = budgets_service.period_of(kind, start.replace(tzinfo=UTC)).start + timedelta(hours=2)
        if kind == "total":
            self.now = start.replace(tzinfo=UTC)
        clock.shift_to(self.now)
        self.tenant_id = new_id("ten")
        self.key_ids = [new_id("key"), new_id("key")]
        self.env.run(self._create(tenant_limit, key_limit))
        self.limits = {
            f"tenant:{self.tenant_id}": tenant_limit,
            f"key:{self.key_ids[0]}": key_limit,
            f"key:{self.key_ids[1]}": None,
        }
        self.ready = True

    async def _create(self, tenant_limit: int | None, key_limit: int | None) -> None:
        async with transaction(self.env.runtime.sessions) as session:
            session.add(
                Tenant(
                    id=self.tenant_id,
                    name="machine",
                    budget_cents=tenant_limit,
                    budget_period=self.kind,
                    max_concurrent=1000,  # so that crashed submits hold slots, which recovery must free
                    in_flight=0,
                    webhook_secret="whsec_dGVzdA==",
                    created_at=clock.now(),
                )
            )
            await session.flush()
            for key_id, budget in zip(self.key_ids, (key_limit, None), strict=True):
                session.add(
                    ApiKey(
                        id=key_id,
                        tenant_id=self.tenant_id,
                        prefix="vg_machine",
                        key_hash=new_id("hash"),
                        budget_cents=budget,
                        created_at=clock.now(),
                    )
                )

    # ------------------------------------------------------------ model

    @property
    def period_start(self) -> datetime:
        return budgets_service.period_of(self.kind, self.now).start

    def counter(self, scope: str, period: datetime) -> list[int]:
        return self.model.setdefault((scope, period), [0, 0])

    def scopes_of(self, hold: budgets_service.Hold) -> list[str]:
        """The tenant's counter, and the key's if the key has a budget of its own (only those keep one)."""
        key_scope = f"key:{hold.api_key_id}"
        return [f"tenant:{hold.tenant_id}"] + ([key_scope] if self.limits[key_scope] is not None else [])

    def move(self, hold: budgets_service.Hold, reserved: int, spent: int) -> None:
        for scope in self.scopes_of(hold):
            entry = self.counter(scope, hold.period_start)
            entry[0] += spent
            entry[1] += reserved

    def first_refusing_scope(self, key_index: int, amount: int) -> str | None:
        for scope in (f"tenant:{self.tenant_id}", f"key:{self.key_ids[key_index]}"):
            limit = self.limits[scope]
            spent, reserved = self.counter(scope, self.period_start)
            if limit is not None and spent + reserved + amount > limit:
                return scope
        return None

    def check_refusal(self, exc: budgets_service.BudgetExceeded, scope: str, amount: int) -> None:
        spent, reserved = self.counter(scope, self.period_start)
        limit = self.limits[scope]
        assert limit is not None
        assert exc.fields["scope"] == scope.split(":")[0]
        assert exc.fields["limitCents"] == limit
        assert (exc.fields["spentCents"], exc.fields["reservedCents"]) == (spent, reserved)
        assert exc.fields["estimateCents"] == amount
        assert exc.fields["remainingCents"] == max(limit - spent - reserved, 0)

    async def _load(self, session: Any, key_index: int) -> tuple[Tenant, ApiKey]:
        tenant = await session.get(Tenant, self.tenant_id)
        key = await session.get(ApiKey, self.key_ids[key_index])
        assert tenant is not None and key is not None
        return tenant, key

    # ------------------------------------------------------------ rules

    async def _reserve(
        self, session: Any, items: list[tuple[int, int]], holds: list[budgets_service.Hold]
    ) -> list[Any]:
        """reserve_many for (amount, key index) items, and a prediction row for each admitted hold."""
        loaded = [await self._load(session, k) for k in (0, 1)]
        requests = [
            budgets_movements.HoldRequest(*loaded[k], hold, amount, slot_retry_after_s=1)
            for (amount, k), hold in zip(items, holds, strict=True)
        ]
        outcomes = await budgets_movements.reserve_many(session, requests)
        for request, refused in zip(requests, outcomes, strict=True):
            if refused is None:
                session.add(self._prediction(request))
        await session.flush()
        return outcomes

    def _prediction(self, request: budgets_movements.HoldRequest) -> Prediction:
        """The row the ledger writer inserts with an admitted hold, already confirmed (recovery leaves it)."""
        return Prediction(
            id=request.hold.prediction_id,
            tenant_id=self.tenant_id,
            api_key_id=request.key.id,
            model_id=MODEL,
            status=PredictionStatus.PROCESSING,
            params={},
            poll_count=0,
            poll_failures=0,
            created_at=self.now,
            **budgets_movements.new_hold_columns(request.tenant, request.amount, self.now),
        )

    @rule(target=held, amount=st.integers(0, 40), key_index=st.integers(0, 1))
    def reserve(self, amount: int, key_index: int) -> Any:
        hold = budgets_service.Hold(self.tenant_id, self.key_ids[key_index], new_id("pred"), MODEL, self.period_start)
        refusing = self.first_refusing_scope(key_index, amount)

        async def go() -> Any:
            async with transaction(self.env.runtime.sessions) as session:
                (refused,) = await self._reserve(session, [(amount, key_index)], [hold])
                return refused

        refused = self.env.run(go())
        event(f"reserve {'refused by ' + refusing.split(':')[0] if refusing else 'accepted'}")
        if refusing is None:
            assert refused is None, f"{amount} refused although it fits: {refused and refused.fields}"
            self.move(hold, amount, 0)
            self.slots += 1
            return HeldMoney(hold, amount)
        assert isinstance(refused, budgets_service.BudgetExceeded), f"{amount} accepted beyond {refusing}"
        self.check_refusal(refused, refusing, amount)
        return multiple()

    @rule(target=held, key_index=st.integers(0, 1), offset=st.sampled_from([0, 0, 1, -1]))
    def reserve_at_the_limit(self, key_index: int, offset: int) -> Any:
        """Exactly what is left (it fits), one cent more (refused) or one less."""
        left = [
            limit - sum(self.counter(scope, self.period_start))
            for scope in (f"tenant:{self.tenant_id}", f"key:{self.key_ids[key_index]}")
            if (limit := self.limits[scope]) is not None
        ]
        return self.reserve(max(min(left, default=20) + offset, 0), key_index)

    @rule(target=held, data=st.data())
    def reserve_batch(self, data: st.DataObject) -> Any:
        """Several holds in one reserve_many, as the ledger writer applies them: around the edge of what
        is left, so the batch's sum often crosses a limit and it goes one by one in arrival order."""
        left = min(
            (
                limit - sum(self.counter(scope, self.period_start))
                for scope in (f"tenant:{self.tenant_id}", f"key:{self.key_ids[0]}")
                if (limit := self.limits[scope]) is not None
            ),
            default=20,
        )
        edge = st.builds(lambda share, offset: max(left // share + offset, 0), st.integers(1, 3), st.integers(-1, 1))
        items = data.draw(
            st.lists(st.tuples(st.one_of(edge, st.integers(0, 40)), st.integers(0, 1)), min_size=2, max_size=6),
            label="(amount, key) in arrival order",
        )
        holds = [
            budgets_service.Hold(self.tenant_id, self.key_ids[k], new_id("pred"), MODEL, self.period_start)
            for _, k in items
        ]

        async def go() -> list[Any]:
            async with transaction(self.env.runtime.sessions) as session:
                return await self._reserve(session, items, holds)

        outcomes = self.env.run(go())
        admitted = []
        for (amount, key_index), hold, refused in zip(items, holds, outcomes, strict=True):
            refusing = self.first_refusing_scope(key_index, amount)
            if refusing is None:
                assert refused is None, f"{amount} refused in a batch although it fits: {refused and refused.fields}"
                self.move(hold, amount, 0)
                self.slots += 1
                admitted.append(HeldMoney(hold, amount))
                continue
            assert isinstance(refused, budgets_service.BudgetExceeded), f"{amount} accepted beyond {refusing}"
            self.check_refusal(refused, refusing, amount)
        event(f"batch of {len(items)}: {len(admitted)} admitted")
        return multiple(*admitted)

    async def _row(self, session: Any, hold: budgets_service.Hold) -> Prediction:
        prediction = await session.get(Prediction, hold.prediction_id, populate_existing=True)
        assert prediction is not None
        return prediction

    async def _settle(self, item: HeldMoney, cost: int) -> None:
        async with transaction(self.env.runtime.sessions) as session:
            tenant, _ = await self._load(session, 0)
            prediction = await self._row(session, item.hold)
            settle = budgets_movements.Settle(tenant, item.hold, item.amount, cost, prediction)
            await budgets_movements.settle_many(session, [settle])

    @rule(target=charged, item=consumes(held), data=st.data())
    def settle(self, item: HeldMoney, data: st.DataObject) -> HeldMoney:
        above = data.draw(st.booleans(), label="above the hold")
        cost = item.amount + data.draw(st.integers(1, 30)) if above else data.draw(st.integers(0, item.amount))
        self.env.run(self._settle(item, cost))
        self.move(item.hold, -item.amount, cost)
        if cost > item.amount:
            self.over_hold.update((scope, item.hold.period_start) for scope in self.scopes_of(item.hold))
        return HeldMoney(item.hold, cost)

    @rule(item=charged, data=st.data())
    def settle_again(self, item: HeldMoney, data: st.DataObject) -> None:
        """A second confirm of a prediction charged already (a retry whose first COMMIT landed): a
        prediction is charged once, so nothing moves."""
        self.env.run(self._settle(item, data.draw(st.integers(0, 60), label="cost")))

    @rule(item=consumes(held))
    def release(self, item: HeldMoney) -> None:
        async def go() -> None:
            async with transaction(self.env.runtime.sessions) as session:
                release = budgets_movements.Release(item.hold, item.amount, holds_slot=True, note="upstream refused")
                await budgets_movements.release_many(session, [release])

        self.env.run(go())
        self.move(item.hold, -item.amount, 0)
        self.slots -= 1

    def _end(self, item: HeldMoney, refund: int) -> None:
        async def go() -> None:
            async with transaction(self.env.runtime.sessions) as session:
                prediction = await self._row(session, item.hold)
                ended = budgets_movements.Ended(item.hold, prediction.holds_slot, refund, prediction)
                await budgets_movements.end_many(session, [ended])

        self.env.run(go())
        self.slots -= 1

    @rule(item=consumes(charged))
    def fail_with_refund(self, item: HeldMoney) -> None:
        self._end(item, item.amount)
        self.move(item.hold, 0, -item.amount)

    @rule(item=consumes(charged))
    def complete(self, item: HeldMoney) -> None:
        """A prediction that ends keeping its charge: only its slot comes back."""
        self._end(item, 0)

    @rule(duration=st.integers(5, 20), key_index=st.integers(0, 1))
    def submit_then_crash(self, duration: int, key_index: int) -> None:
        """Transaction 1 of a real submit (a 'submitting' prediction holding its estimate), committed by
        a process that then dies: nobody will settle or release it but crash recovery."""
        request = GenerateRequest.model_validate(valid_body(duration=duration))
        prediction_id = new_id("pred")
        rt = self.env.runtime

        async def go() -> tuple[int, budgets_service.BudgetExceeded | None]:
            async with transaction(rt.sessions) as session:
                estimate = await budgets_service.estimate_cents(
                    session, rt.settings.price_table, MODEL, "480p", duration
                )
            async with transaction(rt.sessions) as session:
                tenant, key = await self._load(session, key_index)
                job = predictions_writer.HoldJob(tenant, key, MODEL, request, prediction_id, None, "")
                (result,) = await predictions_writer.apply(rt, session, [job])
            if isinstance(result, budgets_service.BudgetExceeded):
                return estimate, result
            assert isinstance(result, tuple), result
            return estimate, None

        estimate, refused = self.env.run(go())
        assert estimate >= budgets_service.table_estimate({}, MODEL, "480p", duration)
        refusing = self.first_refusing_scope(key_index, estimate)
        hold = budgets_service.Hold(self.tenant_id, self.key_ids[key_index], prediction_id, MODEL, self.period_start)
        if refusing is None:
            assert refused is None, refused and refused.fields
            self.move(hold, estimate, 0)
            self.slots += 1
            self.crashed.append(Crashed(hold, estimate, self.now))
        else:
            assert refused is not None
            self.check_refusal(refused, refusing, estimate)

    @precondition(lambda self: bool(self.crashed))
    @rule(step=st.sampled_from(STEP_S))
    def recover_after(self, step: int) -> None:
        """Time passes and housekeeping runs: holds older than submit_recovery_s are released."""
        self.now += timedelta(seconds=step)
        clock.shift_to(self.now)
        cutoff = self.now - timedelta(seconds=self.env.runtime.settings.submit_recovery_s)
        due = [c for c in self.crashed if c.created_at < cutoff]
        recovered = self.env.run(predictions_service.recover_interrupted_submits(self.env.runtime))
        assert recovered == len(due)
        event(f"recovered {len(due)} of {len(self.crashed)} crashed holds")
        for item in due:
            self.move(item.hold, -item.amount, 0)
            self.slots -= 1
            self.crashed.remove(item)

    @precondition(lambda self: self.ready and self.rollovers < 3)
    @rule()
    def roll_over(self) -> None:
        """The next budget period begins; holds taken before it are settled in the period they were taken in."""
        end = budgets_service.period_of(self.kind, self.now).end
        self.now = (end + timedelta(hours=2)) if end is not None else self.now + timedelta(days=40)
        clock.shift_to(self.now)
        self.rollovers += 1

    # ------------------------------------------------------------ invariants

    @invariant()
    def counters_match_model_and_ledger(self) -> None:
        if not self.ready:
            return
        scopes = list(self.limits)
        rt = self.env.runtime

        async def read() -> tuple[list[Any], dict[tuple[str, datetime], tuple[int, int]], int, Any]:
            async with transaction(rt.sessions) as session:
                mismatches = await budgets_service.verify_ledger(session)
                rows = await session.scalars(select(BudgetCounter).where(BudgetCounter.scope.in_(scopes)))
                counters = {(c.scope, c.period_start): (c.spent_cents, c.reserved_cents) for c in rows}
                tenant = await session.get(Tenant, self.tenant_id, populate_existing=True)
                assert tenant is not None
                usage = await budgets_service.tenant_usage(session, tenant)
                return mismatches, counters, tenant.in_flight, usage

        mismatches, counters, in_flight, usage = self.env.run(read())
        # Only this example's scopes, so that nothing outside the example can make it fail (Hypothesis
        # would call that flaky and could not shrink it).
        assert [m for m in mismatches if m.scope in scopes] == []

        def nonzero(values: dict[tuple[str, datetime], Any]) -> dict[tuple[str, datetime], tuple[int, int]]:
            return {k: (v[0], v[1]) for k, v in values.items() if tuple(v) != (0, 0)}

        assert nonzero(counters) == nonzero(self.model)
        for (scope, period), (spent, reserved) in counters.items():
            assert reserved >= 0
            limit = self.limits[scope]
            if limit is not None and (scope, period) not in self.over_hold:
                assert spent + reserved <= limit, (scope, period, spent, reserved, limit)
        assert in_flight == self.slots
        tenant_now = self.counter(f"tenant:{self.tenant_id}", self.period_start)
        assert (usage.spent_cents, usage.reserved_cents) == tuple(tenant_now)

    def teardown(self) -> None:
        if not self.ready:
            return
        clock.reset()
        # Delete this example's rows, even when it failed half-way: no 'submitting' row is left for the
        # next example's recovery count, and the ledger that verify_ledger scans stays small.
        self.env.run(self._delete())

    async def _delete(self) -> None:
        async with transaction(self.env.runtime.sessions) as session:
            await session.execute(delete(LedgerEntry).where(LedgerEntry.tenant_id == self.tenant_id))
            await session.execute(delete(DailyUsage).where(DailyUsage.tenant_id == self.tenant_id))
            await session.execute(delete(ThresholdNotice).where(ThresholdNotice.tenant_id == self.tenant_id))
            await session.execute(delete(BudgetCounter).where(BudgetCounter.scope.in_(list(self.limits))))
            await session.execute(delete(Prediction).where(Prediction.tenant_id == self.tenant_id))
            await session.execute(delete(ApiKey).where(ApiKey.tenant_id == self.tenant_id))
            await session.execute(delete(Tenant).where(Tenant.id == self.tenant_id))


def test_ledger_state_machine(engine: AsyncEngine, database_url: str, sim_url: str) -> None:
    """Needs `engine` only for the migrated schema; runs on an engine and event loop of its own."""
    loop = asyncio.new_event_loop()
    own_engine = create_engine(database_url, pool_size=2)

    async def build() -> Runtime:
        return build_runtime(make_settings(database_url, sim_url), own_engine, create_sessionmaker(own_engine))

    env = Env(loop, own_engine, loop.run_until_complete(build()))
    machine = type("Machine", (LedgerMachine,), {"env": env})
    try:
        run_state_machine_as_test(
            machine,
            settings=hsettings(
                max_examples=30,
                stateful_step_count=20,
                deadline=None,
                database=None,
                report_multiple_bugs=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            ),
        )
    finally:
        clock.reset()
        loop.run_until_complete(env.runtime.close())
        loop.run_until_complete(empty_tables(own_engine))
        loop.run_until_complete(own_engine.dispose())
        loop.close()
