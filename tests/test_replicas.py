"""Scale-out on one PostgreSQL (issue 5): two `vidgate serve` (each with its embedded poller and
dispatcher), one `vidgate worker` and a real `vidgate simulator`, all as processes. 300 predictions are
submitted across both servers and server A is `kill -9`ed mid-flight: with predictions being polled,
webhooks being delivered and submissions in flight to it. (Just before the kill, the simulator holds
its poll answers and the webhook receiver its answers for a moment, so that A surely dies holding poll
and delivery leases with requests out.)

Then every prediction a caller got a 200 for ends completed and is charged exactly once, every
webhook arrives (verified with `standardwebhooks`) under one `webhook-id` per prediction, and no
prediction was polled by two processes in the same interval.

What the kill may legitimately leave behind, and how each is bounded:
- a submission in flight to A fails with a connection error. For each such one A had got as far as
  (a) nothing, (b) a hold (reserved, not forwarded), (c) a hold and an upstream call that never came
  back to the database, or (d) the confirmed prediction but not the answer. (b) and (c) are released
  by the submit recovery after VIDGATE_SUBMIT_RECOVERY_S; (c) is a simulator submit the gateway never
  polls; (d) is a prediction the caller never heard of that completes, is charged and notified like
  any other. So (c) + (d) <= the failed submissions, and the money follows the predictions that exist.
- a webhook A had sent when it died was never recorded: after its delivery lease expires another
  process sends it again, with the same `webhook-id`. At most `webhook_per_endpoint_concurrency`
  deliveries to one endpoint are in flight in one process, so that bounds the duplicates.

Only on PostgreSQL: several processes on one SQLite file is not a supported shape.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import statistics
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from aiohttp import web

from app.upstream.simulator import SANDBOX_MP4
from tests.conftest import TEST_DB, Received
from tests.procs import (
    COST,
    Gateway,
    Procs,
    Simulator,
    fresh_database,
    gateway_env,
    running_simulator,
    until,
    verify,
)

# Fixtures: pytest finds them in this module's namespace (`x as x` marks them as used on purpose).
from tests.procs import proc_cwd_fixture as proc_cwd_fixture
from tests.procs import procs_fixture as procs_fixture

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        TEST_DB != "postgresql",
        reason="several gateway processes on one database need PostgreSQL (VIDGATE_TEST_DB=postgresql); "
        "several processes on one SQLite file is not a supported shape",
    ),
]

COUNT = 300  # predictions submitted
CONCURRENCY = 16  # submissions in flight at once
SUBMIT_RATE = 25.0  # submissions started per second: 300 take ~12 s, so the kill lands mid-flight
# About this many accepted when server A is killed, ~8 s in: predictions are being polled and, the first
# ones having completed, webhooks delivered.
KILL_AFTER = 200
COMPLETION_S = 5.0  # the simulator's time to completion
ESTIMATED_TIME = "1-2s"  # so the first poll is 1 s after submit
POLL_INTERVAL_S = 1.0
LEASE_S = 5.0  # poll lease: A's leased predictions are taken over this long after their claim
UPSTREAM_TIMEOUT_S = 5.0
SUBMIT_RECOVERY_S = 11.0  # must exceed the upstream timeout by more than 5 s
WEBHOOK_TIMEOUT_S = 5.0
WEBHOOK_LEASE_S = WEBHOOK_TIMEOUT_S + 5  # the dispatcher leases a delivery for its timeout + 5 s
PER_ENDPOINT = 4  # deliveries to one endpoint in flight in one process
HOUSEKEEPING_S = 10.0  # how often a worker runs the submit recovery
BUDGET_CENTS = 1_000_000  # far above 300 x 9: no refusal, no threshold event
# Just before the kill, webhook answers and then upstream polls are held back. Meanwhile every process
# keeps claiming due deliveries and predictions, so at the kill A surely holds delivery and poll leases
# with requests in flight: the takeovers are exercised, not just possible.
RECEIVER_STALL_S = 2.0  # the receiver holds its answers from this long before the kill ...
RECEIVER_HOLD_S = 3.0  # ... for this long each (below the webhook timeout)
POLL_STALL_S = 1.2  # the simulator holds polls from this long before the kill ...
POLL_HOLD_S = 2.0  # ... for this long each (below the upstream timeout)
STALL_AT = KILL_AFTER - round(RECEIVER_STALL_S * SUBMIT_RATE)  # accepted submissions when the stall begins
# The last submissions before the kill go to A in one burst, so that some are caught at every stage of a
# submit (before the hold, holding, forwarded, confirmed but not answered) more often than by chance.
BURST = 8
BURST_LEAD_S = 0.04  # the kill follows the burst by this long
RECEIVER_DELAY_S = 0.05


@pytest.fixture(name="replica_db")
async def replica_db_fixture(procs: Procs, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """A fresh PostgreSQL database of this test's own, dropped after its processes are stopped."""
    async with fresh_database(procs, tmp_path_factory, "vidgate_replicas") as url:
        yield url


