"""Routing and failover across providers (SPEC §11), each provider a simulator of its own.

Every claim is asserted by what the simulators received (submits, polls, keys) and by the ledger,
never by time: where time matters, the app clock is moved (app/core/clock.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import pytest
from pydantic import SecretStr
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from app.budgets.models import LedgerEntry
from app.core import clock
from app.core.database import create_sessionmaker, transaction
from app.predictions.models import Prediction
from app.providers import service as providers_service
from app.providers.config import ProviderConfig, Registry
from app.providers.models import ProviderState
from app.runtime import build_runtime
from app.upstream.simulator import STATE, SimConfig, SimState, start_simulator
from app.worker import Worker
from bench.ports import free_port
from tests.conftest import Api, _api, empty_tables, eventually, make_settings, valid_body

POLICIES = ["priority", "cheapest", "weighted"]


@dataclass
class Sim:
    url: str
    state: SimState

    @property
    def host(self) -> str:
        return urlsplit(self.url).netloc


@pytest.fixture
async def sims() -> AsyncIterator[list[Sim]]:
    started = [await start_simulator(config=SimConfig(completion_s=0.3, estimated_time="0-1s")) for _ in range(3)]
    yield [Sim(url, runner.app[STATE]) for runner, url in started]
    for runner, _ in started:
        await runner.cleanup()


def closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there: connections are refused


def provider(name: str, kind: str, url: str, **values: Any) -> ProviderConfig:
    values.setdefault("cents_per_second", {"480p": 1.8, "720p": 3.6, "1080p": 7.2} if kind != "vibedream" else {})
    values.setdefault("output_hosts", [urlsplit(url).netloc])
    return ProviderConfig(
        name=name, kind=kind, base_url=url, api_key=SecretStr(f"key-of-{name}"), api_key_env=f"{name}_KEY", **values
    )


@asynccontextmanager
async def gateway(engine: AsyncEngine, database_url: str, registry: Registry, **overrides: Any) -> AsyncIterator[Api]:
    settings = make_settings(database_url, registry.providers[0].base_url, **overrides)
    rt = build_runtime(settings, engine, create_sessionmaker(engine), registry=registry)
    try:
        async for api in _api(rt):
            yield api
    finally:
        await rt.close()
        await empty_tables(engine)


async def ledger(api: Api, prediction_id: str | None = None) -> list[LedgerEntry]:
    async with transaction(api.runtime.sessions, readonly=True) as session:
        stmt = select(LedgerEntry).order_by(LedgerEntry.id)
        if prediction_id:
            stmt = stmt.where(LedgerEntry.prediction_id == prediction_id)
        return list(await session.scalars(stmt))


async def reserved_total(api: Api) -> int:
    async with transaction(api.runtime.sessions, readonly=True) as session:
        return int(await session.scalar(select(func.coalesce(func.sum(LedgerEntry.reserved_delta), 0))) or 0)


def first_is_a(policy: str, a_url: str, b_url: str, a_kind: str = "wavespeed", b_kind: str = "fal") -> Registry:
    """A tried first under `policy` (B second), A cheaper than B; under `weighted`, B has the better
    priority, so A first proves the weighted pick is used."""
    a_values: dict[str, Any] = {"priority": 1, "cents_per_second": {"480p": 1.8, "720p": 3.6, "1080p": 7.2}}
    b_values: dict[str, Any] = {"priority": 2, "cents_per_second": {"480p": 3.0, "720p": 6.0, "1080p": 12.0}}
    if policy == "cheapest":
        a_values["priority"], b_values["priority"] = 2, 1
    if policy == "weighted":
        a_values.update(priority=2, weight=1)
        b_values.update(priority=1, weight=0)
    return Registry(
        routing=policy,
        providers=[provider("b", b_kind, b_url, **b_values), provider("a", a_kind, a_url, **a_values)],
        source="test",
    )


# What each error class is made of at provider A: (faults, A's url or None for the simulator's).
ERRORS: dict[str, Callable[[Sim], str]] = {}


def make_error(kind: str, a: Sim) -> str:
    """Make A answer its next submit with this error class; the URL the gateway should call A at."""
    faults = a.state.faults
    if kind == "refused":
        return closed_port_url()
    if kind == "read_timeout":
        faults.submit_delay_s = 3.0  # past the upstream timeout of these gateways (1 s)
        return a.url
    faults.submit_status, faults.submit_count = int(kind), 1
    faults.submit_retry_after = "30" if kind == "429" else None
    return a.url


MOVES_ON = {
    "429": True,
    "500": True,
    "503": True,
    "401": True,
    "403": True,
    "refused": True,
    "400": False,
    "read_timeout": False,
}
COOLS_DOWN = {"429", "401", "403"}


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("error", list(MOVES_ON))
async def test_failover_matrix(
    engine: AsyncEngine, database_url: str, sims: list[Sim], policy: str, error: str
) -> None:
    a, b, _ = sims
    a_url = make_error(error, a)
    registry = first_is_a(policy, a_url, b.url)
    async with gateway(engine, database_url, registry, upstream_timeout_s=1.0) as api:
        tenant = await api.tenant(budgetCents=1000)
        response = await tenant.submit(valid_body())
        # A was tried once, first; B only when the error class moves on.
        assert a.state.submits == (0 if error == "refused" else 1)
        assert b.state.accepted == (1 if MOVES_ON[error] else 0), response.text
        entries = await ledger(api)
        if MOVES_ON[error]:
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["provider"] == "b"
            # Held the highest candidate price (B: 3 c/s x 5 s = 15), charged B's.
            assert body["costCents"] == 15
            (settle,) = [e for e in entries if e.kind == "settle"]
            assert (settle.provider, settle.spent_delta) == ("b", 15)
            assert [e.reserved_delta for e in entries if e.kind == "reserve"] == [15]
        else:
            assert response.status_code == (422 if error == "400" else 503), response.text
            assert response.json()["code"] == ("upstream_rejected" if error == "400" else "upstream_unavailable")
            assert [e.kind for e in entries] == ["reserve", "release"]
            assert entries[1].provider == "a"
        assert await reserved_total(api) == 0
        state = api.runtime.providers.health.state("a")
        assert (state.cooldown_until is not None) == (error in COOLS_DOWN)
        if error in COOLS_DOWN:
            # Kept out of rotation: the next submit does not reach A at all.
            again = await tenant.submit(valid_body())
            assert again.status_code == 200 and again.json()["provider"] == "b"
            assert a.state.submits == 1


async def test_a_refused_connection_on_the_first_provider_is_failed_over_and_counted(
    engine: AsyncEngine, database_url: str, sims: list[Sim]
) -> None:
    _, b, _ = sims
    registry = Registry(
        providers=[
            provider("down", "vibedream", closed_port_url(), priority=1),
            provider("up", "fal", b.url, priority=2),
        ],
        source="test",
    )
    async with gateway(engine, database_url, registry) as api:
        tenant = await api.tenant()
        response = await tenant.submit(valid_body())
        assert response.status_code == 200 and response.json()["provider"] == "up", response.text
        assert b.state.submits_by_format == {"fal": 1}
        async with transaction(api.runtime.sessions, readonly=True) as session:
            (live,) = [s for s in await providers_service.live_states(session, registry) if s.name == "down"]
        assert live.failures == 1 and live.circuit == "closed" and live.last_error


async def test_a_429_keeps_the_provider_out_for_its_retry_after(
    engine: AsyncEngine, database_url: str, sims: list[Sim]
) -> None:
    a, b, _ = sims
    a.state.faults.submit_status, a.state.faults.submit_count, a.state.faults.submit_retry_after = 429, 1, "30"
    registry = Registry(
        providers=[provider("a", "wavespeed", a.url, priority=1), provider("b", "wavespeed", b.url, priority=2)],
        source="test",
    )
    async with gateway(engine, database_url, registry) as api:
        tenant = await api.tenant()
        start = clock.now()
        assert (await tenant.submit(valid_body())).json()["provider"] == "b"
        assert a.state.submits == 1
        for _ in range(3):
            assert (await tenant.submit(valid_body())).json()["provider"] == "b"
        assert a.state.submits == 1  # out of rotation for its Retry-After
        clock.shift_to(start + timedelta(seconds=29))
        assert (await tenant.submit(valid_body())).json()["provider"] == "b"
        assert a.state.submits == 1
        clock.shift_to(start + timedelta(seconds=31))
        assert (await tenant.submit(valid_body())).json()["provider"] == "a"
        assert a.state.submits == 2 and b.state.submits == 5


async def test_an_open_circuit_is_never_tried_first_then_one_request_probes_it(
    engine: AsyncEngine, database_url: str, sims: list[Sim]
) -> None:
    a, b, _ = sims
    a.state.faults.submit_status, a.state.faults.submit_count = 500, 2
    registry = Registry(
        providers=[
            provider("a", "vibedream", a.url, priority=1, failure_threshold=2, cooldown_s=60),
            provider("b", "vibedream", b.url, priority=2),
        ],
        source="test",
    )
    async with gateway(engine, database_url, registry) as api:
        tenant = await api.tenant()
        start = clock.now()
        for _ in range(2):
            assert (await tenant.submit(valid_body())).json()["provider"] == "b"
        assert a.state.submits == 2  # two errors in a row: its circuit is open
        for _ in range(5):
            assert (await tenant.submit(valid_body())).json()["provider"] == "b"
        assert a.state.submits == 2  # never tried, let alone first
        async with transaction(api.runtime.sessions, readonly=True) as session:
            states = {s.name: s for s in await providers_service.live_states(session, registry)}
        assert states["a"].circuit == "open"
        clock.shift_to(start + timedelta(seconds=61))
        # Half-open: one request probes it; it answers, the circuit closes, and it serves again first.
        assert (await tenant.submit(valid_body())).json()["provider"] == "a"
        assert (await tenant.submit(valid_body())).json()["provider"] == "a"
        assert a.state.submits == 4
        async with transaction(api.runtime.sessions, readonly=True) as session:
            states = {s.name: s for s in await providers_service.live_states(session, registry)}
        assert states["a"].circuit == "closed" and states["a"].failures == 0


async def test_a_failed_probe_reopens_the_circuit(engine: AsyncEngine, database_url: str, sims: list[Sim]) -> None:
    a, b, _ = sims
    a.state.faults.submit_status, a.state.faults.submit_count = 503, 3
    registry = Registry(
        providers=[
            provider("a", "vibedream", a.url, priority=1, failure_threshold=2, cooldown_s=60),
            provider("b", "vibedream", b.url, priority=2),
        ],
        source="test",
    )
    async with gateway(engine, database_url, registry) as api:
        tenant = await api.tenant()
        start = clock.now()
        for _ in range(2):
            await tenant.submit(valid_body())
        clock.shift_to(start + timedelta(seconds=61))
        assert (await tenant.submit(valid_body())).json()["provider"] == "b"  # the probe failed over to b
        assert a.state.submits == 3
        assert (await tenant.submit(valid_body())).json()["provider"] == "b"
        assert a.state.submits == 3  # open again


async def test_a_read_timeout_never_reaches_a_second_provider(
    engine: AsyncEngine, database_url: str, sims: list[Sim]
) -> None:
    a, b, c = sims
    a.state.faults.submit_delay_s = 3.0
    registry = Registry(
        providers=[
            provider("a", "fal", a.url, priority=1),
            provider("b", "wavespeed", b.url, priority=2),
            provider("c", "vibedream", c.url, priority=3),
        ],
        source="test",
    )
    async with gateway(engine, database_url, registry, upstream_timeout_s=1.0) as api:
        tenant = await api.tenant()
        response = await tenant.submit(valid_body())
        assert response.status_code == 503 and response.json()["code"] == "upstream_unavailable"
        assert len(a.state.bodies) == 1 and b.state.submits == 0 and c.state.submits == 0
        assert await reserved_total(api) == 0


# ---------------------------------------------------------------- what users of LLM routers complain about


@pytest.mark.parametrize("policy", ["priority", "cheapest"])
async def test_the_order_is_obeyed(engine: AsyncEngine, database_url: str, sims: list[Sim], policy: str) -> None:
    """litellm#18444: `order` was ignored. The file lists c, b, a; priority and price say a, b, c."""
    a, b, c = sims
    prices = {"a": 1.0, "b": 2.0, "c": 3.0}
    registry = Registry(
        routing=policy,
        providers=[
            provider(
                name, "wavespeed", sim.url, priority=rank, resolutions=["480p"], cents_per_second={"480p": prices[name]}
            )
            for name, sim, rank in (("c", c, 3), ("b", b, 2), ("a", a, 1))
        ],
        source="test",
    )
    async with gateway(engine, database_url, registry) as api:
        tenant = await api.tenant()
        assert [(await tenant.submit(valid_body())).json()["provider"] for _ in range(3)] == ["a", "a", "a"]
        a.state.faults.submit_status, a.state.faults.submit_count = 500, 1
        assert (await tenant.submit(valid_body())).json()["provider"] == "b"
        assert (b.state.submits, c.state.submits) == (1, 0)


