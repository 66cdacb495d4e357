"""Fail-closed modes, /metrics behind a token, the one timestamp form, public links and Retry-After
(issue 12 points 5 to 8 and 11), in process. The process-level side is in test_fail_closed.py."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from ipaddress import ip_network
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from sqlalchemy import func, select

from app.core import clock
from app.core.retry_after import parse_retry_after, retry_after_value
from app.core.settings import SANDBOX_ADMIN_TOKEN, Settings
from app.predictions.models import Prediction
from app.runtime import Runtime
from app.tenants.models import Tenant
from app.upstream import sandbox
from app.upstream.client import UpstreamClient, UpstreamUnavailable
from app.upstream.simulator import SimState
from tests.conftest import ADMIN_TOKEN, Api, Receiver, eventually, valid_body

VENDOR_FORM = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
TIMESTAMP_KEYS = {"timestamp", "periodStart", "periodEnd", "resetsAt"}


def use_settings(api: Api, **changes: Any) -> None:
    """Routes read the runtime's settings per request: change them for this test."""
    api.runtime.settings = Settings(_env_file=None, **{**api.runtime.settings.model_dump(), **changes})


# ---------------------------------------------------------------- 5. fail-closed modes


LONG = "operator-token-0123456789abcdef-0123456789"


def test_sandbox_is_asked_for_never_implied(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VIDGATE_UPSTREAM_API_KEY", raising=False)
    monkeypatch.delenv("VIBEDREAM_API_KEY", raising=False)
    monkeypatch.delenv("VIDGATE_SANDBOX", raising=False)
    assert not Settings(_env_file=None).sandbox
    monkeypatch.setenv("VIDGATE_SANDBOX", "true")
    assert Settings(_env_file=None).sandbox


@pytest.mark.parametrize(
    ("values", "role", "names"),
    [
        ({"admin_token": LONG}, "serve", "VIDGATE_UPSTREAM_API_KEY"),
        ({"admin_token": LONG}, "worker", "VIDGATE_UPSTREAM_API_KEY"),
        ({"upstream_api_key": "", "admin_token": LONG}, "serve", "VIDGATE_UPSTREAM_API_KEY"),
        ({"upstream_api_key": "k"}, "serve", "VIDGATE_ADMIN_TOKEN"),
        ({"upstream_api_key": "k", "admin_token": ""}, "serve", "VIDGATE_ADMIN_TOKEN"),
        ({"upstream_api_key": "k", "admin_token": SANDBOX_ADMIN_TOKEN}, "serve", "VIDGATE_ADMIN_TOKEN"),
        ({"upstream_api_key": "k", "admin_token": LONG, "metrics_token": SANDBOX_ADMIN_TOKEN}, "serve", "METRICS"),
        ({"upstream_api_key": "k"}, "worker", "VIDGATE_OUTPUT_SIGNING_KEY"),
        ({"upstream_api_key": "k", "output_signing_key": ""}, "worker", "VIDGATE_OUTPUT_SIGNING_KEY"),
        # Short tokens, however set, in every mode (issue 24 B3).
        ({"upstream_api_key": "k", "admin_token": "x"}, "serve", "VIDGATE_ADMIN_TOKEN is 1 characters"),
        ({"upstream_api_key": "k", "admin_token": LONG[:31]}, "worker", "VIDGATE_ADMIN_TOKEN"),
        ({"upstream_api_key": "k", "admin_token": LONG, "metrics_token": "m" * 31}, "serve", "VIDGATE_METRICS_TOKEN"),
        ({"sandbox": True, "admin_token": "short"}, "serve", "VIDGATE_ADMIN_TOKEN"),
    ],
)
def test_refusals(values: dict[str, Any], role: Any, names: str) -> None:
    refusal = Settings(_env_file=None, **values).startup_refusal(role)
    assert refusal is not None and names in refusal and "\n" not in refusal


def test_what_may_start() -> None:
    assert Settings(_env_file=None, upstream_api_key="k", admin_token=LONG).startup_refusal("serve") is None
    # No operator API in a worker, but output links need a key to be signed with.
    assert Settings(_env_file=None, upstream_api_key="k", output_signing_key="s").startup_refusal("worker") is None
    assert Settings(_env_file=None, upstream_api_key="k", admin_token=LONG).startup_refusal("worker") is None
    assert Settings(_env_file=None, sandbox=True).startup_refusal("serve") is None
    # The sandbox's own (public, short) token still works there.
    assert Settings(_env_file=None, sandbox=True, admin_token=SANDBOX_ADMIN_TOKEN).startup_refusal("serve") is None
    assert Settings(_env_file=None, upstream_api_key="k", admin_token=LONG[:32]).startup_refusal("serve") is None


async def test_sandbox_token_is_refused_outside_sandbox(api: Api) -> None:
    sandbox_auth = {"Authorization": f"Bearer {SANDBOX_ADMIN_TOKEN}"}
    # What a forgotten vendor key used to turn into sandbox mode: no key, no admin token, no --sandbox.
    use_settings(api, upstream_api_key=None, admin_token=None)
    refused = await api.http.get("/admin/v1/tenants", headers=sandbox_auth)
    assert refused.status_code == 401 and refused.json()["code"] == "invalid_admin_token"
    # Even set as the admin token on purpose, the public token opens nothing outside sandbox mode.
    use_settings(api, admin_token=SANDBOX_ADMIN_TOKEN)
    assert (await api.http.get("/admin/v1/tenants", headers=sandbox_auth)).status_code == 401
    use_settings(api, sandbox=True, admin_token=None)
    assert (await api.http.get("/admin/v1/tenants", headers=sandbox_auth)).status_code == 200


async def _tenant_names(runtime: Runtime) -> list[str]:
    async with runtime.sessions() as session:
        return list(await session.scalars(select(Tenant.name).order_by(Tenant.name)))


async def test_sandbox_never_seeds_a_database_with_tenants_of_its_own(live_api: Api) -> None:
    runtime = live_api.runtime
    settings = runtime.settings.model_copy(update={"sandbox": True})
    await live_api.tenant(name="acme")
    assert await sandbox.create_demo_key(runtime.sessions, settings, "http://127.0.0.1:8000") is None
    assert await _tenant_names(runtime) == ["acme"]


async def test_sandbox_reuses_its_own_demo_tenant(live_api: Api) -> None:
    runtime = live_api.runtime
    settings = runtime.settings.model_copy(update={"sandbox": True})
    first = await sandbox.create_demo_key(runtime.sessions, settings, "http://127.0.0.1:8000")
    second = await sandbox.create_demo_key(runtime.sessions, settings, "http://127.0.0.1:8000")
    assert first and second and first != second
    assert await _tenant_names(runtime) == [sandbox.DEMO_TENANT]
    for key in (first, second):
        answer = await live_api.http.get("/api/v1/usage", headers={"Authorization": f"Bearer {key}"})
        assert answer.status_code == 200, answer.text


# ---------------------------------------------------------------- 6. /metrics behind a token


async def test_metrics_needs_a_token_outside_sandbox(api: Api) -> None:
    use_settings(api, metrics_token="m-" + "x" * 30)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {SANDBOX_ADMIN_TOKEN}"}):
        refused = await api.http.get("/metrics", headers=headers)
        assert refused.status_code == 401, headers
        assert refused.json()["code"] == "invalid_metrics_token"
        assert refused.headers["www-authenticate"] == "Bearer"
        assert "vidgate_" not in refused.text
    for token in ("m-" + "x" * 30, ADMIN_TOKEN):
        allowed = await api.http.get("/metrics", headers={"Authorization": f"Bearer {token}"})
        assert allowed.status_code == 200 and "vidgate_http_requests_total" in allowed.text


async def test_the_sandbox_clip_honours_if_none_match(api: Api) -> None:
    use_settings(api, sandbox=True)
    clip = await api.http.get("/sandbox/outputs/clip.mp4")
    assert clip.status_code == 200 and clip.headers["content-type"] == "video/mp4"
    for tag in (clip.headers["etag"], "*"):
        assert (await api.http.get("/sandbox/outputs/clip.mp4", headers={"If-None-Match": tag})).status_code == 304


async def test_metrics_open_only_in_sandbox(api: Api) -> None:
    use_settings(api, metrics_token=None)
    assert (await api.http.get("/metrics")).status_code == 401
    use_settings(api, sandbox=True)
    assert (await api.http.get("/metrics")).status_code == 200


# ---------------------------------------------------------------- 7. timestamps


def timestamps(value: Any, path: str = "") -> list[tuple[str, str]]:
    """Every timestamp field in a JSON answer: (where, value)."""
    found: list[tuple[str, str]] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, str) and (key.endswith("At") or key in TIMESTAMP_KEYS):
                found.append((f"{path}.{key}", item))
            else:
                found.extend(timestamps(item, f"{path}.{key}"))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found.extend(timestamps(item, f"{path}[{index}]"))
    return found