@dataclass
class Arrival:
    webhook_id: str
    at: float  # wall clock, comparable with the kill time and the simulator's times
    event: dict[str, Any] | None
    error: str | None


@dataclass
class RecordingReceiver:
    """Records every request (webhook-id, arrival, verified event) and answers 204 after `delay_s`."""

    secret: str = ""
    delay_s: float = 0.0
    arrivals: list[Arrival] = field(default_factory=list)
    url: str = ""
    runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/hooks"

    async def _handle(self, request: web.Request) -> web.Response:
        at = time.time()
        received = Received(dict(request.headers), await request.text())
        event: dict[str, Any] | None = None
        error: str | None = None
        try:
            event = verify(self.secret, received)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        self.arrivals.append(Arrival(received.headers.get("webhook-id", ""), at, event, error))
        await asyncio.sleep(self.delay_s)
        return web.Response(status=204)

    def events(self) -> dict[str, dict[str, Any]]:
        """webhook-id -> the (verified) event."""
        return {a.webhook_id: a.event for a in self.arrivals if a.event is not None}

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@dataclass
class Submissions:
    accepted: dict[str, str] = field(default_factory=dict)  # prediction id -> the server that answered 200
    failed: list[tuple[int, str]] = field(default_factory=list)  # (index, error) of those lost with A
    in_flight_to_a: set[int] = field(default_factory=set)
    in_flight_to_a_at_kill: set[int] = field(default_factory=set)
    killed_at: float | None = None  # wall clock


async def submit_all(
    gw_a: Gateway, gw_b: Gateway, key: str, sim: Simulator, receiver: RecordingReceiver
) -> Submissions:
    """COUNT submissions, paced and bounded (BURST of them sent to A at once just before the kill),
    alternately to A and B. A is killed when about KILL_AFTER are accepted, with polls and deliveries
    in flight; from then on everything goes to B (as a load balancer ejects a dead backend)."""
    done = Submissions()
    slots = asyncio.Semaphore(CONCURRENCY)
    stall = asyncio.Event()

    async def kill_a() -> None:
        await stall.wait()
        receiver.delay_s = RECEIVER_HOLD_S
        await asyncio.sleep(RECEIVER_STALL_S - POLL_STALL_S)
        await sim.faults(poll_delay_s=POLL_HOLD_S)
        await asyncio.sleep(POLL_STALL_S - BURST_LEAD_S)
        burst = [asyncio.create_task(one(index, prefer_a=True)) for index in range(COUNT - BURST, COUNT)]
        await asyncio.sleep(BURST_LEAD_S)
        # The whole server at once, as a crash of its host or container would: serve and its worker child
        # (serve alone killed, the child would drain and stop cleanly: tests/test_worker_process.py).
        os.killpg(gw_a.proc.pid, signal.SIGKILL)
        done.killed_at = time.time()
        done.in_flight_to_a_at_kill = set(done.in_flight_to_a)
        await sim.faults(poll_delay_s=0)
        receiver.delay_s = RECEIVER_DELAY_S
        await asyncio.gather(*burst)

    killer = asyncio.create_task(kill_a())

    async def one(index: int, prefer_a: bool = False) -> None:
        async with slots:
            to_a = (prefer_a or index % 2 == 0) and done.killed_at is None
            gw = gw_a if to_a else gw_b
            if to_a:
                done.in_flight_to_a.add(index)
            try:
                answer = await gw.submit(key)
            except httpx.TransportError as exc:
                assert to_a and done.killed_at is not None, (
                    f"submission {index} to {gw.proc.name} failed: {exc!r}\n{gw.proc.tail(5)}"
                )
                done.failed.append((index, type(exc).__name__))
                return
            finally:
                done.in_flight_to_a.discard(index)
            assert answer.status_code == 200, f"submission {index} to {gw.proc.name}: {answer.text}"
            done.accepted[answer.json()["id"]] = gw.proc.name
            if len(done.accepted) >= STALL_AT:
                stall.set()

    loop = asyncio.get_running_loop()
    started = loop.time()
    tasks = []
    for index in range(COUNT - BURST):
        await asyncio.sleep(max(0.0, started + index / SUBMIT_RATE - loop.time()))
        tasks.append(asyncio.create_task(one(index)))
    try:
        await asyncio.gather(*tasks)
        assert stall.is_set(), f"only {len(done.accepted)} submissions were accepted"
        await asyncio.wait_for(killer, 10)
    finally:
        killer.cancel()
    return done