async def test_weighted_first_picks_follow_the_weights(engine: AsyncEngine, database_url: str, sims: list[Sim]) -> None:
    a, b, _ = sims
    registry = Registry(
        routing="weighted",
        providers=[provider("a", "vibedream", a.url, weight=3), provider("b", "vibedream", b.url, weight=1)],
        source="test",
    )
    async with gateway(engine, database_url, registry) as api:
        tenant = await api.tenant()
        picks = [(await tenant.submit(valid_body())).json()["provider"] for _ in range(80)]
    # Expected 60 / 20; the bounds are 5 standard deviations wide (binomial, n=80, p=0.75): never flaky.
    assert 40 <= picks.count("a") <= 79 and picks.count("a") + picks.count("b") == 80


async def test_a_fallback_never_retries_the_deployment_that_failed(
    engine: AsyncEngine, database_url: str, sims: list[Sim]
) -> None:
    """litellm#38968: the fallback picked the same failed deployment again."""
    a, b, c = sims
    a.state.faults.submit_status, a.state.faults.submit_count = 503, 10
    b.state.faults.submit_status, b.state.faults.submit_count = 500, 10
    registry = Registry(
        providers=[
            provider(n, "vibedream", s.url, priority=i) for i, (n, s) in enumerate((("a", a), ("b", b), ("c", c)))
        ],
        source="test",
    )
    async with gateway(engine, database_url, registry) as api:
        tenant = await api.tenant()
        response = await tenant.submit(valid_body())
        assert response.json()["provider"] == "c"
        assert (a.state.submits, b.state.submits, c.state.submits) == (1, 1, 1)
        c.state.faults.submit_status, c.state.faults.submit_count = 502, 10
        failed = await tenant.submit(valid_body(queue=False))  # not queued (SPEC §12): the failover's own answer
        assert failed.status_code == 503 and failed.json()["code"] == "upstream_unavailable"
        assert (a.state.submits, b.state.submits, c.state.submits) == (2, 2, 2)  # each once more, none twice
        assert await reserved_total(api) == 0


