"""Graceful stop (SPEC §6): on SIGTERM `/readyz` answers 503 while `serve` keeps serving for the drain, then
finishes the requests in flight, hands its leases back, and it and its worker child exit.

And the point of it: a rolling restart of two replicas behind a real HAProxy (Debian's package, checking
/readyz with deploy/haproxy.cfg as shipped) under a stream of submits answers no 5xx, drops no
connection, and every prediction is charged and notified once (PostgreSQL: replicas share a database)."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import os
import shutil
import signal
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from sqlalchemy import text

from app.core.database import create_engine
from app.core.settings import normalize_database_url
from bench.ports import free_port
from tests.conftest import TEST_DB, Receiver, valid_body
from tests.procs import COST, Gateway, Procs, Simulator, gateway_env, until, verify, wait_healthy

# Fixtures: pytest finds them in this module's namespace (`x as x` marks them as used on purpose).
from tests.procs import module_procs_fixture as module_procs_fixture
from tests.procs import proc_cwd_fixture as proc_cwd_fixture
from tests.procs import proc_db_fixture as proc_db_fixture
from tests.procs import procs_fixture as procs_fixture
from tests.procs import sim_fixture as sim_fixture
from tests.procs import simulator_proc_fixture as simulator_proc_fixture
from tests.test_worker_process import children_started, gone

pytestmark = pytest.mark.slow

HAPROXY_CFG = Path(__file__).resolve().parents[1] / "deploy" / "haproxy.cfg"


class GatedUpstream:
    """A VibeDream upstream that holds each submit until `gate` opens; polls answer `processing`."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.arrived = asyncio.Event()
        self.submits = 0
        self.polls = 0
        self.url = ""

    async def submit(self, request: web.Request) -> web.Response:
        self.submits += 1
        self.arrived.set()
        await self.gate.wait()
        return web.json_response(
            {
                "id": f"up-{id(request)}",
                "status": "processing",
                "statusUrl": f"{self.url}/api/v1/predictions/up-{id(request)}",
                "estimatedTime": "0-1s",
                "costCents": COST,
                "createdAt": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            }
        )

    async def poll(self, request: web.Request) -> web.Response:
        self.polls += 1
        return web.json_response(
            {
                "id": request.match_info["id"],
                "modelId": "ltx-2-19b",
                "modelName": "LTX-2 19B",
                "status": "processing",
                "outputs": None,
                "error": None,
                "createdAt": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                "completedAt": None,
            }
        )


async def ping(_request: web.Request) -> web.Response:
    return web.json_response({})


@contextlib.asynccontextmanager
async def gated_upstream() -> AsyncIterator[GatedUpstream]:
    upstream = GatedUpstream()
    app = web.Application()
    app.router.add_post("/api/v1/models/{model}/generate", upstream.submit)
    app.router.add_get("/api/v1/predictions/{id}", upstream.poll)
    app.router.add_get("/{tail:.*}", ping)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    upstream.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    try:
        yield upstream
    finally:
        upstream.gate.set()
        await runner.cleanup()


async def leased_rows(db: str) -> int:
    engine = create_engine(normalize_database_url(db), pool_size=1)
    try:
        async with engine.connect() as connection:
            count = await connection.scalar(
                text("SELECT count(*) FROM predictions WHERE lease_owner IS NOT NULL OR lease_expires_at IS NOT NULL")
            )
            return int(count or 0)
    finally:
        await engine.dispose()


