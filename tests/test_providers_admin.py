"""The operator's view of the providers (SPEC §11): GET /admin/v1/providers, disable and enable stored
in the database, the usage report by provider, and the per-provider call tallies the dashboard shows."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, select

from app.budgets.models import LedgerEntry
from app.core import clock, metrics
from app.core.database import create_engine, create_sessionmaker, transaction
from app.providers import stats
from app.providers.models import ProviderState
from app.runtime import Runtime
from tests.conftest import Api

KEYS = {"VD_KEY": "vd-secret-1", "WS_KEY": "ws-secret-2", "FAL_KEY": "fal-secret-3"}


def providers_toml(sim_url: str) -> str:
    return f"""
routing = "cheapest"

[[providers]]
name = "vibedream"
kind = "vibedream"
base_url = "{sim_url}"
api_key_env = "VD_KEY"
priority = 1
max_concurrent = 200
output_hosts = ["assets.vibedream.ai"]
cents_per_second = {{ "480p" = 1.8, "720p" = 3.6, "1080p" = 7.2 }}

[[providers]]
name = "wavespeed"
kind = "wavespeed"
base_url = "https://api.wavespeed.ai"
api_key_env = "WS_KEY"
priority = 2
rate_per_minute = 600
cents_per_second = {{ "480p" = 1.5, "720p" = 3.0, "1080p" = 6.0 }}