@pytest.mark.parametrize("status", [401, 403])
async def test_a_provider_refusing_our_credentials_is_taken_out_of_rotation(
    engine: AsyncEngine, database_url: str, sims: list[Sim], status: int, caplog: pytest.LogCaptureFixture
) -> None:
    """litellm#37592: a deployment answering 401/402 was never cooled down."""
    a, b, _ = sims
    a.state.faults.submit_status, a.state.faults.submit_count = status, 100
    registry = Registry(
        providers=[
            provider("a", "fal", a.url, priority=1, cooldown_s=300),
            provider("b", "wavespeed", b.url, priority=2),
        ],
        source="test",
    )
    async with gateway(engine, database_url, registry) as api:
        tenant = await api.tenant()
        for _ in range(4):
            assert (await tenant.submit(valid_body())).json()["provider"] == "b"
        assert a.state.submits == 1
        errors = [r for r in caplog.records if r.levelname == "ERROR" and getattr(r, "provider", None) == "a"]
        assert errors and "credentials" in errors[0].getMessage()
        async with transaction(api.runtime.sessions, readonly=True) as session:
            (row,) = await session.scalars(select(ProviderState).where(ProviderState.name == "a"))
        assert row.cooldown_until is not None and str(status) in (row.cooldown_reason or "")


