"""Overload (SPEC §6): a process takes at most VIDGATE_MAX_INFLIGHT_REQUESTS API requests at once and answers
the next one at once with `503 overloaded` and `Retry-After: 1`; /healthz, /readyz and /metrics are never
refused. Shown by counts: LIMIT submits are held in flight by an upstream that answers only when the test
lets it, and the one past them is refused while they are still held."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp import web

from tests.conftest import ADMIN_TOKEN, Api

LIMIT = 4


class GatedUpstream:
    """A VibeDream submit endpoint that holds every submit until `gate` is opened."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.arrived = 0
        self.changed = asyncio.Event()
        self.url = ""

    async def submit(self, request: web.Request) -> web.Response:
        self.arrived += 1
        self.changed.set()
        await self.gate.wait()
        number = self.arrived
        return web.json_response(
            {
                "id": f"up-{number}-{id(request)}",
                "status": "processing",
                "statusUrl": f"{self.url}/api/v1/predictions/up-{number}",
                "estimatedTime": "5-20s",
                "costCents": 9,
                "createdAt": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            }
        )

    async def until_arrived(self, count: int) -> None:
        while self.arrived < count:
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), 30)


async def ping(_request: web.Request) -> web.Response:
    return web.json_response({})


@pytest.fixture
async def gated() -> AsyncIterator[GatedUpstream]:
    upstream = GatedUpstream()
    app = web.Application()
    app.router.add_post("/api/v1/models/{model}/generate", upstream.submit)
    app.router.add_get("/{tail:.*}", ping)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    upstream.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    yield upstream
    upstream.gate.set()
    await runner.cleanup()


@pytest.fixture
def settings_overrides(gated: GatedUpstream) -> dict[str, Any]:
    return {"upstream_base_url": gated.url, "max_inflight_requests": LIMIT}


async def test_the_request_past_the_limit_is_shed_at_once_and_health_is_never_refused(
    live_api: Api, gated: GatedUpstream
) -> None:
    tenant = await live_api.tenant()
    held = [asyncio.create_task(tenant.submit()) for _ in range(LIMIT)]
    await gated.until_arrived(LIMIT)  # LIMIT submits in flight, each waiting on the upstream

    shed = await asyncio.wait_for(tenant.submit(), 30)  # without shedding it would wait for the gate
    assert shed.status_code == 503, shed.text
    assert shed.json()["code"] == "overloaded"
    assert shed.json()["limit"] == LIMIT
    assert shed.headers["retry-after"] == "1"
    assert shed.headers["content-type"] == "application/problem+json"
    assert gated.arrived == LIMIT  # refused before anything was held or sent upstream
    # Reads are API requests too; the operator API as well.
    assert (await tenant.get("/api/v1/usage")).status_code == 503
    assert (await live_api.admin("GET", "/admin/v1/tenants")).status_code == 503

    # How the process is watched stays open while it is full.
    assert (await live_api.http.get("/healthz")).status_code == 200
    assert (await live_api.http.get("/readyz")).status_code == 200
    metrics = await live_api.http.get("/metrics", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert metrics.status_code == 200
    assert 'status="503"' in metrics.text

    gated.gate.set()
    answers = await asyncio.gather(*held)
    assert [a.status_code for a in answers] == [200] * LIMIT
    # Room again once they ended.
    assert (await tenant.submit()).status_code == 200
    assert (await tenant.get("/api/v1/usage")).status_code == 200


async def test_a_refused_request_leaves_no_count_behind(live_api: Api, gated: GatedUpstream) -> None:
    """Shed, failed and refused requests all give their place back: LIMIT more are admitted after many."""
    gated.gate.set()
    tenant = await live_api.tenant()
    for _ in range(3 * LIMIT):
        assert (await tenant.get("/api/v1/predictions/nope")).status_code == 404
        bad = await live_api.http.post(
            "/api/v1/models/ltx-2-19b/generate", content=b"x" * 70_000, headers=tenant.headers()
        )
        assert bad.status_code == 413
    admission = live_api.http._transport.app.state.admission  # type: ignore[attr-defined]
    assert admission.inflight == 0
    answers = await asyncio.gather(*(tenant.submit() for _ in range(LIMIT)))
    assert [a.status_code for a in answers] == [200] * LIMIT
