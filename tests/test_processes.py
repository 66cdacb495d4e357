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
import contextlib
import json
import os
import re
import secrets
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from standardwebhooks.webhooks import Webhook

from tests.conftest import PG_SERVER, TEST_DB, Received, Receiver, _fresh_postgres, _worker_id, valid_body

pytestmark = pytest.mark.slow

VIDGATE = Path(sys.executable).parent / "vidgate"
UPSTREAM_KEY = "vd-live-" + secrets.token_hex(16)
ADMIN_TOKEN = "adm-" + secrets.token_hex(16)
TENANT_KEYS: set[str] = set()  # every tenant key handed out in this module
COST = 9  # what the simulator charges for 480p, 5 s
STARTUP_S = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def until(check: Callable[[], Awaitable[bool] | bool], timeout: float, what: str, every: float = 0.05) -> None:
    """Wait for a condition with a deadline (the condition may be sync or async)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(every)


def base_env(**values: str | None) -> dict[str, str]:
    """The test's environment without any VIDGATE_* setting of its own, plus `values` (None drops one)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIDGATE_") and k != "VIBEDREAM_API_KEY"}
    env.update({k: v for k, v in values.items() if v is not None})
    return env


# ---------------------------------------------------------------- processes


@dataclass
class Proc:
    name: str
    args: tuple[str, ...]
    env: dict[str, str]
    cwd: Path
    allowed_in_stdout: set[str] = field(default_factory=set)
    json_logs: bool = False
    traceback_checked_by_test: bool = False  # the test asserts on it itself: one failure, not two
    process: asyncio.subprocess.Process | None = None
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    readers: list[asyncio.Task[None]] = field(default_factory=list)

    async def start(self) -> Proc:
        self.process = await asyncio.create_subprocess_exec(
            str(VIDGATE),
            *self.args,
            env=self.env,
            cwd=self.cwd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # its own process group: teardown kills it and anything it forked
            limit=1 << 22,
        )
        assert self.process.stdout is not None and self.process.stderr is not None
        self.readers = [
            asyncio.create_task(self._read(self.process.stdout, self.stdout)),
            asyncio.create_task(self._read(self.process.stderr, self.stderr)),
        ]
        return self

    @staticmethod
    async def _read(stream: asyncio.StreamReader, into: list[str]) -> None:
        while line := await stream.readline():
            into.append(line.decode(errors="replace").rstrip("\n"))

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        assert self.process is not None
        return self.process.returncode

    def send(self, sig: signal.Signals) -> None:
        assert self.process is not None and self.process.returncode is None, f"{self.name} is not running"
        os.kill(self.pid, sig)

    async def wait(self, timeout: float) -> int:
        assert self.process is not None
        rc = await asyncio.wait_for(self.process.wait(), timeout)
        await asyncio.wait_for(asyncio.gather(*self.readers), 10)
        return rc

    async def stop(self) -> None:
        if self.process is None:
            return
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)  # the process and anything it started
        await asyncio.wait_for(self.process.wait(), 15)
        await asyncio.wait_for(asyncio.gather(*self.readers, return_exceptions=True), 10)

    def logs(self) -> list[dict[str, Any]]:
        entries = []
        for line in self.stderr:
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict):
                    entries.append(entry)
        return entries

    def logged(self, msg: str) -> bool:
        return any(entry.get("msg") == msg for entry in self.logs())

    def output(self) -> str:
        return "\n".join(self.stdout + self.stderr)

    def tail(self, lines: int = 25) -> str:
        return f"--- {self.name} (pid {self.pid}, rc {self.returncode}) ---\n" + "\n".join(
            (self.stdout + self.stderr)[-lines:]
        )

    def violations(self) -> list[str]:
        found = []
        forbidden = {UPSTREAM_KEY: "the upstream key", ADMIN_TOKEN: "the admin token"}
        forbidden.update({key: f"tenant key {key[:6]}..." for key in TENANT_KEYS})
        for stream, lines in (("stdout", self.stdout), ("stderr", self.stderr)):
            for number, line in enumerate(lines, 1):
                if "Traceback" in line and not self.traceback_checked_by_test:
                    found.append(f"{self.name} {stream}:{number}: a traceback: {line[:300]}")
                for value, what in forbidden.items():
                    if value in line and not (stream == "stdout" and value in self.allowed_in_stdout):
                        found.append(f"{self.name} {stream}:{number}: {what} appears")
        if self.json_logs:
            for number, line in enumerate(self.stderr, 1):
                try:
                    json.loads(line)
                except ValueError:
                    found.append(f"{self.name} stderr:{number}: not a JSON log line: {line[:200]}")
        return found


