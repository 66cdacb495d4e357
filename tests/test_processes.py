"""Real processes: `vidgate serve`, `vidgate worker`, `vidgate simulator`, `vidgate migrate` and the
operator commands, started as subprocesses on free loopback ports against a database of this module's
own (a SQLite file or a PostgreSQL database, following VIDGATE_TEST_DB), from a working directory that
is not the project.

Covers: end to end over real HTTP, SIGKILL of a worker with predictions in flight, SIGKILL between a
terminal state and its webhook delivery (and in the middle of one), graceful SIGTERM handing leases
back, the sandbox quick start, the CLI, and the production start refusing to run without an admin token.

Every process started here is killed in teardown. No line any of them prints may contain a Python
traceback, the upstream key, the admin token or a tenant key (except where a command exists to show
a key: `keys create` and the sandbox banner, on stdout).
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from sqlalchemy import select

from app.core.database import create_engine
from app.core.settings import normalize_database_url
from app.predictions.models import Prediction
from app.upstream.simulator import SANDBOX_MP4
from tests.conftest import Receiver, valid_body
from tests.procs import (
    COST,
    TENANT_KEYS,
    Proc,
    Procs,
    Simulator,
    base_env,
    free_port,
    gateway_env,
    start_receiver_on,
    until,
    verify,
    wait_healthy,
)

# Fixtures: pytest finds them in this module's namespace (`x as x` marks them as used on purpose).
from tests.procs import module_procs_fixture as module_procs_fixture
from tests.procs import proc_cwd_fixture as proc_cwd_fixture
from tests.procs import proc_db_fixture as proc_db_fixture
from tests.procs import procs_fixture as procs_fixture
from tests.procs import sim_fixture as sim_fixture
from tests.procs import simulator_proc_fixture as simulator_proc_fixture

pytestmark = pytest.mark.slow


# ---------------------------------------------------------------- 1. end to end


async def test_end_to_end_with_real_processes(
    procs: Procs, proc_db: str, sim: Simulator, receiver_factory: Any
) -> None:
    gw = await procs.serve(gateway_env(proc_db, sim))
    async with gw.http:
        ready = await gw.http.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["ready"] is True
        assert "x-vidgate-sandbox" not in ready.headers

        unauthorized = await gw.http.get("/admin/v1/tenants")
        assert unauthorized.status_code == 401

        receiver: Receiver = await receiver_factory()
        tenant, key = await gw.tenant(name="e2e", webhookUrl=receiver.url)
        assert tenant["webhookSecret"].startswith("whsec_")

        submitted = await gw.submit_ok(key, valid_body(metadata={"order": 1}))
        pid = submitted["id"]
        assert pid.startswith("pred_")
        assert submitted["status"] == "processing"
        assert submitted["costCents"] == COST
        assert submitted["statusUrl"] == f"{gw.url}/api/v1/predictions/{pid}"

        final: dict[str, Any] = {}

        async def completed() -> bool:
            final.update(await gw.prediction(key, pid))
            return final["status"] == "completed"

        await until(completed, 20, "the prediction to complete", every=0.2)
        assert final["outputs"] and final["outputs"][0].startswith("http")
        assert final["metadata"] == {"order": 1}
        assert final["costCents"] == COST
        video = await sim.http.get(final["outputs"][0])
        assert video.status_code == 200
        assert video.content[4:8] == b"ftyp"

        delivery = await receiver.next(timeout=20)
        event = verify(tenant["webhookSecret"], delivery)
        assert event["type"] == "prediction.completed"
        assert event["data"] == final
        assert delivery.headers["webhook-id"]


# ---------------------------------------------------------------- 2. SIGKILL with predictions in flight


CLIP_BYTES = SANDBOX_MP4.stat().st_size  # every output is rehosted: the simulator's clip, stored once each


async def test_sigkill_worker_with_predictions_in_flight(
    procs: Procs, proc_db: str, sim: Simulator, receiver_factory: Any
) -> None:
    count = 20
    await sim.configure(completion_s=4)
    env = gateway_env(proc_db, sim, VIDGATE_RUN_WORKER="false")
    gw = await procs.serve(env)
    async with gw.http:
        first = await procs.worker(env, "worker-1")
        receiver: Receiver = await receiver_factory()
        tenant, key = await gw.tenant(name="crash", webhookUrl=receiver.url)
        before = await sim.stats()
        polled_before = set(before["pollsById"])

        answers = await asyncio.gather(*(gw.submit_ok(key) for _ in range(count)))
        ids = {a["id"] for a in answers}
        assert len(ids) == count
        assert all(a["costCents"] == COST for a in answers)

        async def all_polled() -> bool:
            return len(set((await sim.stats())["pollsById"]) - polled_before) >= count

        await until(all_polled, 10, "worker-1 to poll every prediction")
        first.send(signal.SIGKILL)
        assert await first.wait(10) == -signal.SIGKILL

        # Nothing was terminal yet: the kill interrupted work in flight, no delivery was in progress.
        assert set((await gw.statuses(key)).values()) == {"processing"}, "predictions ended before the kill"
        assert receiver.received == []

        await procs.worker(env, "worker-2")
        await until(lambda: gw.all_done(key, ids), 30, "every prediction to complete after the restart", every=0.2)

        distinct: dict[str, dict[str, Any]] = {}

        def every_event_arrived() -> bool:
            for delivery in receiver.received:
                distinct.setdefault(delivery.headers["webhook-id"], verify(tenant["webhookSecret"], delivery))
            return len(distinct) >= count

        await until(every_event_arrived, 20, "a webhook for every prediction")
        assert {e["data"]["id"] for e in distinct.values()} == ids
        assert {e["type"] for e in distinct.values()} == {"prediction.completed"}

        async def all_recorded() -> bool:
            rows = await gw.deliveries(tenant["id"])
            return len(rows) == count and all(r["status"] == "succeeded" for r in rows)

        await until(all_recorded, 10, "every delivery to be recorded as succeeded")
        rows = await gw.deliveries(tenant["id"])
        assert all(r["attempts"] == 1 for r in rows), rows
        # No attempt's answer was lost, so at-least-once gives no excuse for a duplicate here.
        assert len(receiver.received) == count, f"{len(receiver.received)} requests for {count} events"

        verified = await gw.admin("GET", "/admin/v1/ledger/verify")
        assert verified.status_code == 200 and verified.json()["ok"] is True, verified.text
        usage = await gw.admin("GET", "/admin/v1/usage?groupBy=tenant")
        assert usage.status_code == 200, usage.text
        mine = [row for row in usage.json()["data"] if row["tenant"] == tenant["id"]]
        assert mine == [
            {
                "tenant": tenant["id"],
                "spentCents": count * COST,
                "predictions": count,
                "storedBytes": count * CLIP_BYTES,
            }
        ]
        own = await gw.admin("GET", f"/admin/v1/tenants/{tenant['id']}/usage")
        assert own.json()["spentCents"] == count * COST and own.json()["reservedCents"] == 0, own.text
        after = await sim.stats()
        assert after["submits"] - before["submits"] == count  # each forwarded once


# ---------------------------------------------------------------- 3. SIGKILL around a delivery


async def test_sigkill_between_terminal_state_and_delivery(procs: Procs, proc_db: str, sim: Simulator) -> None:
    # First attempt at once, then every 5 s: the kill lands between attempts, with no delivery leased.
    schedule = ",".join(["0"] + ["5"] * 20)
    env = gateway_env(proc_db, sim, VIDGATE_RUN_WORKER="false", VIDGATE_WEBHOOK_RETRY_SCHEDULE_S=schedule)
    gw = await procs.serve(env)
    # The receiver's port is held, bound but not listening: connections are refused until it starts.
    held = socket.socket()
    held.bind(("127.0.0.1", free_port()))
    port = held.getsockname()[1]
    runner: web.AppRunner | None = None
    try:
        async with gw.http:
            first = await procs.worker(env, "worker-1")
            tenant, key = await gw.tenant(name="outbox", webhookUrl=f"http://127.0.0.1:{port}/hooks")
            ids = {(await gw.submit_ok(key))["id"] for _ in range(3)}
            await until(lambda: gw.all_done(key, ids), 20, "the predictions to be terminal", every=0.1)

            async def first_attempts_failed() -> bool:
                rows = await gw.deliveries(tenant["id"])
                return len(rows) == 3 and all(r["attempts"] >= 1 for r in rows)

            await until(first_attempts_failed, 10, "a first, failed attempt of every delivery")
            first.send(signal.SIGKILL)
            assert await first.wait(10) == -signal.SIGKILL

            rows = await gw.deliveries(tenant["id"])
            assert {r["status"] for r in rows} == {"pending"}, rows
            assert all(r["lastError"] and "connection" in r["lastError"] for r in rows), rows

            held.close()
            receiver, runner = await start_receiver_on(port)
            await procs.worker(env, "worker-2")
            events = {}
            for _ in ids:
                delivery = await receiver.next(timeout=20)
                events[delivery.headers["webhook-id"]] = verify(tenant["webhookSecret"], delivery)
            assert {e["data"]["id"] for e in events.values()} == ids
            assert {e["type"] for e in events.values()} == {"prediction.completed"}
            assert set(events) == {r["id"] for r in rows}  # webhook-id is the delivery's id

            async def succeeded() -> bool:
                return {r["status"] for r in await gw.deliveries(tenant["id"])} == {"succeeded"}

            await until(succeeded, 10, "the deliveries to be recorded")
            assert len(receiver.received) == len(ids)
    finally:
        held.close()
        if runner is not None:
            await runner.cleanup()


async def test_sigkill_during_a_delivery_redelivers_with_the_same_id(
    procs: Procs, proc_db: str, sim: Simulator, receiver_factory: Any
) -> None:
    # A delivery's lease is webhook timeout + 15 s: the new worker takes it over after that.
    env = gateway_env(proc_db, sim, VIDGATE_RUN_WORKER="false", VIDGATE_WEBHOOK_TIMEOUT_S="3")
    gw = await procs.serve(env)
    async with gw.http:
        first = await procs.worker(env, "worker-1")
        # The first request is held open past the kill (and past the 3 s timeout: it never answers).
        receiver: Receiver = await receiver_factory(delay_s=5)
        tenant, key = await gw.tenant(name="inflight-delivery", webhookUrl=receiver.url)
        pid = (await gw.submit_ok(key))["id"]
        await until(lambda: len(receiver.received) == 1, 20, "the delivery to reach the receiver")
        first.send(signal.SIGKILL)
        assert await first.wait(10) == -signal.SIGKILL
        receiver.delay_s = 0

        await procs.worker(env, "worker-2")
        # The bound only keeps a broken build from hanging; the claim is that the same delivery is retried.
        await until(lambda: len(receiver.received) >= 2, 120, "the delivery to be retried by worker-2", every=0.1)
        lost, retried = receiver.received[0], receiver.received[1]
        assert retried.headers["webhook-id"] == lost.headers["webhook-id"]
        event = verify(tenant["webhookSecret"], retried)
        assert event["type"] == "prediction.completed" and event["data"]["id"] == pid

        async def succeeded() -> bool:
            rows = await gw.deliveries(tenant["id"])
            return len(rows) == 1 and rows[0]["status"] == "succeeded"

        await until(succeeded, 10, "the delivery to be recorded as succeeded")


# ---------------------------------------------------------------- 4. SIGTERM hands leases back


async def leases(database_url: str, ids: set[str]) -> set[str | None]:
    """The lease owners of these predictions, read from the database."""
    engine = create_engine(normalize_database_url(database_url), pool_size=1)
    try:
        async with engine.connect() as connection:
            rows = await connection.execute(select(Prediction.lease_owner).where(Prediction.id.in_(ids)))
            return {owner for (owner,) in rows}
    finally:
        await engine.dispose()


async def test_sigterm_drains_and_hands_leases_back(procs: Procs, proc_db: str, sim: Simulator) -> None:
    count = 10
    lease_s = 20.0
    await sim.configure(completion_s=3)
    env = gateway_env(proc_db, sim, VIDGATE_RUN_WORKER="false", VIDGATE_LEASE_S=str(lease_s))
    gw = await procs.serve(env)
    async with gw.http:
        first = await procs.worker(env, "worker-1")
        _, key = await gw.tenant(name="graceful")
        ids = {(await gw.submit_ok(key))["id"] for _ in range(count)}

        # Make every poll hang longer than the worker's shutdown grace: at SIGTERM each prediction
        # is leased by a poll of worker-1 that can only be cancelled.
        polls_at = (await sim.stats())["polls"]
        await sim.faults(poll_delay_s=25)

        async def every_prediction_in_a_hanging_poll() -> bool:
            return bool((await sim.stats())["polls"] - polls_at >= count)

        await until(every_prediction_in_a_hanging_poll, 10, "a hanging poll for every prediction")
        assert set((await gw.statuses(key)).values()) == {"processing"}

        first.send(signal.SIGTERM)
        try:
            rc = await first.wait(20)
        except TimeoutError:
            raise AssertionError(f"worker-1 still running 20 s after SIGTERM\n{first.tail()}") from None
        assert rc == 0, first.tail()
        assert first.logged("worker stopped"), first.tail()
        # Handed back, not left to expire: no row is leased any more, yet none is finished (no other worker runs).
        assert await leases(proc_db, ids) == {None}
        assert set((await gw.statuses(key)).values()) == {"processing"}

        await sim.faults(poll_delay_s=0)
        second = await procs.worker(env, "worker-2")
        await until(lambda: gw.all_done(key, ids), 60, "worker-2 to finish the predictions", every=0.1)
        assert second.returncode is None


# ---------------------------------------------------------------- 5. sandbox quick start


async def test_sandbox_quick_start(procs: Procs, tmp_path: Path) -> None:
    home = tmp_path / "elsewhere"
    home.mkdir()
    db = tmp_path / "fresh" / "x.db"
    port = free_port()
    env = base_env(
        VIDGATE_DATABASE_URL=f"sqlite:///{db}",
        VIDGATE_SANDBOX_COMPLETION_S="1",
        VIDGATE_SANDBOX_ESTIMATED_TIME="0-1s",
    )
    proc = await procs.start(
        "sandbox serve", "serve", "--sandbox", "--port", str(port), env=env, cwd=home, json_logs=True
    )
    url = f"http://127.0.0.1:{port}"
    await wait_healthy(proc, url)
    await until(lambda: any("vg_" in line for line in proc.stdout), 10, "the demo key on stdout")
    banner = "\n".join(proc.stdout)
    match = re.search(r"\b(vg_[A-Za-z0-9_\-]+)", banner)
    assert match, banner
    key = match.group(1)
    proc.allowed_in_stdout.add(key)
    TENANT_KEYS.add(key)
    assert "curl" in banner and f"{url}/api/v1/models/ltx-2-19b/generate" in banner
    assert db.exists()  # migrated itself
    assert any("SANDBOX" in str(e.get("msg", "")) and e.get("level") == "warning" for e in proc.logs())

    async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=30) as http:
        auth = {"Authorization": f"Bearer {key}"}
        answers = [await http.get("/healthz"), await http.get("/readyz")]
        submitted = await http.post(
            "/api/v1/models/ltx-2-19b/generate", json=valid_body(), headers={**auth, "Prefer": "wait=10"}
        )
        answers.append(submitted)
        assert submitted.status_code == 200, submitted.text
        body = submitted.json()
        assert body["status"] == "completed", body
        assert body["outputs"], body
        answers.append(fetched := await http.get(f"/api/v1/predictions/{body['id']}", headers=auth))
        assert fetched.json()["status"] == "completed"
        answers.append(video := await http.get(body["outputs"][0]))
        assert video.status_code == 200
        assert video.content[4:8] == b"ftyp"
        answers.append(denied := await http.get("/api/v1/usage"))
        assert denied.status_code == 401
        assert answers[1].json()["checks"]["upstream"] == "sandbox"
        for answer in answers:
            assert answer.headers.get("x-vidgate-sandbox") == "true", (answer.request.url, dict(answer.headers))


# ---------------------------------------------------------------- 6. the operator CLI


async def test_operator_cli(procs: Procs, proc_db: str, sim: Simulator, tmp_path: Path) -> None:
    env = gateway_env(proc_db, sim, VIDGATE_RUN_WORKER="false")
    elsewhere = tmp_path / "cli"
    elsewhere.mkdir()

    async def vidgate(*args: str, ok: bool = True) -> Proc:
        proc = await procs.run(*args, env=env, cwd=elsewhere)
        if ok:
            assert proc.returncode == 0, proc.tail()
        return proc

    created = json.loads(
        "\n".join((await vidgate("tenants", "create", "acme", "--budget-cents", "500", "--json")).stdout)
    )
    tenant_id = created["id"]
    assert created["name"] == "acme"
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z", created["createdAt"]), created
    assert created["budgetCents"] == 500 and created["budgetPeriod"] == "month"
    assert created["webhookSecret"].startswith("whsec_")

    listed = json.loads("\n".join((await vidgate("tenants", "list", "--json")).stdout))
    assert tenant_id in {t["id"] for t in listed}

    shown = "\n".join((await vidgate("tenants", "show", tenant_id)).stdout)
    assert tenant_id in shown and "acme" in shown and "500" in shown

    made = await procs.run("keys", "create", tenant_id, "--json", env=env, cwd=elsewhere)
    assert made.returncode == 0, made.tail()
    key = json.loads("\n".join(made.stdout))
    assert key["key"].startswith("vg_") and key["id"]
    TENANT_KEYS.add(key["key"])
    made.allowed_in_stdout.add(key["key"])

    gw = await procs.serve(env)
    async with gw.http:
        auth = {"Authorization": f"Bearer {key['key']}"}
        usage = await gw.http.get("/api/v1/usage", headers=auth)
        assert usage.status_code == 200, usage.text
        assert usage.json()["budgetCents"] == 500

        revoked = await vidgate("keys", "revoke", tenant_id, key["id"])
        assert key["id"] in "\n".join(revoked.stdout)

        for answer in (
            await gw.http.get("/api/v1/usage", headers=auth),
            await gw.submit(key["key"]),
        ):
            assert answer.status_code == 401, answer.text
            assert answer.headers["content-type"].startswith("application/problem+json")
            assert answer.json()["code"] == "invalid_api_key"

    usage_run, ledger, deliveries_run = await asyncio.gather(
        vidgate("usage", "--json"), vidgate("ledger", "verify"), vidgate("deliveries", "list", "--json")
    )
    assert isinstance(json.loads("\n".join(usage_run.stdout)), list)
    assert "agree" in "\n".join(ledger.stdout)
    assert isinstance(json.loads("\n".join(deliveries_run.stdout)), list)

    bad_inputs = [
        ("tenants", "create", "x", "--budget-period", "year"),
        ("tenants", "create", "x", "--budget-cents", "lots"),
        ("tenants", "show", "ten_doesnotexist"),
        ("keys", "create", "ten_doesnotexist"),
        ("keys", "revoke", tenant_id, "key_doesnotexist"),
        ("usage", "--group-by", "week"),
        ("usage", "--from", "yesterday"),
    ]
    failures = await asyncio.gather(*(vidgate(*bad, ok=False) for bad in bad_inputs))
    for bad, failed in zip(bad_inputs, failures, strict=True):
        command = f"`vidgate {' '.join(bad)}`"
        stderr = "\n".join(failed.stderr)
        assert failed.returncode not in (0, None), f"{command} succeeded\n{failed.tail()}"
        assert stderr.strip(), f"{command} said nothing on stderr"
        assert "Traceback" not in failed.output(), f"{command}\n{failed.tail()}"
    period_error = "\n".join(failures[0].stderr)
    assert "period" in period_error.lower() and "month" in period_error, period_error


# ---------------------------------------------------------------- 7. production start without an admin token


@pytest.mark.parametrize("token", [None, "x"], ids=["unset", "short"])
async def test_production_start_without_admin_token_refuses(
    procs: Procs, proc_db: str, sim: Simulator, token: str | None
) -> None:
    env = gateway_env(proc_db, sim, VIDGATE_ADMIN_TOKEN=token)
    assert env.get("VIDGATE_ADMIN_TOKEN") == token
    proc = await procs.start(
        "serve without token", "serve", "--port", str(free_port()), env=env, traceback_checked_by_test=True
    )
    try:
        rc = await proc.wait(30)
    except TimeoutError:
        raise AssertionError(f"serve kept running without VIDGATE_ADMIN_TOKEN\n{proc.tail()}") from None
    assert rc != 0
    assert "VIDGATE_ADMIN_TOKEN" in proc.output(), proc.tail()
    if token is not None:
        assert "at least 32" in proc.output(), proc.tail()  # issue 24 B3: one line saying what to set
    assert "Traceback" not in proc.output(), f"the refusal comes with a traceback\n{proc.tail(5)}"