async def listed(gw: Gateway, key: str, status: str | None = None) -> dict[str, dict[str, Any]]:
    """Every prediction the tenant can see (all pages), by id."""
    found: dict[str, dict[str, Any]] = {}
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 100}
        if status:
            params["status"] = status
        if cursor:
            params["cursor"] = cursor
        answer = await gw.http.get("/api/v1/predictions", params=params, headers={"Authorization": f"Bearer {key}"})
        assert answer.status_code == 200, answer.text
        page = answer.json()
        found.update({p["id"]: p for p in page["data"]})
        cursor = page["nextCursor"]
        if not cursor:
            return found


async def all_deliveries(gw: Gateway, tenant_id: str) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"tenant": tenant_id, "limit": 100}
        if cursor:
            params["cursor"] = cursor
        answer = await gw.admin("GET", "/admin/v1/webhook-deliveries", params=params)
        assert answer.status_code == 200, answer.text
        page = answer.json()
        found.update({d["id"]: d for d in page["data"]})
        cursor = page["nextCursor"]
        if not cursor:
            return found


async def test_two_servers_and_a_worker_survive_kill_9_of_a_server(procs: Procs, replica_db: str) -> None:
    began = time.monotonic()
    receiver = RecordingReceiver(delay_s=RECEIVER_DELAY_S)
    await receiver.start()
    try:
        async with running_simulator(procs, completion_s=COMPLETION_S, estimated_time=ESTIMATED_TIME) as sim:
            await scenario(procs, replica_db, sim, receiver, began)
    finally:
        await receiver.close()