class Procs:
    """Starts processes and, at close, kills every one still running and checks what they printed."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.all: list[Proc] = []

    async def start(self, name: str, *args: str, env: dict[str, str], **options: Any) -> Proc:
        proc = Proc(name, args, env, options.pop("cwd", self.cwd), **options)
        self.all.append(proc)
        return await proc.start()

    async def run(self, *args: str, env: dict[str, str], timeout: float = 60, **options: Any) -> Proc:
        """Run a command to its end."""
        proc = await self.start(" ".join(args[:2]), *args, env=env, **options)
        try:
            await proc.wait(timeout)
        except TimeoutError:
            raise AssertionError(f"`vidgate {' '.join(args)}` did not end within {timeout} s\n{proc.tail()}") from None
        return proc

    async def serve(self, env: dict[str, str], name: str = "serve") -> Gateway:
        port = free_port()
        proc = await self.start(name, "serve", "--port", str(port), env=env, json_logs=True)
        url = f"http://127.0.0.1:{port}"
        await wait_healthy(proc, url)
        return Gateway(url, httpx.AsyncClient(base_url=url, trust_env=False, timeout=30), proc)

    async def worker(self, env: dict[str, str], name: str = "worker") -> Proc:
        proc = await self.start(name, "worker", env=env, json_logs=True)
        await until(lambda: proc.logged("worker started") or proc.returncode is not None, STARTUP_S, f"{name} to start")
        assert proc.returncode is None, f"{name} exited at start\n{proc.tail()}"
        return proc

    async def close(self) -> list[str]:
        for proc in self.all:
            await proc.stop()
        return [v for proc in self.all for v in proc.violations()]


async def wait_healthy(proc: Proc, url: str, timeout: float = STARTUP_S) -> None:
    """Poll GET /healthz until it answers 200, the process dies or the deadline passes."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(trust_env=False, timeout=2) as http:
        while True:
            assert proc.returncode is None, f"{proc.name} exited before it was healthy\n{proc.tail()}"
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(f"{url}/healthz")).status_code == 200:
                    return
            assert time.monotonic() < deadline, f"{proc.name} not healthy after {timeout} s\n{proc.tail()}"
            await asyncio.sleep(0.1)