async def test_every_timestamp_has_the_vendors_form(
    live_api: Api, worker: Any, sim: SimState, receiver_factory: Any
) -> None:
    receiver: Receiver = await receiver_factory()
    answers: dict[str, Any] = {}

    async def record(name: str, response: Any, status: int = 200) -> Any:
        assert response.status_code == status, (name, response.text)
        answers[name] = response.json()
        return answers[name]

    admin = live_api.admin
    created = await admin(
        "POST", "/admin/v1/tenants", json={"name": "ts", "budgetCents": 18, "webhookUrl": receiver.url}
    )
    tenant_data = await record("create tenant", created, 201)
    tid = tenant_data["id"]
    key = await record("create key", await admin("POST", f"/admin/v1/tenants/{tid}/keys", json={}), 201)
    auth = {"Authorization": f"Bearer {key['key']}"}
    http = live_api.http
    generate = "/api/v1/models/ltx-2-19b/generate"
    first = await record("submit", await http.post(generate, json=valid_body(), headers=auth))
    await record("submit and wait", await http.post(generate, json=valid_body(), headers={**auth, "Prefer": "wait=10"}))
    await record("402", await http.post(generate, json=valid_body(), headers=auth), 402)
    await eventually(lambda: _terminal(live_api, auth, first["id"]), what="the first prediction to complete")
    await record("get prediction", await http.get(f"/api/v1/predictions/{first['id']}", headers=auth))
    await record("list predictions", await http.get("/api/v1/predictions", headers=auth))
    await record("usage", await http.get("/api/v1/usage", headers=auth))

    async def all_delivered() -> bool:
        # Two prediction.completed and budget.threshold events (50 %, then 80 and 100 % together).
        listed = (await http.get("/api/v1/webhook-deliveries", headers=auth)).json()["data"]
        return len(listed) >= 4 and all(d["deliveredAt"] for d in listed)

    await eventually(all_delivered, what="every webhook delivered")
    for number, delivery in enumerate(receiver.received):
        answers[f"webhook {number}"] = json.loads(delivery.body)
    deliveries = await record("own deliveries", await http.get("/api/v1/webhook-deliveries", headers=auth))
    delivery_id = deliveries["data"][0]["id"]
    await record("own delivery", await http.get(f"/api/v1/webhook-deliveries/{delivery_id}", headers=auth))
    await record("deliveries", await admin("GET", "/admin/v1/webhook-deliveries"))
    await record("delivery", await admin("GET", f"/admin/v1/webhook-deliveries/{delivery_id}"))
    await record("redeliver", await admin("POST", f"/admin/v1/webhook-deliveries/{delivery_id}/redeliver"), 202)
    await record("tenants", await admin("GET", "/admin/v1/tenants"))
    await record("tenant", await admin("GET", f"/admin/v1/tenants/{tid}"))
    await record("patch tenant", await admin("PATCH", f"/admin/v1/tenants/{tid}", json={"name": "ts2"}))
    await record("tenant usage", await admin("GET", f"/admin/v1/tenants/{tid}/usage"))
    await record("keys", await admin("GET", f"/admin/v1/tenants/{tid}/keys"))
    await record("revoke key", await admin("DELETE", f"/admin/v1/tenants/{tid}/keys/{key['id']}"))
    await record("rotate", await admin("POST", f"/admin/v1/tenants/{tid}/webhook-secret/rotate"))

    found = [(name, where, value) for name, body in answers.items() for where, value in timestamps(body)]
    wrong = [item for item in found if not VENDOR_FORM.match(item[2])]
    assert not wrong, wrong
    # The walk saw every kind of timestamp, so an answer that lost its field would not pass unnoticed.
    seen = {where.rsplit(".", 1)[-1] for _, where, _ in found}
    expected = {"createdAt", "completedAt", "timestamp", "periodStart", "periodEnd", "resetsAt", "deliveredAt"}
    assert expected | {"attemptedAt", "nextAttemptAt", "revokedAt", "previousSecretExpiresAt"} <= seen, seen