async def test_a_request_the_provider_refuses_is_the_answer_and_cools_nothing(
    engine: AsyncEngine, database_url: str, sims: list[Sim]
) -> None:
    """A 400 (or 402) says the request, not the provider, is at fault (SPEC §11: any other 4xx is the answer)."""
    a, b, _ = sims
    a.state.faults.submit_status, a.state.faults.submit_count = 400, 1
    registry = Registry(
        providers=[provider("a", "vibedream", a.url, priority=1), provider("b", "vibedream", b.url, priority=2)],
        source="test",
    )
    async with gateway(engine, database_url, registry) as api:
        tenant = await api.tenant()
        refused = await tenant.submit(valid_body())
        assert refused.status_code == 422 and refused.json()["code"] == "upstream_rejected"
        assert b.state.submits == 0
        assert (await tenant.submit(valid_body())).json()["provider"] == "a"  # not cooled down


async def test_polls_go_only_to_the_provider_that_accepted_with_its_own_key(
    engine: AsyncEngine, database_url: str, sims: list[Sim]
) -> None:
    """litellm#33423, #33740, #19874: status calls went to the wrong deployment or key."""
    a, b, c = sims
    registry = Registry(
        providers=[
            provider("a", "vibedream", a.url, priority=1),
            provider("b", "fal", b.url, priority=2),
            provider("c", "wavespeed", c.url, priority=3),
        ],
        source="test",
    )
    async with gateway(engine, database_url, registry) as api:
        tenant = await api.tenant()
        ids: dict[str, str] = {}
        for name, sim in (("a", a), ("b", b), ("c", c)):
            # Each of the others refuses this submit, so exactly `name` accepts it.
            for other in (a, b, c):
                other.state.faults.submit_status = 503
                other.state.faults.submit_count = 0 if other is sim else 1
            response = await tenant.submit(valid_body())
            assert response.json()["provider"] == name, response.text
            ids[name] = response.json()["id"]
        worker = Worker(api.runtime)
        import asyncio

        task = asyncio.create_task(worker.run())
        try:

            async def all_done() -> bool:
                got = [(await tenant.get(f"/api/v1/predictions/{i}")).json() for i in ids.values()]
                return all(g["status"] == "completed" for g in got)

            await eventually(all_done, what="the three predictions completed")
        finally:
            worker.stop()
            await asyncio.wait_for(task, 30)
        for name, sim in (("a", a), ("b", b), ("c", c)):
            polled = set(sim.state.polls_by_id)
            assert len(polled) == 1, (name, polled)  # only its own prediction, never another's
            assert set(sim.state.auths) == {("Key " if name == "b" else "Bearer ") + f"key-of-{name}"}
        for name, prediction_id in ids.items():
            got = (await tenant.get(f"/api/v1/predictions/{prediction_id}")).json()
            assert got["provider"] == name and got["outputs"]
        async with transaction(api.runtime.sessions, readonly=True) as session:
            rows = {p.provider: p for p in await session.scalars(select(Prediction))}
        assert rows["b"].upstream_ref and rows["b"].upstream_ref["status"].startswith(b.url)


