"""A database that is away is an outage, not a bug in the request: every route answers 503
`database_unavailable` with Retry-After while it lasts, and the process carries on by itself when the
database is back, losing no prediction, no cent and no notification (SPEC §7).

PostgreSQL is cut away through a TCP proxy in front of it (tests/tcpproxy.py), never by restarting the
shared server; SQLite's file is held by another connection beyond the busy timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
from collections import Counter
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from app.budgets import service as budgets_service
from app.budgets.models import LedgerEntry
from app.core import clock
from app.core.database import create_engine, create_sessionmaker, is_outage, transaction
from app.core.errors import DatabaseUnavailable
from app.predictions.models import Prediction
from app.runtime import Runtime, build_runtime
from app.upstream.schemas import UpstreamSubmitted
from app.upstream.simulator import SimState
from app.webhooks.models import WebhookDelivery
from app.worker import Worker
from bench.ports import free_port
from tests.conftest import TEST_DB, Api, Receiver, Tenant, _api, empty_tables, eventually, make_settings, valid_body
from tests.tcpproxy import TcpProxy

COST = 9  # what the simulator charges for 480p, 5 s

pg_only = pytest.mark.skipif(TEST_DB != "postgresql", reason="cuts PostgreSQL away through a TCP proxy")
sqlite_only = pytest.mark.skipif(TEST_DB != "sqlite", reason="locks a SQLite file")


def assert_unavailable(response: httpx.Response, what: str) -> None:
    assert response.status_code == 503, f"{what}: {response.status_code} {response.text}"
    assert response.headers["content-type"] == "application/problem+json", what
    assert response.json()["code"] == "database_unavailable", f"{what}: {response.text}"
    assert int(response.headers["retry-after"]) > 0, what


# ---------------------------------------------------------------- what counts as an outage


async def test_an_unreachable_database_is_an_outage_and_a_wrong_statement_is_not(
    engine: AsyncEngine, tmp_path: Path
) -> None:
    # Nothing listens on the port: the driver's connect is refused.
    refused = create_engine(f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/vidgate", pool_size=1)
    # The SQLite file's directory is gone and a plain file stands in its place: "unable to open database file".
    gone = create_engine(f"sqlite+aiosqlite:///{tmp_path}/volume/vidgate.db")
    (tmp_path / "volume").rmdir()
    (tmp_path / "volume").write_text("not a directory")
    try:
        for unreachable in (refused, gone):
            with pytest.raises(DatabaseUnavailable) as raised:
                async with transaction(create_sessionmaker(unreachable), readonly=True) as session:
                    await session.execute(text("SELECT 1"))
            assert raised.value.status == 503 and raised.value.headers["Retry-After"]
    finally:
        await refused.dispose()
        await gone.dispose()

    # A statement the database refuses is a bug, and stays one (a 500, logged), on either database.
    with pytest.raises(Exception) as wrong:
        async with transaction(create_sessionmaker(engine)) as session:
            await session.execute(text("SELECT * FROM no_such_table"))
    assert not isinstance(wrong.value, DatabaseUnavailable), repr(wrong.value)


def test_sqlite_errors_from_the_writer_thread_are_judged_as_wrapped_ones(tmp_path: Path) -> None:
    """SQLite's one-step batch (app/budgets/sqlitebatch.py) runs sqlite3 itself, so what it raises comes
    unwrapped by SQLAlchemy: a file locked beyond the busy timeout is an outage (a 503), a missing table
    a bug, as when SQLAlchemy raised them."""
    path = tmp_path / "locked.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x INTEGER)")
    holder.execute("BEGIN IMMEDIATE")
    writer = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        with pytest.raises(sqlite3.OperationalError) as locked:
            writer.execute("BEGIN IMMEDIATE")
        with pytest.raises(sqlite3.OperationalError) as missing:
            writer.execute("SELECT * FROM no_such_table")
    finally:
        writer.close()
        holder.close()
    assert is_outage(locked.value), locked.value
    assert not is_outage(missing.value), missing.value


# ---------------------------------------------------------------- a gateway whose database the test takes away


class Outage:
    """Takes the database away from one runtime's engine and gives it back. PostgreSQL: a proxy in
    front of the server drops every connection and refuses new ones. SQLite: another process (a backup,
    an operator's sqlite3 shell) holds the file's write lock beyond the busy timeout."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self.proxy: TcpProxy | None = None
        self.holder: sqlite3.Connection | None = None
        self.started = False
        self.begun = asyncio.Event()  # set once the database is away

    async def engine(self) -> AsyncEngine:
        if TEST_DB != "postgresql":
            # A short busy timeout, so that the test need not wait the default 30 s.
            return create_engine(self.database_url, sqlite_busy_timeout_s=0.2)
        url = make_url(self.database_url)
        self.proxy = await TcpProxy(url.host or "127.0.0.1", url.port or 5432).start()
        through = url.set(host=self.proxy.host, port=self.proxy.port)
        return create_engine(through.render_as_string(hide_password=False), pool_size=10)

    async def begin(self) -> None:
        if self.proxy is not None:
            await self.proxy.drop()
        else:
            path = self.database_url.split(":///", 1)[1]
            self.holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            # In a thread: the gateway may hold the write lock right now and must be able to let go of it.
            await asyncio.to_thread(self.holder.execute, "BEGIN IMMEDIATE")
        self.begun.set()

    async def begin_once(self) -> None:
        """For fault injection at a point the code passes more than once: the first time only."""
        if not self.started:
            self.started = True
            await self.begin()

    async def end(self) -> None:
        if self.proxy is not None:
            await self.proxy.restore()
        elif self.holder is not None:
            self.holder.execute("ROLLBACK")
            self.holder.close()
            self.holder = None

    async def close(self) -> None:
        if self.proxy is not None:
            await self.proxy.close()
        if self.holder is not None:
            self.holder.close()


@contextlib.asynccontextmanager
async def outage_gateway(
    database_url: str, engine: AsyncEngine, sim_url: str, **settings: Any
) -> AsyncIterator[tuple[Api, Outage]]:
    """The app in-process, on a runtime and engine of its own whose database `Outage` can take away."""
    outage = Outage(database_url)
    own = await outage.engine()
    runtime = build_runtime(
        make_settings(own.url.render_as_string(hide_password=False), sim_url, **settings),
        own,
        create_sessionmaker(own),
    )
    try:
        async for api in _api(runtime):
            yield api, outage
    finally:
        await outage.close()
        await runtime.close()
        await own.dispose()
        await empty_tables(engine)


async def charges(engine: AsyncEngine, tenant_id: str) -> Counter[str]:
    """How many times each prediction of the tenant was charged, once the ledger's balances check out."""
    async with transaction(create_sessionmaker(engine), readonly=True) as session:
        assert await budgets_service.verify_ledger(session) == []
        settled = await session.scalars(
            select(LedgerEntry.prediction_id).where(LedgerEntry.tenant_id == tenant_id, LedgerEntry.kind == "settle")
        )
        return Counter(str(pid) for pid in settled)


@sqlite_only
async def test_sqlite_file_locked_beyond_the_busy_timeout_answers_503_then_recovers(
    database_url: str, engine: AsyncEngine, sim_url: str, sim: SimState
) -> None:
    async with outage_gateway(database_url, engine, sim_url) as (api, outage):
        tenant = await api.tenant()
        before = await tenant.submit()
        assert before.status_code == 200, before.text

        await outage.begin()
        assert_unavailable(await tenant.submit(), "submit")
        assert_unavailable(await api.admin("POST", "/admin/v1/tenants", json={"name": "other"}), "admin create")
        # Reads go on beside the lock (WAL): only what needs what it cannot have is refused.
        seen = await tenant.get(f"/api/v1/predictions/{before.json()['id']}")
        assert seen.status_code == 200, seen.text
        await outage.end()

        after = await tenant.submit()
        assert after.status_code == 200, after.text
        # The two accepted submits are charged once each; the refused one held nothing.
        assert await charges(engine, tenant.id) == {before.json()["id"]: 1, after.json()["id"]: 1}


# ---------------------------------------------------------------- the vendor accepted, then the database went


def cut_after_upstream_accepts(runtime: Runtime, outage: Outage) -> None:
    """The database goes away at the worst moment: the vendor has just accepted (and billed) the submit."""
    accept = runtime.upstream.submit

    async def submit_then_cut(model_id: str, body: dict[str, object]) -> UpstreamSubmitted:
        accepted = await accept(model_id, body)
        await outage.begin()
        return accepted

    runtime.upstream.submit = submit_then_cut  # type: ignore[method-assign]


async def test_confirm_waits_out_an_outage_after_the_vendor_accepted(
    database_url: str, engine: AsyncEngine, sim_url: str, sim: SimState, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    async with outage_gateway(database_url, engine, sim_url) as (api, outage):
        tenant = await api.tenant()
        cut_after_upstream_accepts(api.runtime, outage)
        submit = asyncio.create_task(tenant.submit(valid_body(), **{"Idempotency-Key": "once"}))

        # More than a few quick retries: the outage outlasts a database hiccup.
        async def retried_enough() -> bool:
            return submit.done() or sum(r.getMessage() == "confirm retried" for r in caplog.records) >= 6

        await eventually(retried_enough, timeout=60, what="the confirm to meet the outage")
        assert not submit.done(), submit.result().text
        await outage.end()

        answer = await submit
        assert answer.status_code == 200, answer.text
        replay = await tenant.submit(valid_body(), **{"Idempotency-Key": "once"})
        assert replay.json() == answer.json() and replay.headers["idempotent-replayed"] == "true"
        assert await charges(engine, tenant.id) == {answer.json()["id"]: 1}
        assert sim.submits == 1


async def test_confirm_gives_up_well_before_recovery_and_says_what_happened(
    database_url: str, engine: AsyncEngine, sim_url: str, sim: SimState, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    # Recovery may release a hold 7 s after it was taken; the confirm stops trying within half of that.
    settings = dict(upstream_timeout_s=1.0, submit_recovery_s=7.0)
    async with outage_gateway(database_url, engine, sim_url, **settings) as (api, outage):
        tenant = await api.tenant()
        cut_after_upstream_accepts(api.runtime, outage)
        answer = await tenant.submit()
        assert_unavailable(answer, "a submit whose confirm could not be recorded")
        problem = answer.json()
        assert "accepted" in problem["detail"] and problem["predictionId"] in problem["detail"]
        # The operator can reconcile the vendor's bill from the log.
        (abandoned,) = [r for r in caplog.records if r.getMessage().startswith("confirm abandoned")]
        assert getattr(abandoned, "prediction_id", None) == problem["predictionId"]
        assert getattr(abandoned, "upstream_id", None) and getattr(abandoned, "cost_cents", None) == COST
        await outage.end()
        # The hold is left to recovery, which no confirm is racing any more.
        async with transaction(api.runtime.sessions, readonly=True) as session:
            row = await session.get(Prediction, problem["predictionId"])
        assert row is not None and row.status == "submitting"


@pg_only
async def test_an_outage_while_a_recorded_submit_waits_still_answers_it(
    database_url: str, engine: AsyncEngine, sim_url: str, sim: SimState
) -> None:
    async with outage_gateway(database_url, engine, sim_url) as (api, outage):
        tenant = await api.tenant()
        submit = asyncio.create_task(tenant.submit(valid_body(), Prefer="wait=3"))

        async def recorded() -> bool:
            # The settle committed: the prediction is processing and charged (read past the outage's proxy).
            async with transaction(create_sessionmaker(engine), readonly=True) as session:
                charged = await session.scalar(
                    select(func.count())
                    .select_from(Prediction)
                    .where(Prediction.tenant_id == tenant.id, Prediction.charged_cents.is_not(None))
                )
            return bool(charged)

        await eventually(recorded, timeout=60, what="the submit to be recorded")
        await outage.begin()  # while it waits for the prediction to end
        answer = await submit
        # Accepted, charged and recorded: an answer, not an error that would invite a second submit.
        assert answer.status_code == 200, answer.text
        assert answer.json()["status"] == "processing"


# ---------------------------------------------------------------- the webhook dispatcher


def failures_of(target: object, method: str) -> asyncio.Event:
    """An event set when `target.method` (a coroutine method) raises."""
    original = getattr(target, method)
    failed = asyncio.Event()

    async def watched(*args: Any) -> Any:
        try:
            return await original(*args)
        except Exception:
            failed.set()
            raise

    setattr(target, method, watched)
    return failed


async def test_an_outage_between_claiming_and_sending_a_webhook_leaves_no_endpoint_blocked(
    database_url: str, engine: AsyncEngine, sim_url: str, sim: SimState, receiver_factory: Any
) -> None:
    # One delivery at a time per endpoint: an endpoint counted busy for a delivery never sent stays blocked.
    async with outage_gateway(database_url, engine, sim_url, webhook_per_endpoint_concurrency=1) as (api, outage):
        receiver: Receiver = await receiver_factory()
        tenant = await api.tenant(webhookUrl=receiver.url)
        worker = Worker(api.runtime)
        claim = worker.dispatcher._claim_signed

        async def claim_then_cut(limit: int) -> tuple[list[WebhookDelivery], dict[str, list[str]]]:
            claimed = await claim(limit)
            if claimed[0]:
                await outage.begin_once()
            return claimed

        # The claim reads the signing secrets in its own transaction: from there to the send, nothing
        # needs the database, so the delivery goes out while it is away.
        worker.dispatcher._claim_signed = claim_then_cut  # type: ignore[method-assign]
        running = asyncio.create_task(worker.run())
        try:
            assert (await tenant.submit()).status_code == 200
            first = await receiver.next(timeout=60)
            await outage.end()
            # The endpoint was not left counted busy: the next delivery there goes out too.
            assert (await tenant.submit()).status_code == 200
            second = await receiver.next(timeout=60)
            assert [json.loads(d.body)["type"] for d in (first, second)] == ["prediction.completed"] * 2
            assert json.loads(first.body)["data"]["id"] != json.loads(second.body)["data"]["id"]
        finally:
            worker.stop()
            await asyncio.wait_for(running, 60)


async def test_a_webhook_sent_but_not_recorded_during_an_outage_is_not_sent_again(
    database_url: str,
    engine: AsyncEngine,
    sim_url: str,
    sim: SimState,
    receiver_factory: Any,
) -> None:
    async with outage_gateway(database_url, engine, sim_url) as (api, outage):
        receiver: Receiver = await receiver_factory()
        tenant = await api.tenant(webhookUrl=receiver.url)
        worker = Worker(api.runtime)
        post = worker.dispatcher._post

        async def post_then_cut(delivery: WebhookDelivery, secrets: list[str]) -> Any:
            answer = await post(delivery, secrets)
            await outage.begin_once()
            return answer

        worker.dispatcher._post = post_then_cut  # type: ignore[method-assign]
        record_failed = failures_of(worker.dispatcher, "record")
        running = asyncio.create_task(worker.run())
        try:
            assert (await tenant.submit()).status_code == 200
            await asyncio.wait_for(record_failed.wait(), 60)  # recording the attempt met the outage
            clock.shift_to(clock.now() + timedelta(minutes=1))  # the delivery's lease runs out meanwhile
            await outage.end()

            async def recorded() -> bool:
                async with transaction(create_sessionmaker(engine), readonly=True) as session:
                    status = await session.scalar(
                        select(WebhookDelivery.status).where(WebhookDelivery.tenant_id == tenant.id)
                    )
                return status == "succeeded"

            await eventually(recorded, timeout=60, what="the delivery to be recorded")
            assert len(receiver.received) == 1
        finally:
            worker.stop()
            await asyncio.wait_for(running, 60)


# ---------------------------------------------------------------- PostgreSQL: cut away under load


@pg_only
async def test_postgresql_cut_away_under_load_answers_503_and_recovers_losing_nothing(
    database_url: str,
    engine: AsyncEngine,
    sim_url: str,
    sim: SimState,
    receiver_factory: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    receiver: Receiver = await receiver_factory()
    settings = dict(upstream_timeout_s=5.0, submit_recovery_s=60.0, webhook_timeout_s=5.0)
    async with outage_gateway(database_url, engine, sim_url, **settings) as (api, outage):
        assert outage.proxy is not None
        worker = Worker(api.runtime)
        worker_task = asyncio.create_task(worker.run())
        try:
            await _cut_under_load(api, outage.proxy, receiver, engine, worker_task, caplog)
        finally:
            worker.stop()
            await asyncio.wait_for(worker_task, 60)


async def _cut_under_load(
    api: Api,
    proxy: TcpProxy,
    receiver: Receiver,
    engine: AsyncEngine,
    worker_task: asyncio.Task[None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    tenant = await api.tenant(webhookUrl=receiver.url)
    accepted: set[str] = set()
    answers: list[tuple[str, int, str | None]] = []  # (phase the request started in, status, problem code)
    phase = "before"
    stop = asyncio.Event()

    async def submitter() -> None:
        for _ in range(300):  # bounded; the test stops it long before
            if stop.is_set():
                return
            started = phase
            response = await tenant.submit()
            answers.append((started, response.status_code, _code(response)))
            if response.status_code != 200:
                await asyncio.sleep(0.05)
                continue
            accepted.add(response.json()["id"])
            started = phase
            seen = await tenant.get(f"/api/v1/predictions/{response.json()['id']}")
            answers.append((started, seen.status_code, _code(seen)))

    load = [asyncio.create_task(submitter()) for _ in range(3)]
    try:
        await eventually(lambda: _true(len(accepted) >= 6), timeout=60, what="submits before the cut")
        known = next(iter(accepted))

        await proxy.drop()
        phase = "cut"
        # Every route, while the database is away.
        assert_unavailable(await tenant.submit(), "submit")
        assert_unavailable(await tenant.get(f"/api/v1/predictions/{known}"), "get prediction")
        assert_unavailable(await tenant.get("/api/v1/predictions"), "list predictions")
        assert_unavailable(await tenant.get("/api/v1/usage"), "usage")
        assert_unavailable(await tenant.get("/api/v1/webhook-deliveries"), "tenant deliveries")
        assert_unavailable(await api.admin("GET", "/admin/v1/tenants"), "admin list")
        assert_unavailable(await api.admin("GET", f"/admin/v1/tenants/{tenant.id}"), "admin get")
        assert_unavailable(await api.admin("POST", "/admin/v1/tenants", json={"name": "b"}), "admin create")
        assert_unavailable(await api.admin("GET", "/admin/v1/ledger/verify"), "admin ledger verify")
        ready = await api.http.get("/readyz")
        assert_unavailable(ready, "readyz")
        assert ready.json()["ready"] is False
        # The load keeps knocking and each of the worker's loops meets the outage, for a while.
        await eventually(
            lambda: _true(sum(1 for p, _, _ in answers if p == "cut") >= 20), timeout=60, what="load during the cut"
        )
        await eventually(
            lambda: _true(_failed_steps(caplog) >= {"run_once", "housekeeping"}),
            timeout=60,
            what="the worker's loops to meet the outage",
        )

        await proxy.restore()
        # Back without a restart: the pool hands out fresh connections, not the dead ones.
        await eventually(lambda: _status_is(api.http, "/readyz", 200), timeout=60, what="readiness after the cut")
        phase = "after"
        settled = len(accepted)
        await eventually(lambda: _true(len(accepted) >= settled + 6), timeout=60, what="submits after the cut")
    finally:
        stop.set()
        await asyncio.gather(*load)

    assert not worker_task.done(), "a worker loop died"
    # Nothing answered 500; what failed, failed as an outage, and only while the database was away.
    assert all(status in (200, 503) for _, status, _ in answers), Counter(answers)
    assert all(code == "database_unavailable" for _, status, code in answers if status == 503), Counter(answers)
    assert any(status == 503 for p, status, _ in answers if p == "cut"), Counter(answers)
    assert all(status == 200 for p, status, _ in answers if p == "after"), Counter(answers)

    # Every accepted prediction ends, is charged once and notified once.
    sessions = create_sessionmaker(engine)

    async def all_notified() -> bool:
        async with transaction(sessions, readonly=True) as session:
            succeeded = await session.scalar(
                select(func.count())
                .select_from(WebhookDelivery)
                .where(WebhookDelivery.tenant_id == tenant.id, WebhookDelivery.status == "succeeded")
            )
        return succeeded == len(accepted)

    await eventually(all_notified, timeout=120, what="every accepted prediction to end and be notified")
    async with transaction(sessions, readonly=True) as session:
        rows = await session.execute(select(Prediction.id, Prediction.status).where(Prediction.id.in_(accepted)))
        statuses = {pid: status for pid, status in rows}
    assert statuses == dict.fromkeys(accepted, "completed")
    charged = await charges(engine, tenant.id)
    assert set(charged) == accepted and set(charged.values()) == {1}, charged
    notified = Counter(json.loads(r.body)["data"]["id"] for r in receiver.received)
    assert set(notified) == accepted and set(notified.values()) == {1}, notified


def _code(response: httpx.Response) -> str | None:
    return None if response.status_code == 200 else str(response.json().get("code"))


def _failed_steps(caplog: pytest.LogCaptureFixture) -> set[str]:
    return {
        str(getattr(record, "step", ""))
        for record in caplog.records
        if record.getMessage() == "worker step failed" and getattr(record, "error_type", "") == "DatabaseUnavailable"
    }


async def _true(value: bool) -> bool:
    return value


async def _status_is(http: httpx.AsyncClient, path: str, status: int) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return (await http.get(path)).status_code == status
    return False


@pg_only
async def test_pooled_connections_the_server_closed_are_replaced_at_no_cost_per_request(
    database_url: str, engine: AsyncEngine, sim_url: str, sim: SimState
) -> None:
    async with outage_gateway(database_url, engine, sim_url) as (api, outage):
        assert outage.proxy is not None
        tenant = await api.tenant()
        submitted = await tenant.submit()
        path = f"/api/v1/predictions/{submitted.json()['id']}"
        assert await read_concurrently(tenant, path, 5) == [200] * 5  # the pool now holds several connections
        sent = outage.proxy.sent
        for _ in range(20):
            assert (await tenant.get(path)).status_code == 200
        # The read alone (the key check comes from the cache), nothing else: no ping (pool_pre_ping
        # would add three).
        assert (outage.proxy.sent - sent) / 20 == 1

        # The server closes every connection (a restart) and is back before the next request.
        await outage.begin()
        await outage.end()
        assert await read_concurrently(tenant, path, 5) == [200] * 5


async def read_concurrently(tenant: Tenant, path: str, n: int) -> list[int]:
    return [r.status_code for r in await asyncio.gather(*(tenant.get(path) for _ in range(n)))]