async def scenario(procs: Procs, db: str, sim: Simulator, receiver: RecordingReceiver, began: float) -> None:
    env = gateway_env(
        db,
        sim,
        VIDGATE_RUN_WORKER="true",
        VIDGATE_POLL_INTERVAL_S=f"{POLL_INTERVAL_S:g}",
        VIDGATE_LEASE_S=f"{LEASE_S:g}",
        VIDGATE_UPSTREAM_TIMEOUT_S=f"{UPSTREAM_TIMEOUT_S:g}",
        VIDGATE_SUBMIT_RECOVERY_S=f"{SUBMIT_RECOVERY_S:g}",
        VIDGATE_WEBHOOK_TIMEOUT_S=f"{WEBHOOK_TIMEOUT_S:g}",
        VIDGATE_WEBHOOK_PER_ENDPOINT_CONCURRENCY=str(PER_ENDPOINT),
    )
    gw_a, gw_b, worker = await asyncio.gather(
        procs.serve(env, "serve-A"), procs.serve(env, "serve-B"), procs.worker(env, "worker")
    )
    async with gw_a.http, gw_b.http:
        tenant, key = await gw_b.tenant(name="replicas", webhookUrl=receiver.url, budgetCents=BUDGET_CENTS)
        receiver.secret = tenant["webhookSecret"]
        up_s = time.monotonic() - began

        # ---- submit across both servers; kill -9 server A mid-flight
        submitting = time.monotonic()
        subs = await submit_all(gw_a, gw_b, key, sim, receiver)
        submit_s = time.monotonic() - submitting
        assert subs.killed_at is not None, f"only {len(subs.accepted)} submissions were accepted"
        killed_at = subs.killed_at
        assert await gw_a.proc.wait(10) == -signal.SIGKILL
        accepted = set(subs.accepted)
        assert len(accepted) + len(subs.failed) == COUNT
        assert {i for i, _ in subs.failed} <= subs.in_flight_to_a_at_kill, "a submission failed that A never had"
        assert len(subs.failed) <= CONCURRENCY
        by_server = Counter(subs.accepted.values())
        assert by_server["serve-A"] >= KILL_AFTER // 2 - CONCURRENCY and by_server["serve-B"] >= KILL_AFTER // 2

        # ---- every accepted prediction completes (read through server B)
        async def accepted_completed() -> bool:
            return accepted <= set(await listed(gw_b, key, "completed"))

        await until(accepted_completed, COMPLETION_S + LEASE_S + 30, "every accepted prediction to complete", every=0.5)
        completed_s = time.monotonic() - submitting

        reads = asyncio.Semaphore(CONCURRENCY)

        async def read(prediction_id: str) -> dict[str, Any]:
            async with reads:
                return await gw_b.prediction(key, prediction_id)

        for prediction in await asyncio.gather(*(read(p) for p in sorted(accepted))):
            assert prediction["status"] == "completed", prediction
            assert prediction["costCents"] == COST and prediction["outputs"] and prediction["error"] is None, prediction

        # ---- money: the holds A left behind are released by the submit recovery, nothing else is held
        reserved_seen: list[int] = []

        async def nothing_reserved() -> bool:
            answer = await gw_b.admin("GET", f"/admin/v1/tenants/{tenant['id']}/usage")
            assert answer.status_code == 200, answer.text
            reserved_seen.append(answer.json()["reservedCents"])
            return reserved_seen[-1] == 0

        recovery_deadline = killed_at + SUBMIT_RECOVERY_S + 2 * HOUSEKEEPING_S + 10
        await until(nothing_reserved, recovery_deadline - time.time(), "the submit recovery to release A's holds")
        reserved_zero_after_kill_s = time.time() - killed_at

        visible = await listed(gw_b, key)
        assert {p["status"] for p in visible.values()} == {"completed"}, Counter(p["status"] for p in visible.values())
        assert accepted <= set(visible)
        # (d): confirmed by A, whose answer was lost with it. Charged and notified like the others.
        unanswered = set(visible) - accepted
        assert len(unanswered) <= len(subs.failed), (unanswered, subs.failed)
        charged = len(visible)

        usage = await gw_b.admin("GET", "/admin/v1/usage?groupBy=tenant")
        assert usage.status_code == 200, usage.text
        mine = [row for row in usage.json()["data"] if row["tenant"] == tenant["id"]]
        want = {"tenant": tenant["id"], "spentCents": COST * charged, "predictions": charged}
        want["storedBytes"] = charged * SANDBOX_MP4.stat().st_size  # every output rehosted: the clip, once each
        assert mine == [want], f"{mine}; {len(accepted)} accepted + {len(unanswered)} confirmed without an answer"
        verified = await gw_b.admin("GET", "/admin/v1/ledger/verify")
        assert verified.status_code == 200 and verified.json()["ok"] is True, verified.text
        own = (await gw_b.admin("GET", f"/admin/v1/tenants/{tenant['id']}/usage")).json()
        assert own["spentCents"] == COST * charged and own["reservedCents"] == 0, own

        # ---- webhooks: one webhook-id per prediction; a duplicate only for a delivery in flight on A
        def every_event_arrived() -> bool:
            return {e["data"]["id"] for e in receiver.events().values()} >= set(visible)

        await until(every_event_arrived, max(5.0, killed_at + WEBHOOK_LEASE_S + 20 - time.time()), "every webhook")

        async def all_succeeded() -> bool:
            rows = await all_deliveries(gw_b, tenant["id"])
            return len(rows) == charged and all(r["status"] == "succeeded" for r in rows.values())

        await until(all_succeeded, 20, "every delivery to be recorded as succeeded", every=0.5)
        rows = await all_deliveries(gw_b, tenant["id"])

        assert [a for a in receiver.arrivals if a.error] == [], "deliveries that failed verification"
        events = receiver.events()
        assert set(events) == set(rows), "webhook-id is the delivery's id"
        assert len(events) == charged, f"{len(events)} distinct webhook-ids for {charged} predictions"
        per_prediction = Counter(e["data"]["id"] for e in events.values())
        assert set(per_prediction) == set(visible) and set(per_prediction.values()) == {1}
        assert {e["type"] for e in events.values()} == {"prediction.completed"}
        for event in events.values():
            assert event["data"]["status"] == "completed" and event["data"]["costCents"] == COST, event

        arrivals: dict[str, list[float]] = {}
        for arrival in receiver.arrivals:
            arrivals.setdefault(arrival.webhook_id, []).append(arrival.at)
        duplicated = {i: sorted(times) for i, times in arrivals.items() if len(times) > 1}
        assert 1 <= len(duplicated) <= PER_ENDPOINT, (
            f"{len(duplicated)} webhook-ids were sent twice: A had at most {PER_ENDPOINT} deliveries to this endpoint "
            "in flight when it died, and the stall before the kill was meant to make that at least one"
        )
        for delivery_id, times in duplicated.items():
            # A sent it (the request may be read a moment after the kill), died before recording the
            # answer, and another process sent it again only once A's delivery lease had expired.
            assert len(times) == 2, (delivery_id, times)
            assert times[1] - times[0] >= WEBHOOK_LEASE_S - 1.5, (delivery_id, times)
        for delivery_id, row in rows.items():
            # A's attempt, if it sent one and died before recording it, is the only one not in the record.
            lost = len(arrivals[delivery_id]) - row["attempts"]
            assert lost == (1 if delivery_id in duplicated else 0), (delivery_id, row, arrivals[delivery_id])

        # ---- the simulator's view: submits, and no prediction polled twice in one interval
        stats = await sim.stats(detail=True)
        poll_times: dict[str, list[float]] = stats["pollTimes"]
        done_at: dict[str, float] = stats["doneAt"]
        assert stats["submits"] == len(done_at)  # every submit was valid: each made an upstream prediction
        # Each gateway prediction was polled; a simulator prediction never polled is (c): forwarded by A,
        # which died before storing the upstream id.
        assert len(poll_times) == charged, f"{len(poll_times)} upstream ids polled for {charged} predictions"
        never_polled = set(done_at) - set(poll_times)
        assert stats["submits"] == charged + len(never_polled)
        assert len(unanswered) + len(never_polled) <= len(subs.failed), (unanswered, never_polled, subs.failed)

        gaps: list[float] = []
        takeovers = 0
        for upstream_id, times in poll_times.items():
            times = sorted(times)
            created = done_at[upstream_id] - COMPLETION_S
            assert times[0] - created >= 0.95, f"{upstream_id} first polled {times[0] - created:.2f} s after submit"
            between = [later - earlier for earlier, later in itertools.pairwise(times)]
            assert min(between, default=POLL_INTERVAL_S) >= POLL_INTERVAL_S / 2, (
                f"{upstream_id} polled twice within {min(between):.3f} s: {[round(t - created, 3) for t in times]}"
            )
            # One poll sees it completed; a second only if the process that saw it first died before storing it.
            assert sum(t >= done_at[upstream_id] for t in times) <= 2, (upstream_id, times, done_at[upstream_id])
            gaps += between
            # A poll A had sent (or a lease it held) when it died: the next poll waited for the lease.
            takeovers += any(
                gap >= LEASE_S - 0.5 and earlier <= killed_at for earlier, gap in zip(times, between, strict=False)
            )
        polls_each = [len(times) for times in poll_times.values()]
        assert takeovers >= 1, "A held no poll lease when it died: the takeover was not exercised"

        assert gw_b.proc.returncode is None and worker.returncode is None
        total_s = time.monotonic() - began
        print(
            f"\nreplicas: up in {up_s:.1f} s; {len(accepted)} accepted ({dict(by_server)}), "
            f"{len(subs.failed)} lost with A {Counter(e for _, e in subs.failed)}, "
            f"{len(unanswered)} confirmed without an answer, {len(never_polled)} forwarded but never stored; "
            f"submitted in {submit_s:.1f} s, all completed {completed_s:.1f} s after the first submit; "
            f"{reserved_seen[0]} cents still held when all had completed, 0 {reserved_zero_after_kill_s:.1f} s after the kill; "
            f"{len(receiver.arrivals)} webhook requests for {len(events)} ids ({len(duplicated)} resent after the kill); "
            f"polls per prediction min/median/max {min(polls_each)}/{statistics.median(polls_each):g}/{max(polls_each)}, "
            f"shortest gap {min(gaps):.3f} s, {takeovers} predictions taken over after a lease expired; "
            f"total {total_s:.1f} s"
        )
