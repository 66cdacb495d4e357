"""Test fixtures. The suite runs against SQLite or PostgreSQL (VIDGATE_TEST_DB=sqlite|postgresql),
on a database per xdist worker built by `alembic upgrade head`, with the upstream simulator and webhook
receivers as real HTTP servers on loopback.

Two database modes:
- `runtime`: one connection, one outer transaction rolled back at the end; every unit of work in the
  test is a savepoint on it. For in-process API tests that make one request at a time.
- `live_runtime`: a real pool and real commits (tables emptied afterwards). For the worker, for
  concurrency and for anything a second connection must see.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import httpx
import pytest
from aiohttp import web
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from app.core import clock
from app.core.database import Base, create_engine
from app.core.migrate import upgrade_to_head
from app.core.settings import Settings
from app.main import create_app
from app.runtime import Runtime, build_runtime
from app.upstream.simulator import STATE, Faults, SimConfig, SimState, start_simulator

ADMIN_TOKEN = "test-admin-token-0123456789abcdef"  # 32 characters, as a real token must have
PG_SERVER = os.environ.get("VIDGATE_TEST_PG", "postgresql://postgres@127.0.0.1:5432")
TEST_DB = os.environ.get("VIDGATE_TEST_DB", "sqlite")


def pytest_report_header() -> str:
    return f"vidgate test database: {TEST_DB}"


def _worker_id() -> str:
    return os.environ.get("PYTEST_XDIST_WORKER", "main")


async def _fresh_postgres(name: str) -> str:
    import asyncpg

    conn = await asyncpg.connect(PG_SERVER + "/postgres")
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return f"postgresql+asyncpg://{PG_SERVER.split('://', 1)[1]}/{name}"


async def _drop_postgres(name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_SERVER + "/postgres")
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture(scope="session")
async def database_url(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    if TEST_DB == "postgresql":
        # Unique per run and worker, so two test runs on one machine never drop each other's database.
        run = os.environ.get("PYTEST_XDIST_TESTRUNUID", str(os.getpid()))[:12]
        name = f"vidgate_test_{run}_{_worker_id()}"
        yield await _fresh_postgres(name)
        await _drop_postgres(name)
        return
    path = Path(tmp_path_factory.mktemp("db")) / "vidgate.db"
    yield f"sqlite+aiosqlite:///{path}"


@pytest.fixture(scope="session")
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(database_url, pool_size=20)
    await upgrade_to_head(engine)
    yield engine
    await engine.dispose()


@pytest.fixture(scope="session")
async def simulator() -> AsyncIterator[tuple[str, SimState]]:
    runner, url = await start_simulator(config=SimConfig(completion_s=0.3, estimated_time="0-1s"))
    yield url, runner.app[STATE]
    await runner.cleanup()


@pytest.fixture
def sim(simulator: tuple[str, SimState]) -> SimState:
    """The simulator's state, reset for this test."""
    _url, state = simulator
    state.config = SimConfig(completion_s=0.3, estimated_time="0-1s")
    state.faults = Faults()
    state.predictions.clear()
    state.polls_by_id.clear()
    state.poll_times.clear()
    state.bodies.clear()
    state.submits = 0
    state.polls = 0
    state.output_fetches = 0
    state.output_bytes_sent = 0
    state.submits_by_format.clear()
    state.auths.clear()
    state.accepted = 0
    state.max_in_flight = 0
    state.live.clear()
    return state


@pytest.fixture
def sim_url(simulator: tuple[str, SimState]) -> str:
    return simulator[0]


@pytest.fixture(autouse=True)
def _reset_clock() -> Any:
    yield
    clock.reset()


OUTPUTS_DIR = tempfile.mkdtemp(prefix="vidgate-test-outputs-")


def make_settings(database_url: str, upstream_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = dict(
        database_url=database_url,
        upstream_base_url=upstream_url,
        upstream_api_key="vendor-test-key",
        admin_token=ADMIN_TOKEN,
        webhook_allow_private=True,
        run_worker=False,
        poll_interval_s=0.2,
        lease_s=5.0,
        log_json=True,
        # Rehosting stays on (the default): outputs come from the simulator, into a directory of this run.
        output_hosts=[urlsplit(upstream_url).netloc],
        outputs_store=OUTPUTS_DIR,
    )
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    """Override in a test module to change settings for its runtimes."""
    return {}


@pytest.fixture
async def runtime(
    engine: AsyncEngine, database_url: str, sim_url: str, sim: SimState, settings_overrides: dict[str, Any]
) -> AsyncIterator[Runtime]:
    async with engine.connect() as connection:
        outer = await connection.begin()
        sessions = async_sessionmaker(
            bind=connection, expire_on_commit=False, autoflush=False, join_transaction_mode="create_savepoint"
        )
        rt = build_runtime(make_settings(database_url, sim_url, **settings_overrides), engine, sessions)
        try:
            yield rt
        finally:
            await rt.close()
            await outer.rollback()


async def empty_tables(engine: AsyncEngine) -> None:
    async with engine.begin() as connection:
        for table in reversed(Base.metadata.sorted_tables):
            await connection.execute(text(f"DELETE FROM {table.name}"))


@pytest.fixture
async def live_runtime(
    engine: AsyncEngine, database_url: str, sim_url: str, sim: SimState, settings_overrides: dict[str, Any]
) -> AsyncIterator[Runtime]:
    from app.core.database import create_sessionmaker

    rt = build_runtime(make_settings(database_url, sim_url, **settings_overrides), engine, create_sessionmaker(engine))
    try:
        yield rt
    finally:
        await rt.close()
        await empty_tables(engine)


@dataclass
class Api:
    """An httpx client on the ASGI app, with helpers for the operator calls most tests need."""

    http: httpx.AsyncClient
    runtime: Runtime

    async def admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}", **kwargs.pop("headers", {})}
        return await self.http.request(method, path, headers=headers, **kwargs)

    async def tenant(self, **body: Any) -> Tenant:
        body.setdefault("name", "acme")
        created = await self.admin("POST", "/admin/v1/tenants", json=body)
        assert created.status_code == 201, created.text
        data = created.json()
        key = await self.admin("POST", f"/admin/v1/tenants/{data['id']}/keys", json={})
        assert key.status_code == 201, key.text
        return Tenant(self, data, key.json()["key"])