async def test_sigterm_drains_then_finishes_what_is_in_flight_and_exits(
    procs: Procs, proc_db: str, sim: Simulator
) -> None:
    async with gated_upstream() as upstream:
        env = gateway_env(
            proc_db,
            sim,
            VIDGATE_UPSTREAM_BASE_URL=upstream.url,
            VIDGATE_SHUTDOWN_DRAIN_S="2",
            VIDGATE_POLL_INTERVAL_S="0.2",
        )
        gw = await procs.serve(env)
        _tenant, key = await gw.tenant()
        # One prediction the worker child polls (and so leases) while serve stops.
        upstream.gate.set()
        await gw.submit_ok(key)
        await until(lambda: upstream.polls > 0, 30, "the worker child to poll")
        # One caller waiting on its own account (Prefer: wait=60, longer than the stop may take).
        waiting = asyncio.create_task(gw.submit(key, Prefer="wait=60"))
        await until(lambda: upstream.submits == 2, 30, "the waiting submit to reach the upstream")
        upstream.gate.clear()
        upstream.arrived.clear()
        # A submit in flight, between its hold and the upstream's answer, when SIGTERM comes.
        in_flight = asyncio.create_task(gw.submit(key))
        await asyncio.wait_for(upstream.arrived.wait(), 30)
        child = children_started(gw.proc)[-1]

        gw.proc.send(signal.SIGTERM)
        async with httpx.AsyncClient(base_url=gw.url, trust_env=False, timeout=10) as fresh:
            await until(lambda: _status(fresh, "/readyz", 503), 30, "/readyz to answer 503 after SIGTERM", every=0.05)
            # Still serving, on new connections, while the balancer takes it out; told to reconnect elsewhere.
            served = await fresh.get("/api/v1/usage", headers={"Authorization": f"Bearer {key}"})
            assert served.status_code == 200
            assert served.headers["connection"] == "close"
            assert (await fresh.get("/healthz")).status_code == 200
        assert gw.proc.returncode is None

        upstream.gate.set()  # the submit in flight is finished, not cut
        answer = await in_flight
        assert answer.status_code == 200, answer.text
        assert answer.json()["costCents"] == COST

        # The waiting caller is answered with the prediction as it stands, not cut off at the grace.
        waited = await waiting
        assert waited.status_code == 200, waited.text
        assert waited.json()["status"] == "processing"

        assert await gw.proc.wait(60) == -signal.SIGTERM
        await until(lambda: gone(child), 30, "the worker child to exit")
        assert gw.proc.logged("worker stopped") or any("worker stopped" in line for line in gw.proc.stderr)
        await gw.http.aclose()
    assert await leased_rows(proc_db) == 0  # every lease handed back, none left to expire


async def _status(http: httpx.AsyncClient, path: str, status: int) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return (await http.get(path)).status_code == status
    return False


# ---------------------------------------------------------------- a rolling restart behind HAProxy


class HAProxy:
    def __init__(self, env: dict[str, str], stats_url: str) -> None:
        self.env = env
        self.stats_url = stats_url
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        self.process = await asyncio.create_subprocess_exec(
            haproxy, "-db", "-f", str(HAPROXY_CFG), env=self.env, stdin=asyncio.subprocess.DEVNULL
        )

    async def states(self) -> dict[str, str]:
        """Each replica's state as HAProxy sees it (UP, DOWN, ...)."""
        async with httpx.AsyncClient(trust_env=False, timeout=5) as http:
            answer = await http.get(self.stats_url + ";csv")
        rows = csv.DictReader(io.StringIO(answer.text.removeprefix("# ")))
        return {row["svname"]: row["status"] for row in rows if row["pxname"] == "vidgate" and row["svname"] in "ab"}

    async def until_state(self, name: str, state: str) -> None:
        async def reached() -> bool:
            assert self.process is not None and self.process.returncode is None, "haproxy exited"
            with contextlib.suppress(httpx.HTTPError):
                return (await self.states()).get(name) == state
            return False

        await until(reached, 60, f"HAProxy to see replica {name} {state}", every=0.1)

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            await asyncio.wait_for(self.process.wait(), 15)