@dataclass
class Gateway:
    url: str
    http: httpx.AsyncClient
    proc: Proc

    async def admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return await self.http.request(method, path, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, **kwargs)

    async def tenant(self, **body: Any) -> tuple[dict[str, Any], str]:
        body.setdefault("name", "t-" + secrets.token_hex(4))
        created = await self.admin("POST", "/admin/v1/tenants", json=body)
        assert created.status_code == 201, created.text
        tenant = created.json()
        answer = await self.admin("POST", f"/admin/v1/tenants/{tenant['id']}/keys", json={"name": "test"})
        assert answer.status_code == 201, answer.text
        key = answer.json()["key"]
        assert key.startswith("vg_")
        TENANT_KEYS.add(key)
        return tenant, key

    async def submit(self, key: str, body: dict[str, Any] | None = None, **headers: str) -> httpx.Response:
        return await self.http.post(
            "/api/v1/models/ltx-2-19b/generate",
            json=body if body is not None else valid_body(),
            headers={"Authorization": f"Bearer {key}", **headers},
        )

    async def submit_ok(self, key: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        answer = await self.submit(key, body)
        assert answer.status_code == 200, answer.text
        return dict(answer.json())

    async def prediction(self, key: str, prediction_id: str) -> dict[str, Any]:
        answer = await self.http.get(f"/api/v1/predictions/{prediction_id}", headers={"Authorization": f"Bearer {key}"})
        assert answer.status_code == 200, answer.text
        return dict(answer.json())

    async def statuses(self, key: str) -> dict[str, str]:
        """Every prediction of the key's tenant (up to 100) and its status."""
        answer = await self.http.get("/api/v1/predictions?limit=100", headers={"Authorization": f"Bearer {key}"})
        assert answer.status_code == 200, answer.text
        return {p["id"]: p["status"] for p in answer.json()["data"]}

    async def deliveries(self, tenant_id: str) -> list[dict[str, Any]]:
        answer = await self.admin("GET", f"/admin/v1/webhook-deliveries?tenant={tenant_id}&limit=100")
        assert answer.status_code == 200, answer.text
        return list(answer.json()["data"])

    async def all_done(self, key: str, ids: set[str], status: str = "completed") -> bool:
        seen = await self.statuses(key)
        return all(seen.get(i) == status for i in ids)


@dataclass
class Simulator:
    url: str
    proc: Proc
    http: httpx.AsyncClient

    async def configure(self, **values: Any) -> None:
        assert (await self.http.post(f"{self.url}/_sim/config", json=values)).status_code == 200

    async def faults(self, **values: Any) -> None:
        assert (await self.http.post(f"{self.url}/_sim/faults", json=values)).status_code == 200

    async def stats(self) -> dict[str, Any]:
        return dict((await self.http.get(f"{self.url}/_sim/stats")).json())


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def proc_cwd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The working directory of every process: not the project, so nothing may depend on it."""
    return Path(tmp_path_factory.mktemp("cwd"))


@pytest.fixture(scope="module")
async def module_procs(proc_cwd: Path) -> AsyncIterator[Procs]:
    procs = Procs(proc_cwd)
    yield procs
    violations = await procs.close()
    assert not violations, "\n".join(violations)


@pytest.fixture(scope="module")
async def proc_db(module_procs: Procs, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """A fresh database for this module, brought to head by `vidgate migrate` run as a command."""
    if TEST_DB == "postgresql":
        name = f"vidgate_proc_{_worker_id()}"
        url = (await _fresh_postgres(name)).replace("postgresql+asyncpg://", "postgresql://")
    else:
        name = ""
        url = f"sqlite:///{Path(tmp_path_factory.mktemp('procdb')) / 'gateway.db'}"
    migrated = await module_procs.run("migrate", env=base_env(VIDGATE_DATABASE_URL=url))
    assert migrated.returncode == 0, migrated.tail()
    assert "latest migration" in migrated.output()
    again = await module_procs.run("migrate", env=base_env(VIDGATE_DATABASE_URL=url))
    assert again.returncode == 0, again.tail()  # idempotent
    yield url
    await module_procs.close()
    if name:
        import asyncpg

        conn = await asyncpg.connect(PG_SERVER + "/postgres")
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


@pytest.fixture(scope="module")
async def simulator_proc(module_procs: Procs) -> AsyncIterator[Simulator]:
    port = free_port()
    proc = await module_procs.start(
        "simulator",
        "simulator",
        "--port",
        str(port),
        "--completion-s",
        "1",
        "--estimated-time",
        "0-1s",
        env=base_env(),
    )
    url = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(trust_env=False, timeout=10) as http:

        async def up() -> bool:
            assert proc.returncode is None, proc.tail()
            with contextlib.suppress(httpx.HTTPError):
                return (await http.get(url + "/")).status_code == 200
            return False

        await until(up, STARTUP_S, "the simulator", every=0.1)
        yield Simulator(url, proc, http)


@pytest.fixture
async def sim(simulator_proc: Simulator) -> Simulator:
    await simulator_proc.configure(completion_s=1, estimated_time="0-1s", failure_ratio=0)
    await simulator_proc.faults(poll_delay_s=0, poll_count=0, submit_count=0)
    return simulator_proc


@pytest.fixture
async def procs(proc_cwd: Path) -> AsyncIterator[Procs]:
    procs = Procs(proc_cwd)
    try:
        yield procs
    finally:
        violations = await procs.close()
    assert not violations, "\n".join(violations)


def gateway_env(db: str, sim: Simulator, **extra: str | None) -> dict[str, str]:
    values: dict[str, str | None] = dict(
        VIDGATE_DATABASE_URL=db,
        VIDGATE_UPSTREAM_BASE_URL=sim.url,
        VIDGATE_UPSTREAM_API_KEY=UPSTREAM_KEY,
        VIDGATE_ADMIN_TOKEN=ADMIN_TOKEN,
        VIDGATE_WEBHOOK_ALLOW_PRIVATE="true",
        VIDGATE_POLL_INTERVAL_S="0.3",
        VIDGATE_LEASE_S="3",
    )
    values.update(extra)
    return base_env(**values)


def verify(secret: str, delivery: Received) -> dict[str, Any]:
    return dict(Webhook(secret).verify(delivery.body, delivery.headers))


async def start_receiver_on(port: int) -> tuple[Receiver, web.AppRunner]:
    """A receiver on a port chosen in advance (receiver_factory picks its own)."""
    receiver = Receiver(url=f"http://127.0.0.1:{port}/hooks")

    async def handle(request: web.Request) -> web.Response:
        item = Received(dict(request.headers), await request.text())
        receiver.received.append(item)
        receiver.arrived.put_nowait(item)
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return receiver, runner


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
        assert mine == [{"tenant": tenant["id"], "spentCents": count * COST, "predictions": count}]
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
    held.bind(("127.0.0.1", 0))
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
        killed_at = time.monotonic()
        assert await first.wait(10) == -signal.SIGKILL
        receiver.delay_s = 0

        await procs.worker(env, "worker-2")
        await until(lambda: len(receiver.received) >= 2, 32, "the delivery to be retried by worker-2", every=0.1)
        taken_over_s = time.monotonic() - killed_at
        lost, retried = receiver.received[0], receiver.received[1]
        assert retried.headers["webhook-id"] == lost.headers["webhook-id"]
        event = verify(tenant["webhookSecret"], retried)
        assert event["type"] == "prediction.completed" and event["data"]["id"] == pid
        assert taken_over_s < 30, f"taken over after {taken_over_s:.1f} s"

        async def succeeded() -> bool:
            rows = await gw.deliveries(tenant["id"])
            return len(rows) == 1 and rows[0]["status"] == "succeeded"

        await until(succeeded, 10, "the delivery to be recorded as succeeded")


# ---------------------------------------------------------------- 4. SIGTERM hands leases back


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
        hanging_since = time.monotonic()

        async def every_prediction_in_a_hanging_poll() -> bool:
            return bool((await sim.stats())["polls"] - polls_at >= count)

        await until(every_prediction_in_a_hanging_poll, 10, "a hanging poll for every prediction")
        assert set((await gw.statuses(key)).values()) == {"processing"}

        first.send(signal.SIGTERM)
        stopping = time.monotonic()
        try:
            rc = await first.wait(20)
        except TimeoutError:
            raise AssertionError(f"worker-1 still running 20 s after SIGTERM\n{first.tail()}") from None
        stop_s = time.monotonic() - stopping
        assert rc == 0, first.tail()
        assert stop_s < 15, f"worker-1 took {stop_s:.1f} s to stop"
        assert first.logged("worker stopped"), first.tail()

        await sim.faults(poll_delay_s=0)
        second = await procs.worker(env, "worker-2")
        up = time.monotonic()
        await until(lambda: gw.all_done(key, ids), lease_s + 10, "worker-2 to finish the predictions", every=0.1)
        finish_s = time.monotonic() - up
        # Had the leases not been handed back, worker-2 would wait for them to expire, i.e. until
        # `lease_s` after the hanging polls were claimed.
        lease_left_s = lease_s - (up - hanging_since)
        print(
            f"SIGTERM: stopped in {stop_s:.1f} s; worker-2 finished in {finish_s:.2f} s, lease left {lease_left_s:.1f} s"
        )
        assert finish_s < 3, f"worker-2 needed {finish_s:.1f} s; the old leases had {lease_left_s:.1f} s left"
        assert lease_left_s > finish_s + 3, "the test no longer separates handed-back leases from expired ones"
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
    proc = await procs.start("sandbox serve", "serve", "--port", str(port), env=env, cwd=home, json_logs=True)
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


async def test_production_start_without_admin_token_refuses(procs: Procs, proc_db: str, sim: Simulator) -> None:
    env = gateway_env(proc_db, sim, VIDGATE_ADMIN_TOKEN=None)
    assert "VIDGATE_ADMIN_TOKEN" not in env
    proc = await procs.start(
        "serve without token", "serve", "--port", str(free_port()), env=env, traceback_checked_by_test=True
    )
    try:
        rc = await proc.wait(30)
    except TimeoutError:
        raise AssertionError(f"serve kept running without VIDGATE_ADMIN_TOKEN\n{proc.tail()}") from None
    assert rc != 0
    assert "VIDGATE_ADMIN_TOKEN" in proc.output(), proc.tail()
    assert "Traceback" not in proc.output(), f"the refusal comes with a traceback\n{proc.tail(5)}"