@dataclass
class Tenant:
    api: Api
    data: dict[str, Any]
    key: str
    extra_keys: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return str(self.data["id"])

    def headers(self, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}", **extra}

    async def submit(
        self, body: dict[str, Any] | None = None, model: str = "ltx-2-19b", **headers: str
    ) -> httpx.Response:
        payload = body if body is not None else valid_body()
        return await self.api.http.post(
            f"/api/v1/models/{model}/generate", json=payload, headers=self.headers(**headers)
        )

    async def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return await self.api.http.get(path, headers=self.headers(), **kwargs)


def valid_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "image": "https://example.com/cat.png",
        "prompt": "a cat waves at the camera",
        "resolution": "480p",
        "duration": 5,
    }
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not None}


async def _api(rt: Runtime) -> AsyncIterator[Api]:
    app = create_app(rt.settings, rt)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as http:
        yield Api(http, rt)


@pytest.fixture
async def api(runtime: Runtime) -> AsyncIterator[Api]:
    async for value in _api(runtime):
        yield value


@pytest.fixture
async def live_api(live_runtime: Runtime) -> AsyncIterator[Api]:
    async for value in _api(live_runtime):
        yield value


@pytest.fixture
async def worker(live_runtime: Runtime) -> AsyncIterator[Any]:
    """A real Worker (poller + dispatcher + housekeeping) running beside the test."""
    from app.worker import Worker

    process = Worker(live_runtime)
    task = asyncio.create_task(process.run())
    yield process
    process.stop()
    await asyncio.wait_for(task, 30)


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 15.0, what: str = "condition") -> None:
    """Wait until `check()` is true, re-checking on a short cadence (for state in another process)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


# ---------------------------------------------------------------- webhook receivers


@dataclass
class Received:
    headers: dict[str, str]
    body: str


@dataclass
class Receiver:
    """A real HTTP server on loopback that records deliveries and answers as told."""

    url: str
    received: list[Received] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)  # answers to give, in order; then `default_status`
    default_status: int = 204
    delay_s: float = 0.0
    headers_to_send: dict[str, str] = field(default_factory=dict)
    arrived: asyncio.Queue[Received] = field(default_factory=asyncio.Queue)

    async def next(self, timeout: float = 15.0) -> Received:
        return await asyncio.wait_for(self.arrived.get(), timeout)


@pytest.fixture
async def receiver_factory() -> AsyncIterator[Callable[..., Awaitable[Receiver]]]:
    runners: list[web.AppRunner] = []

    async def make(**options: Any) -> Receiver:
        receiver: Receiver | None = None

        async def handle(request: web.Request) -> web.Response:
            assert receiver is not None
            item = Received(dict(request.headers), await request.text())
            receiver.received.append(item)
            if receiver.delay_s:
                await asyncio.sleep(receiver.delay_s)
            status = receiver.statuses.pop(0) if receiver.statuses else receiver.default_status
            if 200 <= status < 300:
                receiver.arrived.put_nowait(item)
            return web.Response(status=status, headers=receiver.headers_to_send)

        app = web.Application()
        app.router.add_post("/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        receiver = Receiver(url=f"http://127.0.0.1:{port}/hooks", **options)
        return receiver

    yield make
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def http_session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture(autouse=True)
def _client_verifies_every_delivery(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every webhook these tests check with `standardwebhooks` is checked by vidgate_client.webhooks
    too (SPEC §9), with the same outcome: accepted by both, or refused by both."""
    from standardwebhooks.webhooks import Webhook, WebhookVerificationError
    from vidgate_client import webhooks as client_webhooks

    reference = Webhook.verify

    def verify_both(self: Webhook, data: bytes | str, headers: dict[str, str], **options: Any) -> Any:
        secret = self._whsecret
        try:
            result = reference(self, data, headers, **options)
        except WebhookVerificationError:
            with pytest.raises(client_webhooks.WebhookVerificationError):
                client_webhooks.verify(data, headers, secret)
            raise
        event = client_webhooks.verify(data, headers, secret)
        assert (event.type, event.data) == (result["type"], result["data"])
        return result

    monkeypatch.setattr(Webhook, "verify", verify_both)