async def test_nothing_served_is_422_naming_the_field_before_anything_is_held(
    engine: AsyncEngine, database_url: str, sims: list[Sim]
) -> None:
    a, b, _ = sims
    registry = Registry(
        providers=[
            provider(
                "a",
                "fal",
                a.url,
                resolutions=["480p", "720p"],
                max_duration=10,
                cents_per_second={"480p": 1, "720p": 2},
            ),
            provider("b", "wavespeed", b.url, resolutions=["480p"], max_duration=8, cents_per_second={"480p": 1}),
        ],
        source="test",
    )
    async with gateway(engine, database_url, registry) as api:
        tenant = await api.tenant()
        for body, field in ((valid_body(resolution="1080p"), "resolution"), (valid_body(duration=12), "duration")):
            refused = await tenant.submit(body)
            assert refused.status_code == 422, refused.text
            assert (refused.json()["code"], refused.json()["field"]) == ("not_served", field)
        assert await ledger(api) == [] and a.state.submits == b.state.submits == 0
        # 720p for 10 s: only a serves it.
        assert (await tenant.submit(valid_body(resolution="720p", duration=10))).json()["provider"] == "a"


async def test_a_disabled_provider_gets_no_new_submit(engine: AsyncEngine, database_url: str, sims: list[Sim]) -> None:
    a, b, _ = sims
    registry = Registry(
        providers=[provider("a", "vibedream", a.url, priority=1), provider("b", "vibedream", b.url, priority=2)],
        source="test",
    )
    async with gateway(engine, database_url, registry) as api:
        tenant = await api.tenant()
        assert (await tenant.submit(valid_body())).json()["provider"] == "a"
        async with transaction(api.runtime.sessions) as session:
            assert await providers_service.set_disabled(session, "a", disabled=True, actor="admin") == (False, True)
        await api.runtime.providers.health.refresh(force=True)  # what STATE_TTL_S does by itself
        assert (await tenant.submit(valid_body())).json()["provider"] == "b"
        assert a.state.submits == 1
        async with transaction(api.runtime.sessions) as session:
            await providers_service.set_disabled(session, "a", disabled=False)
        await api.runtime.providers.health.refresh(force=True)
        assert (await tenant.submit(valid_body())).json()["provider"] == "a"