async def _terminal(api: Api, auth: dict[str, str], prediction_id: str) -> bool:
    answer = await api.http.get(f"/api/v1/predictions/{prediction_id}", headers=auth)
    return bool(answer.json()["status"] == "completed")


@pytest.mark.parametrize(
    ("done_at", "written"),
    [(1736942430.0, "2025-01-15T12:00:30.000Z"), (1736942430.123, "2025-01-15T12:00:30.123Z")],
)
async def test_vendor_completed_at_comes_back_as_the_vendor_wrote_it(
    live_api: Api, worker: Any, sim: SimState, receiver_factory: Any, done_at: float, written: str
) -> None:
    receiver: Receiver = await receiver_factory()
    tenant = await live_api.tenant(webhookUrl=receiver.url)
    submitted = (await tenant.submit()).json()
    (vendor_prediction,) = sim.predictions.values()
    vendor_prediction.done_at = done_at  # the vendor finished at a moment it writes as `written`
    event = json.loads((await receiver.next()).body)
    assert event["data"]["completedAt"] == written
    fetched = (await tenant.get(f"/api/v1/predictions/{submitted['id']}")).json()
    assert fetched["completedAt"] == written
    async with live_api.runtime.sessions() as session:
        stored = await session.scalar(select(Prediction.completed_at).where(Prediction.id == submitted["id"]))
    assert stored == datetime.fromtimestamp(done_at, UTC).replace(microsecond=int(written[20:23]) * 1000)


