"""Helpers and fixtures for tests that run real `vidgate` processes: `serve`, `worker`, `simulator`,
`migrate` and the operator commands, started as subprocesses on free loopback ports against a database
of the test module's own (a SQLite file or a PostgreSQL database, following VIDGATE_TEST_DB), from a
working directory that is not the project.

Test modules import what they use, fixtures included. The fixture functions are named `<name>_fixture`
and registered under `<name>` (`procs`, `proc_db`, `sim`, ...), so a test's `procs` argument does not
shadow an imported name; pytest finds a fixture imported into a test module as if it were defined
there: `from tests.procs import procs_fixture as procs_fixture`. Module-scoped fixtures are then per
importing module: each module gets its own database and simulator.

Every process started through `Procs` is killed when it closes. No line any of them prints may contain
a Python traceback, the upstream key, the admin token or a tenant key (except where a command exists to
show a key: `keys create` and the sandbox banner, on stdout).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from aiohttp import web
from standardwebhooks.webhooks import Webhook

from bench.ports import free_port
from tests.conftest import PG_SERVER, TEST_DB, Received, Receiver, _fresh_postgres, _worker_id, valid_body

VIDGATE = Path(sys.executable).parent / "vidgate"
UPSTREAM_KEY = "vd-live-" + secrets.token_hex(16)
ADMIN_TOKEN = "adm-" + secrets.token_hex(16)
TENANT_KEYS: set[str] = set()  # every tenant key handed out in this module
COST = 9  # what the simulator charges for 480p, 5 s
STARTUP_S = 30.0


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
        # Idle connections are dropped before uvicorn's 5 s keep-alive timeout closes them from its side:
        # reusing one the server is closing at that moment fails the request (a ReadError on a POST).
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=2.0)
        return Gateway(url, httpx.AsyncClient(base_url=url, trust_env=False, timeout=30, limits=limits), proc)

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
            if time.monotonic() >= deadline:  # a hang guard, not a speed claim
                raise TimeoutError(f"{proc.name} not healthy after {timeout} s\n{proc.tail()}")
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
        if answer.status_code != 200:
            # The gateway's own account of a failure is in its log, not in the problem it answered.
            errors = [line for line in self.proc.stderr if '"level":"error"' in line or "Traceback" in line]
            raise AssertionError(f"{answer.status_code} {answer.text}\ngateway errors:\n" + "\n".join(errors[-5:]))
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
        # Each one by id: a tenant's list is newest first and pages at 100, so a test that submits more
        # than that after these would never see them in it.
        return all([(await self.prediction(key, i))["status"] == status for i in ids])


@dataclass
class Simulator:
    url: str
    proc: Proc
    http: httpx.AsyncClient

    async def configure(self, **values: Any) -> None:
        assert (await self.http.post(f"{self.url}/_sim/config", json=values)).status_code == 200

    async def faults(self, **values: Any) -> None:
        assert (await self.http.post(f"{self.url}/_sim/faults", json=values)).status_code == 200

    async def stats(self, detail: bool = False) -> dict[str, Any]:
        """Counts; with `detail`, also `pollTimes` and `doneAt` per upstream prediction id."""
        path = "/_sim/stats?detail=1" if detail else "/_sim/stats"
        return dict((await self.http.get(self.url + path)).json())


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", name="proc_cwd")
def proc_cwd_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The working directory of every process: not the project, so nothing may depend on it."""
    return Path(tmp_path_factory.mktemp("cwd"))


@pytest.fixture(scope="module", name="module_procs")
async def module_procs_fixture(proc_cwd: Path) -> AsyncIterator[Procs]:
    procs = Procs(proc_cwd)
    yield procs
    violations = await procs.close()
    assert not violations, "\n".join(violations)