async def test_no_candidate_now_is_a_503_before_anything_is_held(
    engine: AsyncEngine, database_url: str, sims: list[Sim]
) -> None:
    a, _, _ = sims
    registry = Registry(providers=[provider("a", "vibedream", a.url)], source="test")
    async with gateway(engine, database_url, registry) as api:
        tenant = await api.tenant()
        async with transaction(api.runtime.sessions) as session:
            await providers_service.set_disabled(session, "a", disabled=True)
        await api.runtime.providers.health.refresh(force=True)
        refused = await tenant.submit(valid_body(queue=False))  # a caller who wants no queue (SPEC §12)
        assert refused.status_code == 503 and refused.json()["code"] == "no_provider_available"
        assert int(refused.headers["retry-after"]) >= 1
        assert await ledger(api) == [] and a.state.submits == 0
        queued = await tenant.submit(valid_body())  # anyone else waits in the queue, held
        assert queued.status_code == 200 and queued.json()["queued"] is True and a.state.submits == 0


async def test_max_concurrent_holds_and_comes_back_when_predictions_end(
    engine: AsyncEngine, database_url: str, sims: list[Sim]
) -> None:
    a, b, _ = sims
    a.state.config.completion_s = 60.0
    registry = Registry(
        providers=[
            provider("a", "fal", a.url, priority=1, max_concurrent=2),
            provider("b", "vibedream", b.url, priority=2),
        ],
        source="test",
    )
    async with gateway(engine, database_url, registry) as api:
        tenant = await api.tenant()
        served = [(await tenant.submit(valid_body())).json()["provider"] for _ in range(4)]
        assert served == ["a", "a", "b", "b"]
        assert a.state.accepted == 2
        async with transaction(api.runtime.sessions, readonly=True) as session:
            (live,) = [s for s in await providers_service.live_states(session, registry) if s.name == "a"]
        assert live.in_flight == 2
        for sim_prediction in a.state.predictions.values():
            sim_prediction.done_at = 0.0  # done now
        worker = Worker(api.runtime)
        import asyncio

        task = asyncio.create_task(worker.run())
        try:

            async def freed() -> bool:
                async with transaction(api.runtime.sessions, readonly=True) as session:
                    states = await providers_service.live_states(session, registry)
                return [s.in_flight for s in states if s.name == "a"] == [0]

            await eventually(freed, what="a's slots back")
        finally:
            worker.stop()
            await asyncio.wait_for(task, 30)
        assert (await tenant.submit(valid_body())).json()["provider"] == "a"