# ---------------------------------------------------------------- 8. links from the public base URL


async def _predictions(api: Api) -> int:
    async with api.runtime.sessions() as session:
        return int(await session.scalar(select(func.count()).select_from(Prediction)) or 0)


async def test_status_url_from_the_public_base_url(api: Api) -> None:
    use_settings(api, public_base_url="https://vidgate.example.com/gw")
    tenant = await api.tenant()
    body = (await tenant.submit(Host="another.example")).json()
    assert body["statusUrl"] == f"https://vidgate.example.com/gw/api/v1/predictions/{body['id']}"


async def test_status_url_from_the_host_the_request_came_to(api: Api) -> None:
    tenant = await api.tenant()
    for host in ("api.example.com", "api.example.com:8443", "10.1.2.3:8000", "[2001:db8::1]:8000", "my_service"):
        answer = await api.http.post(
            "/api/v1/models/ltx-2-19b/generate",
            json=valid_body(),
            headers={
                **tenant.headers(),
                "Host": host,
                "X-Forwarded-Host": "evil.example",
                "X-Forwarded-Proto": "https",
            },
        )
        assert answer.status_code == 200, answer.text
        # The forwarded headers come from a peer that is not a trusted proxy: ignored.
        assert answer.json()["statusUrl"] == f"http://{host}/api/v1/predictions/{answer.json()['id']}"


async def test_forwarded_headers_only_from_trusted_proxies(api: Api) -> None:
    use_settings(api, trusted_proxies=[ip_network("127.0.0.0/8")])  # the test client's address
    tenant = await api.tenant()
    headers = {
        **tenant.headers(),
        "Host": "10.0.0.7:8000",
        "X-Forwarded-Host": "spoofed.example, vidgate.example.com",
        "X-Forwarded-Proto": "https",
    }
    body = (await api.http.post("/api/v1/models/ltx-2-19b/generate", json=valid_body(), headers=headers)).json()
    assert body["statusUrl"] == f"https://vidgate.example.com/api/v1/predictions/{body['id']}"
    use_settings(api, trusted_proxies=[ip_network("10.9.0.0/16")])
    body = (await api.http.post("/api/v1/models/ltx-2-19b/generate", json=valid_body(), headers=headers)).json()
    assert body["statusUrl"] == f"http://10.0.0.7:8000/api/v1/predictions/{body['id']}"