@contextlib.asynccontextmanager
async def fresh_database(procs: Procs, tmp_path_factory: pytest.TempPathFactory, prefix: str) -> AsyncIterator[str]:
    """A fresh database brought to head by `vidgate migrate` run as a command (twice: it is idempotent).

    On PostgreSQL the name is unique per test run, so two runs on one server never drop each other's
    database; it is dropped at the end, after every process of `procs` is stopped."""
    if TEST_DB == "postgresql":
        run = os.environ.get("PYTEST_XDIST_TESTRUNUID", str(os.getpid()))[:12]
        name = f"{prefix}_{run}_{_worker_id()}"
        url = (await _fresh_postgres(name)).replace("postgresql+asyncpg://", "postgresql://")
    else:
        name = ""
        url = f"sqlite:///{Path(tmp_path_factory.mktemp(prefix)) / 'gateway.db'}"
    try:
        migrated = await procs.run("migrate", env=base_env(VIDGATE_DATABASE_URL=url))
        assert migrated.returncode == 0, migrated.tail()
        assert "latest migration" in migrated.output()
        again = await procs.run("migrate", env=base_env(VIDGATE_DATABASE_URL=url))
        assert again.returncode == 0, again.tail()  # idempotent
        yield url
    finally:
        await procs.close()
        if name:
            import asyncpg

            conn = await asyncpg.connect(PG_SERVER + "/postgres")
            try:
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            finally:
                await conn.close()


@contextlib.asynccontextmanager
async def running_simulator(procs: Procs, completion_s: float, estimated_time: str) -> AsyncIterator[Simulator]:
    """A `vidgate simulator` process on a free port, up and answering."""
    port = free_port()
    proc = await procs.start(
        "simulator",
        "simulator",
        "--port",
        str(port),
        "--completion-s",
        f"{completion_s:g}",
        "--estimated-time",
        estimated_time,
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


@pytest.fixture(scope="module", name="proc_db")
async def proc_db_fixture(module_procs: Procs, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """A fresh database for the module, brought to head by `vidgate migrate` run as a command."""
    async with fresh_database(module_procs, tmp_path_factory, "vidgate_proc") as url:
        yield url


@pytest.fixture(scope="module", name="simulator_proc")
async def simulator_proc_fixture(module_procs: Procs) -> AsyncIterator[Simulator]:
    async with running_simulator(module_procs, completion_s=1, estimated_time="0-1s") as simulator:
        yield simulator


@pytest.fixture(name="sim")
async def sim_fixture(simulator_proc: Simulator) -> Simulator:
    await simulator_proc.configure(completion_s=1, estimated_time="0-1s", failure_ratio=0)
    await simulator_proc.faults(poll_delay_s=0, poll_count=0, submit_count=0)
    return simulator_proc


@pytest.fixture(name="procs")
async def procs_fixture(proc_cwd: Path) -> AsyncIterator[Procs]:
    procs = Procs(proc_cwd)
    try:
        yield procs
    finally:
        violations = await procs.close()
    assert not violations, "\n".join(violations)


OUTPUTS_DIR = tempfile.mkdtemp(prefix="vidgate-test-outputs-")


def gateway_env(db: str, sim: Simulator, **extra: str | None) -> dict[str, str]:
    values: dict[str, str | None] = dict(
        VIDGATE_DATABASE_URL=db,
        VIDGATE_UPSTREAM_BASE_URL=sim.url,
        VIDGATE_UPSTREAM_API_KEY=UPSTREAM_KEY,
        VIDGATE_ADMIN_TOKEN=ADMIN_TOKEN,
        VIDGATE_WEBHOOK_ALLOW_PRIVATE="true",
        VIDGATE_POLL_INTERVAL_S="0.3",
        VIDGATE_LEASE_S="3",
        # Two test workers start up to three gateways each beside their own pools: PostgreSQL here
        # admits 100 connections in all.
        VIDGATE_DATABASE_POOL_SIZE="10",
        # Rehosting on (the default): outputs come from the simulator into a directory of this run.
        VIDGATE_OUTPUT_HOSTS=urlsplit(sim.url).netloc,
        VIDGATE_OUTPUTS_STORE=OUTPUTS_DIR,
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