async def test_rate_per_minute_holds(engine: AsyncEngine, database_url: str, sims: list[Sim]) -> None:
    a, b, _ = sims
    registry = Registry(
        providers=[
            provider("a", "wavespeed", a.url, priority=1, rate_per_minute=3),
            provider("b", "vibedream", b.url, priority=2),
        ],
        source="test",
    )
    async with gateway(engine, database_url, registry) as api:
        tenant = await api.tenant()
        clock.shift_to(clock.now().replace(second=1))
        served = [(await tenant.submit(valid_body())).json()["provider"] for _ in range(5)]
        assert served == ["a", "a", "a", "b", "b"]
        clock.shift_to(clock.now() + timedelta(minutes=1))
        assert (await tenant.submit(valid_body())).json()["provider"] == "a"


async def test_the_hold_is_the_highest_candidate_price_and_the_settle_the_servers(
    engine: AsyncEngine, database_url: str, sims: list[Sim]
) -> None:
    a, b, _ = sims
    registry = Registry(
        providers=[
            provider("a", "vibedream", a.url, priority=1),  # charged its costCents: 9 for 480p, 5 s
            provider("b", "fal", b.url, priority=2, cents_per_second={"480p": 3.0, "720p": 6.0, "1080p": 12.0}),
        ],
        source="test",
    )
    async with gateway(engine, database_url, registry) as api:
        tenant = await api.tenant(budgetCents=24, budgetPeriod="total")
        first = await tenant.submit(valid_body())
        assert first.status_code == 200 and (first.json()["provider"], first.json()["costCents"]) == ("a", 9)
        entries = await ledger(api, first.json()["id"])
        assert [(e.kind, e.reserved_delta, e.spent_delta, e.provider) for e in entries] == [
            ("reserve", 15, 0, None),  # b's price: whichever serves, the budget holds
            ("settle", -15, 9, "a"),
        ]
        # 15 left: exactly one more hold of 15 fits; after its settle 6 are left, and no hold fits.
        second = await tenant.submit(valid_body())
        assert second.status_code == 200 and second.json()["costCents"] == 9
        third = await tenant.submit(valid_body())
        assert third.status_code == 402 and third.json()["code"] == "budget_exceeded"
        usage = (await tenant.get("/api/v1/usage")).json()
        assert (usage["spentCents"], usage["reservedCents"], usage["remainingCents"]) == (18, 0, 6)
        # The other way round: served by b, charged b's price.
        a.state.faults.submit_status, a.state.faults.submit_count = 503, 1
        tenant2 = await api.tenant(name="second", budgetCents=15, budgetPeriod="total")
        served_by_b = await tenant2.submit(valid_body())
        assert (served_by_b.json()["provider"], served_by_b.json()["costCents"]) == ("b", 15)
        assert (await tenant2.get("/api/v1/usage")).json()["remainingCents"] == 0


async def test_outputs_are_fetched_only_from_the_serving_providers_hosts(
    engine: AsyncEngine, database_url: str, sims: list[Sim]
) -> None:
    a, b, _ = sims
    registry = Registry(
        providers=[
            provider("a", "vibedream", a.url, priority=1),
            # b's outputs come from its simulator, but b says they come from elsewhere only.
            provider("b", "wavespeed", b.url, priority=2, output_hosts=["cdn.example.com"]),
        ],
        source="test",
    )
    async with gateway(engine, database_url, registry, public_base_url="http://gateway.test") as api:
        tenant = await api.tenant()
        good = (await tenant.submit(valid_body())).json()
        a.state.faults.submit_status, a.state.faults.submit_count = 503, 1
        bad = (await tenant.submit(valid_body())).json()
        assert (good["provider"], bad["provider"]) == ("a", "b")
        worker = Worker(api.runtime)
        import asyncio

        task = asyncio.create_task(worker.run())
        try:

            async def ended() -> bool:
                got = [(await tenant.get(f"/api/v1/predictions/{p['id']}")).json() for p in (good, bad)]
                return all(g["status"] in ("completed", "failed") for g in got)

            await eventually(ended, what="both predictions ended")
        finally:
            worker.stop()
            await asyncio.wait_for(task, 30)
        good_now = (await tenant.get(f"/api/v1/predictions/{good['id']}")).json()
        bad_now = (await tenant.get(f"/api/v1/predictions/{bad['id']}")).json()
        assert good_now["status"] == "completed" and a.state.output_fetches == 1
        assert bad_now["status"] == "failed" and "'b'" in bad_now["error"] and b.state.output_fetches == 0