@pytest.mark.skipif(TEST_DB != "postgresql", reason="replicas share one PostgreSQL database (SPEC §6)")
@pytest.mark.skipif(shutil.which("haproxy") is None and not os.path.exists("/usr/sbin/haproxy"), reason="no haproxy")
async def test_a_rolling_restart_behind_haproxy_answers_no_5xx_and_charges_and_notifies_once(
    procs: Procs, proc_db: str, sim: Simulator, receiver_factory: Any
) -> None:
    receiver: Receiver = await receiver_factory()
    ports = {"a": free_port(), "b": free_port()}
    lb_port, stats_port = free_port(), free_port()
    # The default drain (5 s): HAProxy (checks every 500 ms, out after two) has room to see it even on a busy machine.
    env = gateway_env(proc_db, sim, VIDGATE_DATABASE_POOL_SIZE="8")

    async def start_replica(name: str) -> Gateway:
        proc = await procs.start(f"serve-{name}", "serve", "--port", str(ports[name]), env=env, json_logs=True)
        url = f"http://127.0.0.1:{ports[name]}"
        await wait_healthy(proc, url)
        return Gateway(url, httpx.AsyncClient(base_url=url, trust_env=False, timeout=30), proc)

    replicas = {name: await start_replica(name) for name in ports}
    lb = HAProxy(
        {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin"),
            "VIDGATE_LB_BIND": f"127.0.0.1:{lb_port}",
            "VIDGATE_REPLICA_A": f"127.0.0.1:{ports['a']}",
            "VIDGATE_REPLICA_B": f"127.0.0.1:{ports['b']}",
            "VIDGATE_LB_STATS": f"127.0.0.1:{stats_port}",
        },
        f"http://127.0.0.1:{stats_port}/stats",
    )
    await lb.start()
    try:
        await lb.until_state("a", "UP")
        await lb.until_state("b", "UP")
        front = Gateway(
            f"http://127.0.0.1:{lb_port}",
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{lb_port}", trust_env=False, timeout=60),
            replicas["a"].proc,
        )
        tenant, key = await front.tenant(webhookUrl=receiver.url)
        secret = tenant["webhookSecret"]

        restarted = asyncio.Event()
        answers: list[int] = []
        failures: list[str] = []
        submitted: list[str] = []

        async def stream() -> None:
            # Bounded: until the restart is over, at most 150 submits per client.
            for _ in range(150):
                try:
                    answer = await front.submit(key, valid_body())
                except httpx.HTTPError as exc:
                    failures.append(f"{type(exc).__name__}: {exc}")
                    continue
                answers.append(answer.status_code)
                if answer.status_code == 200:
                    submitted.append(answer.json()["id"])
                else:
                    failures.append(f"{answer.status_code} {answer.text[:200]}")
                if restarted.is_set():
                    return

        clients = [asyncio.create_task(stream()) for _ in range(4)]
        for name in ("a", "b"):
            old = replicas[name]
            old.proc.send(signal.SIGTERM)
            await lb.until_state(name, "DOWN")
            assert await old.proc.wait(60) == -signal.SIGTERM
            await old.http.aclose()
            replicas[name] = await start_replica(name)
            await lb.until_state(name, "UP")
        restarted.set()
        await asyncio.gather(*clients)

        assert failures == [], failures[:10]
        assert answers and set(answers) == {200}
        assert len(set(submitted)) == len(submitted)

        # Every prediction completes, is charged once and notified once.
        ids = set(submitted)

        async def all_notified() -> bool:
            seen = {verify(secret, d)["data"]["id"] for d in receiver.received}
            return ids <= seen

        await until(all_notified, 120, "every prediction's webhook", every=0.2)
        events = Counter(verify(secret, d)["data"]["id"] for d in receiver.received)
        twice = {
            i: [(d.headers.get("webhook-id") or d.headers.get("Webhook-Id"), d.headers.get("webhook-timestamp"))
                for d in receiver.received if verify(secret, d)["data"]["id"] == i]
            for i, n in events.items() if n != 1
        }  # fmt: skip
        assert twice == {}
        usage = await replicas["a"].http.get("/api/v1/usage", headers={"Authorization": f"Bearer {key}"})
        assert usage.json()["spentCents"] == COST * len(ids)
        assert usage.json()["reservedCents"] == 0
        await front.http.aclose()
    finally:
        await lb.stop()
        for gw in replicas.values():
            await gw.http.aclose()