[[providers]]
name = "fal"
kind = "fal"
base_url = "https://queue.fal.run"
api_key_env = "FAL_KEY"
priority = 3
resolutions = ["480p", "720p"]
max_duration = 10
cents_per_second = {{ "480p" = 2.0, "720p" = 4.0 }}
"""


@pytest.fixture
def settings_overrides(tmp_path: Path, sim_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    for name, value in KEYS.items():
        monkeypatch.setenv(name, value)
    path = tmp_path / "providers.toml"
    path.write_text(providers_toml(sim_url))
    yield {"providers_file": path}


async def test_list_shows_settings_and_state_never_a_key(api: Api) -> None:
    answer = await api.admin("GET", "/admin/v1/providers")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["routing"] == "cheapest"
    assert [p["name"] for p in body["data"]] == ["vibedream", "wavespeed", "fal"]  # the file's order
    assert [p["kind"] for p in body["data"]] == ["vibedream", "wavespeed", "fal"]
    vd, ws, fal = body["data"]
    # vibedream without a model sends the gateway's modelId as it is.
    assert vd["apiKeyEnv"] == "VD_KEY" and vd["maxConcurrent"] == 200 and vd["model"] == ""
    assert ws["ratePerMinute"] == 600 and ws["model"] == "wavespeed-ai/ltx-2-19b/image-to-video"
    assert fal["resolutions"] == ["480p", "720p"] and fal["maxDuration"] == 10
    assert fal["centsPerSecond"] == {"480p": 2.0, "720p": 4.0}
    for provider in body["data"]:
        assert provider["state"]["enabled"] is True and provider["state"]["disabled"] is False
        assert provider["state"]["circuit"] == "closed" and provider["state"]["coolingDownUntil"] is None
        assert provider["state"]["inFlight"] == 0
        assert provider["today"]["submits"] == 0 and provider["today"]["spentCents"] == 0
    for secret in (*KEYS.values(), "vendor-test-key"):
        assert secret not in answer.text
    assert "apiKey" not in vd


async def test_disable_and_enable_are_stored_and_idempotent(api: Api, runtime: Runtime) -> None:
    disabled = await api.admin("POST", "/admin/v1/providers/wavespeed/disable")
    assert disabled.status_code == 200, disabled.text
    state = disabled.json()["state"]
    assert state["enabled"] is False and state["disabledBy"] == "admin"
    assert state["disabledAt"].endswith("Z") and len(state["disabledAt"]) == 24
    again = await api.admin("POST", "/admin/v1/providers/wavespeed/disable")
    assert again.status_code == 200 and again.json()["state"]["enabled"] is False

    async with transaction(runtime.sessions, readonly=True) as session:
        rows = {row.name: row.disabled for row in await session.scalars(select(ProviderState))}
    assert rows["wavespeed"] is True and not rows.get("vibedream") and not rows.get("fal")

    listed = (await api.admin("GET", "/admin/v1/providers")).json()["data"]
    assert [p["state"]["enabled"] for p in listed] == [True, False, True]
    one = await api.admin("GET", "/admin/v1/providers/wavespeed")
    assert one.status_code == 200 and one.json()["state"]["enabled"] is False

    enabled = await api.admin("POST", "/admin/v1/providers/wavespeed/enable")
    assert enabled.status_code == 200
    assert enabled.json()["state"]["enabled"] is True and enabled.json()["state"]["disabledAt"] is None
    listed = (await api.admin("GET", "/admin/v1/providers")).json()["data"]
    assert [p["state"]["enabled"] for p in listed] == [True, True, True]


@pytest.mark.parametrize("name", ["nope", "VIBEDREAM", "a" * 200, "vibedream%20"])
async def test_unknown_provider_is_a_404_problem(api: Api, name: str) -> None:
    for method, path in (
        ("GET", f"/admin/v1/providers/{name}"),
        ("POST", f"/admin/v1/providers/{name}/disable"),
        ("POST", f"/admin/v1/providers/{name}/enable"),
    ):
        answer = await api.admin(method, path)
        assert answer.status_code == 404, (path, answer.text)
        assert answer.headers["content-type"] == "application/problem+json"
        assert answer.json()["code"] == "provider_not_found"
        assert "vibedream, wavespeed, fal" in answer.json()["detail"]


async def test_a_name_the_database_cannot_hold_is_refused_with_a_4xx(api: Api) -> None:
    answer = await api.admin("POST", "/admin/v1/providers/a%00b/disable")
    assert answer.status_code == 422
    too_long = await api.admin("GET", "/admin/v1/providers/" + "x" * 201)
    assert too_long.status_code == 422


async def test_provider_routes_need_the_operator_token(api: Api) -> None:
    for method, path in (
        ("GET", "/admin/v1/providers"),
        ("GET", "/admin/v1/providers/fal"),
        ("POST", "/admin/v1/providers/fal/disable"),
        ("POST", "/admin/v1/providers/fal/enable"),
    ):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            answer = await api.http.request(method, path, headers=headers)
            assert answer.status_code == 401, (method, path)
            assert answer.json()["code"] == "invalid_admin_token"
    listed = (await api.admin("GET", "/admin/v1/providers")).json()["data"]
    assert all(p["state"]["enabled"] for p in listed)  # nothing was switched


async def test_openapi_declares_the_routes_behind_the_bearer_scheme(api: Api) -> None:
    paths = (await api.http.get("/openapi.json")).json()["paths"]
    for path, method in (
        ("/admin/v1/providers", "get"),
        ("/admin/v1/providers/{name}", "get"),
        ("/admin/v1/providers/{name}/disable", "post"),
        ("/admin/v1/providers/{name}/enable", "post"),
    ):
        assert paths[path][method]["security"] == [{"AdminToken": []}], path
        assert paths[path][method]["x-cli"].startswith("providers "), path  # the command that does the same


async def _ledger(runtime: Runtime, tenant_id: str, rows: list[tuple[str | None, str, int]]) -> None:
    async with transaction(runtime.sessions) as session:
        for provider, kind, spent in rows:
            await session.execute(
                insert(LedgerEntry).values(
                    tenant_id=tenant_id,
                    prediction_id=None,
                    model_id="ltx-2-19b",
                    provider=provider,
                    period_start=clock.now(),
                    kind=kind,
                    reserved_delta=0,
                    spent_delta=spent,
                    created_at=clock.now(),
                )
            )


async def test_usage_grouped_by_provider_sums_the_ledger(api: Api, runtime: Runtime) -> None:
    tenant = await api.tenant()
    await _ledger(
        runtime,
        tenant.id,
        [("vibedream", "settle", 9), ("vibedream", "settle", 18), ("fal", "settle", 10), ("fal", "refund", -10)],
    )
    answer = await api.admin("GET", "/admin/v1/usage", params={"groupBy": "provider"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["groupBy"] == "provider"
    assert answer.json()["data"] == [
        {"provider": "fal", "spentCents": 0, "predictions": 1},
        {"provider": "vibedream", "spentCents": 27, "predictions": 2},
    ]
    csv = await api.admin("GET", "/admin/v1/usage", params={"groupBy": "provider", "format": "csv"})
    assert csv.text.splitlines() == ["provider,spentCents,predictions", "fal,0,1", "vibedream,27,2"]
    # Today's spend per provider, on the providers list.
    listed = {p["name"]: p["today"] for p in (await api.admin("GET", "/admin/v1/providers")).json()["data"]}
    assert listed["vibedream"]["spentCents"] == 27 and listed["vibedream"]["predictions"] == 2
    assert listed["fal"]["spentCents"] == 0 and listed["wavespeed"]["spentCents"] == 0


async def test_call_tallies_reach_the_daily_rows_and_the_list(api: Api, runtime: Runtime) -> None:
    metrics.take_tallies()  # what earlier tests in this process tallied
    for outcome, seconds in (("200", 0.1), ("200", 0.3), ("429", 0.01), ("503", 0.02), ("connection_error", 0)):
        metrics.observe_upstream("wavespeed", "submit", outcome, seconds)
    metrics.observe_upstream("wavespeed", "poll", "200", 0.05)
    metrics.observe_upstream("wavespeed", "poll", "timeout", 1.0)
    metrics.observe_upstream("fal", "submit", "401", 0.02)
    metrics.observe_upstream("fal", "submit", "422", 0.02)  # the caller's mistake: not the provider's error
    assert await stats.flush(runtime.sessions) == 2
    assert await stats.flush(runtime.sessions) == 0  # nothing new
    metrics.observe_upstream("wavespeed", "submit", "200", 0.2)
    assert await stats.flush(runtime.sessions) == 1  # added to the same day's row

    listed = {p["name"]: p["today"] for p in (await api.admin("GET", "/admin/v1/providers")).json()["data"]}
    ws = listed["wavespeed"]
    assert (ws["submits"], ws["accepted"], ws["throttled"], ws["errors"], ws["polls"]) == (6, 3, 1, 3, 2)
    assert ws["meanSubmitMs"] == pytest.approx((100 + 300 + 10 + 20 + 0 + 200) / 6, abs=0.2)
    fal = listed["fal"]
    assert (fal["submits"], fal["accepted"], fal["throttled"], fal["errors"]) == (2, 0, 0, 1)
    assert listed["vibedream"]["submits"] == 0 and listed["vibedream"]["meanSubmitMs"] is None


async def test_a_failed_flush_keeps_its_tallies_for_the_next(runtime: Runtime, tmp_path: Path) -> None:
    metrics.take_tallies()
    metrics.observe_upstream("fal", "submit", "200", 0.1)
    away = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'unmigrated.db'}", pool_size=1)  # no tables
    try:
        with pytest.raises(Exception, match="provider_days"):
            await stats.flush(create_sessionmaker(away))
    finally:
        await away.dispose()
    metrics.observe_upstream("fal", "submit", "200", 0.1)
    assert await stats.flush(runtime.sessions) == 1
    async with transaction(runtime.sessions, readonly=True) as session:
        day = (await stats.today(session))["fal"]
    assert day.submits == 2 and day.accepted == 2


def test_the_example_providers_file_is_valid() -> None:
    """deploy/providers.example.toml, as an operator copies it, passes the check `serve` makes at start."""
    from app.providers.config import parse_registry

    path = Path(__file__).resolve().parents[1] / "deploy" / "providers.example.toml"
    environ = {"VIBEDREAM_API_KEY": "a", "WAVESPEED_API_KEY": "b", "FAL_KEY": "c"}
    registry = parse_registry(path.read_text(), str(path), environ)
    assert [(p.name, p.kind) for p in registry.providers] == [
        ("vibedream", "vibedream"),
        ("wavespeed", "wavespeed"),
        ("fal", "fal"),
    ]
    assert all(p.api_key_env and p.output_hosts for p in registry.providers)


async def test_the_switch_records_the_operator_the_check_names(runtime: Runtime) -> None:
    """build_router takes the operator check from app/main.py; the actor it names is who disabled."""
    import httpx
    from fastapi import FastAPI

    from app.core.errors import install_error_handlers
    from app.providers.router import build_router

    class Named:
        actor = "operator:night-shift"

    async def check() -> Named:
        return Named()

    app = FastAPI()
    app.state.runtime = runtime
    install_error_handlers(app)
    app.include_router(build_router(check))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway.test") as http:
        answer = await http.post("/admin/v1/providers/fal/disable")
    assert answer.status_code == 200, answer.text
    assert answer.json()["state"]["disabledBy"] == "operator:night-shift"