@pytest.mark.parametrize(
    "host",
    [
        "evil.example/steal?x=",
        "user@evil.example",
        "evil.example#frag",
        "a b",
        "evil.example:99999",
        "evil.example:80:81",
        "[::g]:80",
        "[evil.example]",
        "a..b",
        "..",
        'x"y',
        "x\\y",
        "exämple.com",
        "a" * 300,
    ],
)
async def test_a_bogus_host_is_refused_not_echoed(api: Api, host: str) -> None:
    tenant = await api.tenant()
    before = await _predictions(api)
    answer = await api.http.post(
        "/api/v1/models/ltx-2-19b/generate",
        json=valid_body(),
        headers={b"Authorization": f"Bearer {tenant.key}".encode(), b"Host": host.encode()},
    )
    assert answer.status_code == 400, answer.text
    assert answer.json()["code"] == "invalid_host" and answer.json()["field"] == "Host"
    assert await _predictions(api) == before  # refused before anything was held or sent


@pytest.mark.parametrize("value", ["ftp://x.example", "vidgate.example.com", "https://x.example/?q=1", "https://"])
def test_public_base_url_must_be_an_http_url(value: str) -> None:
    with pytest.raises(ValueError, match="public_base_url"):
        Settings(_env_file=None, public_base_url=value)


def test_trusted_proxies_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIDGATE_TRUSTED_PROXIES", "10.0.0.1, 192.168.0.0/16,::1")
    assert [str(n) for n in Settings(_env_file=None).trusted_proxies] == ["10.0.0.1/32", "192.168.0.0/16", "::1/128"]


# ---------------------------------------------------------------- 11. Retry-After, read and written once

NOW = datetime(2025, 1, 15, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        (" 7 ", 7.0),
        ("0", 0.0),
        (format_datetime(NOW + timedelta(seconds=90), usegmt=True), 90.0),
        ("Wed, 15 Jan 2025 11:00:00 GMT", 0.0),  # in the past: now
        ("99999999999999999999", 86400.0),  # capped: no overflow, no parking work for ages
        ("Fri, 31 Dec 9999 23:59:59 GMT", 86400.0),
        ("-5", None),
        ("1.5", None),  # delta-seconds are digits only
        ("nan", None),
        ("soon", None),
        ("", None),
        (None, None),
    ],
)
def test_retry_after_both_forms(value: str | None, seconds: float | None) -> None:
    assert parse_retry_after(value, NOW) == seconds


def test_retry_after_written_in_whole_seconds_rounded_up() -> None:
    assert [retry_after_value(s) for s in (0, 0.2, 1, 4.01, -3)] == ["0", "1", "1", "5", "0"]


@pytest.fixture
async def vendor_answering_503() -> AsyncIterator[tuple[str, list[datetime]]]:
    sent: list[datetime] = []  # the moments its Retry-After dates named

    async def handle(_request: web.Request) -> web.Response:
        # From the gateway's clock, so the test can move it; an HTTP-date has whole seconds only.
        later = (clock.now() + timedelta(seconds=120)).replace(microsecond=0)
        sent.append(later)
        return web.json_response(
            {"error": "busy"}, status=503, headers={"Retry-After": format_datetime(later, usegmt=True)}
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}", sent
    await runner.cleanup()


async def test_upstream_retry_after_as_an_http_date_is_honoured(
    vendor_answering_503: tuple[str, list[datetime]],
) -> None:
    url, sent = vendor_answering_503
    # Long before the wall clock: a date read against datetime.now() instead of the gateway's clock
    # would be long past (0 s).
    clock.shift_to(datetime(2025, 1, 15, 12, 0, 0, 500_000, tzinfo=UTC))
    async with aiohttp.ClientSession() as http:
        client = UpstreamClient(http, url, "vendor-key")
        before = clock.now()
        with pytest.raises(UpstreamUnavailable) as raised:
            await client.get_prediction("vd_1")
        after = clock.now()
    [later] = sent
    # The wait is the date less the moment the answer was read, which lies between before and after.
    waited = raised.value.retry_after_s
    assert waited is not None
    assert (later - after).total_seconds() <= waited <= (later - before).total_seconds()
