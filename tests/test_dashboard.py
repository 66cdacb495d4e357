"""The operator dashboard over plain HTTP: session cookie, CSP, CSRF, auth, actions and the rollup.

The browser tests (tests/test_dashboard_browser.py) drive the same pages in Chromium.
"""

from __future__ import annotations

import ipaddress
import os
import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from alembic import command
from sqlalchemy import func, insert, select, update

from app.budgets.models import DailyUsage, LedgerEntry
from app.core import clock
from app.core.database import create_engine, table_of, transaction
from app.core.migrate import alembic_config
from app.dashboard import service as dashboard_service
from app.dashboard import session as sessions
from app.dashboard.router import _key
from app.tenants.models import Tenant as TenantModel
from tests.conftest import ADMIN_TOKEN, TEST_DB, Api, _drop_postgres, _fresh_postgres

CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def csrf_of(page: httpx.Response) -> str:
    match = CSRF.search(page.text)
    assert match, page.text[:500]
    return match.group(1)


async def login(api: Api) -> str:
    """Sign in through the login form; returns the session's CSRF token."""
    page = await api.http.get("/dashboard/login")
    done = await api.http.post("/dashboard/login", data={"csrf": csrf_of(page), "token": ADMIN_TOKEN})
    assert done.status_code == 303, done.text
    overview = await api.http.get("/dashboard")
    assert overview.status_code == 200
    return csrf_of(overview)


def set_cookie_header(response: httpx.Response) -> str:
    return next(v for k, v in response.headers.multi_items() if k.lower() == "set-cookie")


async def test_logged_out_pages_redirect_to_login(api: Api) -> None:
    for path in ("/dashboard", "/dashboard/predictions", "/dashboard/deliveries", "/dashboard/tenants/ten_x"):
        answer = await api.http.get(path)
        assert answer.status_code == 303, path
        assert answer.headers["location"].startswith("/dashboard/login?next=")
    # HTMX asks for a full page load instead of swapping the login page into a section.
    answer = await api.http.get("/dashboard", headers={"HX-Request": "true"})
    assert answer.headers["HX-Redirect"] == "/dashboard/login?next=%2Fdashboard"


async def test_session_cookie_flags_and_security_headers(api: Api) -> None:
    page = await api.http.get("/dashboard/login")
    assert page.status_code == 200
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert "<script>" not in page.text and " style=" not in page.text  # nothing inline for the CSP to block
    cookie = set_cookie_header(page).lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/dashboard" in cookie
    done = await api.http.post("/dashboard/login", data={"csrf": csrf_of(page), "token": ADMIN_TOKEN})
    cookie = set_cookie_header(done).lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "max-age=28800" in cookie
    assert done.headers["content-security-policy"] == csp
    overview = await api.http.get("/dashboard")
    assert overview.headers["content-security-policy"] == csp
    assert overview.headers["x-frame-options"] == "DENY"


async def test_login_needs_the_admin_token_and_the_form_token(api: Api) -> None:
    page = await api.http.get("/dashboard/login")
    wrong = await api.http.post("/dashboard/login", data={"csrf": csrf_of(page), "token": "nope"})
    assert wrong.status_code == 401
    assert "That is not the operator token" in wrong.text
    assert (await api.http.get("/dashboard")).status_code == 303
    no_csrf = await api.http.post("/dashboard/login", data={"token": ADMIN_TOKEN})
    assert no_csrf.status_code == 403
    assert "csrf_token_invalid" in no_csrf.text
    assert (await api.http.get("/dashboard")).status_code == 303


async def test_forms_without_the_csrf_token_are_refused(api: Api) -> None:
    csrf = await login(api)
    tenant = await api.tenant(name="csrf-co")
    for path in (
        "/dashboard/tenants",
        f"/dashboard/tenants/{tenant.id}/keys",
        f"/dashboard/tenants/{tenant.id}/settings",
        f"/dashboard/tenants/{tenant.id}/webhook-secret/rotate",
        "/dashboard/deliveries/msg_x/redeliver",
        "/dashboard/logout",
    ):
        for data in ({"name": "x"}, {"name": "x", "csrf": csrf + "x"}):
            answer = await api.http.post(path, data=data)
            assert answer.status_code == 403, path
            assert "no valid CSRF token" in answer.text
    keys = await api.admin("GET", f"/admin/v1/tenants/{tenant.id}/keys")
    assert len(keys.json()["data"]) == 1  # nothing was created
    created = await api.http.post(f"/dashboard/tenants/{tenant.id}/keys", data={"csrf": csrf, "name": "ci"})
    assert created.status_code == 200
    assert re.search(r'id="new-key">vg_', created.text)


async def test_tampered_or_expired_session_is_logged_out(api: Api) -> None:
    await login(api)
    key = _key(api.runtime)
    assert key is not None
    value = api.http.cookies.get(sessions.COOKIE)
    assert value is not None
    sid = sessions.decode(key, value).sid  # type: ignore[union-attr]
    payload, signature = value.split(".")
    api.http.cookies.set(sessions.COOKIE, payload + "." + signature[:-2] + "AA", path="/dashboard")
    assert (await api.http.get("/dashboard")).status_code == 303
    expired = sessions.Session(authenticated=True, csrf="c", expires_at=time.time() - 1, sid=sid)
    api.http.cookies.set(sessions.COOKIE, sessions.encode(key, expired), path="/dashboard")
    assert (await api.http.get("/dashboard")).status_code == 303
    fresh = sessions.Session(authenticated=True, csrf="c", expires_at=time.time() + 60, sid=sid)
    api.http.cookies.set(sessions.COOKIE, sessions.encode(key, fresh), path="/dashboard")
    assert (await api.http.get("/dashboard")).status_code == 200
    # Signed, but naming no session the server began (or one it ended): logged out.
    for other_sid in ("", "made-up"):
        made_up = sessions.Session(authenticated=True, csrf="c", expires_at=time.time() + 60, sid=other_sid)
        api.http.cookies.set(sessions.COOKIE, sessions.encode(key, made_up), path="/dashboard")
        assert (await api.http.get("/dashboard")).status_code == 303
    # A key made from another admin token signs nothing this gateway accepts.
    other = sessions.signing_key(api.runtime.settings, "another-token")
    assert other is not None
    api.http.cookies.set(sessions.COOKIE, sessions.encode(other, fresh), path="/dashboard")
    assert (await api.http.get("/dashboard")).status_code == 303


async def test_logout_ends_the_session(api: Api) -> None:
    csrf = await login(api)
    tenant = await api.tenant(name="after-logout")
    kept = api.http.cookies.get(sessions.COOKIE)  # a copy of the cookie, kept past logout (or stolen)
    assert kept is not None
    out = await api.http.post("/dashboard/logout", data={"csrf": csrf})
    assert out.status_code == 303 and out.headers["location"] == "/dashboard/login"
    assert (await api.http.get("/dashboard")).status_code == 303

    # Ended on the server: the old cookie opens no page and mints no key (issue 24 B2).
    api.http.cookies.set(sessions.COOKIE, kept, path="/dashboard")
    assert (await api.http.get("/dashboard")).status_code == 303
    assert (await api.http.get(f"/dashboard/tenants/{tenant.id}")).status_code == 303
    minted = await api.http.post(f"/dashboard/tenants/{tenant.id}/keys", data={"csrf": csrf, "name": "x"})
    assert minted.status_code == 303 and "vg_" not in minted.text
    keys = await api.admin("GET", f"/admin/v1/tenants/{tenant.id}/keys")
    assert len(keys.json()["data"]) == 1  # only the one api.tenant made
    # Logging in again starts a new session; the old cookie stays dead.
    api.http.cookies.clear()
    await login(api)
    assert api.http.cookies.get(sessions.COOKIE) != kept
    api.http.cookies.set(sessions.COOKIE, kept, path="/dashboard")
    assert (await api.http.get("/dashboard")).status_code == 303


@pytest.mark.parametrize(
    ("peer", "proto", "secure"),
    [
        ("10.9.0.1", "https", True),  # a trusted proxy that terminated TLS
        ("10.9.0.1", "http", False),
        ("127.0.0.1", "https", False),  # anyone else may say what they like
    ],
)
async def test_the_cookie_is_secure_behind_a_trusted_tls_proxy(api: Api, peer: str, proto: str, secure: bool) -> None:
    api.runtime.settings = api.runtime.settings.model_copy(
        update={"trusted_proxies": [ipaddress.ip_network("10.9.0.0/24")]}
    )
    transport: Any = api.http._transport
    transport.client = (peer, 4242)
    headers = {"X-Forwarded-Proto": proto}
    page = await api.http.get("/dashboard/login", headers=headers)
    assert ("; secure" in set_cookie_header(page).lower()) is secure
    # httpx keeps a Secure cookie from a plain-http base URL: hand it over as the browser behind TLS would.
    cookie = set_cookie_header(page).split(";")[0]
    api.http.cookies.clear()
    login_headers = {**headers, "Cookie": cookie}
    done = await api.http.post(
        "/dashboard/login", data={"csrf": csrf_of(page), "token": ADMIN_TOKEN}, headers=login_headers
    )
    assert done.status_code == 303
    assert ("; secure" in set_cookie_header(done).lower()) is secure


async def test_settings_form_validates_as_the_api_does(api: Api) -> None:
    csrf = await login(api)
    tenant = await api.tenant(name="forms-co", budgetCents=500)
    for field, value in (
        ("budgetCents", "-1"),
        ("maxConcurrent", "0"),
        ("budgetCents", "12x"),
        ("budgetCents", "4294967296"),
    ):
        via_api = await api.admin(
            "PATCH",
            f"/admin/v1/tenants/{tenant.id}",
            json={field: int(value) if value.lstrip("-").isdigit() else value},
        )
        assert via_api.status_code == 422
        form = {"csrf": csrf, "name": "forms-co", "budgetPeriod": "month", field: value}
        page = await api.http.post(f"/dashboard/tenants/{tenant.id}/settings", data=form)
        assert page.status_code == 422
        assert _escaped(via_api.json()["detail"]) in page.text
    forbidden = await api.admin(
        "PATCH", f"/admin/v1/tenants/{tenant.id}", json={"webhookUrl": "http://169.254.169.254/x"}
    )
    api.runtime.settings.webhook_allow_private = False
    try:
        forbidden = await api.admin(
            "PATCH", f"/admin/v1/tenants/{tenant.id}", json={"webhookUrl": "http://169.254.169.254/x"}
        )
        page = await api.http.post(
            f"/dashboard/tenants/{tenant.id}/settings",
            data={"csrf": csrf, "name": "forms-co", "webhookUrl": "http://169.254.169.254/x"},
        )
    finally:
        api.runtime.settings.webhook_allow_private = True
    assert forbidden.status_code == page.status_code == 422
    assert _escaped(forbidden.json()["detail"]) in page.text
    saved = await api.http.post(
        f"/dashboard/tenants/{tenant.id}/settings",
        data={"csrf": csrf, "name": "forms-co", "budgetCents": "900", "budgetPeriod": "week", "maxConcurrent": ""},
    )
    assert saved.status_code == 200 and "Settings saved." in saved.text
    got = (await api.admin("GET", f"/admin/v1/tenants/{tenant.id}")).json()
    assert (got["budgetCents"], got["budgetPeriod"], got["maxConcurrent"]) == (900, "week", None)


def _escaped(text: str) -> str:
    return (
        text.replace("&", "&amp;").replace("'", "&#39;").replace('"', "&#34;").replace("<", "&lt;").replace(">", "&gt;")
    )


async def test_create_tenant_key_and_rotate_through_the_pages(api: Api) -> None:
    csrf = await login(api)
    page = await api.http.post("/dashboard/tenants", data={"csrf": csrf, "name": "page-co", "budgetCents": "300"})
    assert page.status_code == 200, page.text
    tenant_id = re.search(r"<small>(ten_[0-9a-f]+)</small>", page.text).group(1)  # type: ignore[union-attr]
    secret = re.search(r'id="webhook-secret">(whsec_[^<]+)<', page.text).group(1)  # type: ignore[union-attr]
    rotated = await api.http.post(f"/dashboard/tenants/{tenant_id}/webhook-secret/rotate", data={"csrf": csrf})
    new_secret = re.search(r'id="webhook-secret">(whsec_[^<]+)<', rotated.text).group(1)  # type: ignore[union-attr]
    assert new_secret != secret
    key_page = await api.http.post(f"/dashboard/tenants/{tenant_id}/keys", data={"csrf": csrf})
    raw = re.search(r'id="new-key">(vg_[^<]+)<', key_page.text).group(1)  # type: ignore[union-attr]
    usage = await api.http.get("/api/v1/usage", headers={"Authorization": f"Bearer {raw}"})
    assert usage.status_code == 200 and usage.json()["budgetCents"] == 300
    # The key is shown once: the tenant page never shows it again.
    again = await api.http.get(f"/dashboard/tenants/{tenant_id}")
    assert raw not in again.text and new_secret not in again.text
    key_id = (await api.admin("GET", f"/admin/v1/tenants/{tenant_id}/keys")).json()["data"][0]["id"]
    revoked = await api.http.post(f"/dashboard/tenants/{tenant_id}/keys/{key_id}/revoke", data={"csrf": csrf})
    assert "revoked" in revoked.text
    refused = await api.http.get("/api/v1/usage", headers={"Authorization": f"Bearer {raw}"})
    assert refused.status_code == 401
    missing = await api.http.get("/dashboard/tenants/ten_nope")
    assert missing.status_code == 404 and "There is no tenant" in missing.text
    bad = await api.http.post("/dashboard/tenants", data={"csrf": csrf, "name": ""})
    assert bad.status_code == 422 and "name: String should have at least 1 character" in bad.text


async def _rollup(api: Api, tenant_id: str) -> list[Any]:
    async with transaction(api.runtime.sessions, readonly=True) as session:
        return list(await session.scalars(select(DailyUsage).where(DailyUsage.tenant_id == tenant_id)))


async def test_rollup_follows_the_ledger_and_counts_refusals(api: Api) -> None:
    clock.shift_to(datetime(2026, 6, 10, 12, tzinfo=UTC))  # mid-month: tomorrow is still this budget period
    await login(api)
    tenant = await api.tenant(name="rollup-co", budgetCents=20)
    assert (await tenant.submit()).status_code == 200
    assert (await tenant.submit()).status_code == 200
    refused = await tenant.submit()
    assert refused.status_code == 402
    (today,) = await _rollup(api, tenant.id)
    async with transaction(api.runtime.sessions, readonly=True) as session:
        ledger_spent = await session.scalar(
            select(func.sum(LedgerEntry.spent_delta)).where(LedgerEntry.tenant_id == tenant.id)
        )
    assert (today.spent_cents, today.predictions, today.refusals) == (ledger_spent, 2, 1) == (18, 2, 1)
    page = await api.http.get(f"/dashboard/tenants/{tenant.id}")
    assert '<dd id="spent">$0.18</dd>' in page.text
    assert "$0.18, 2 predictions, 1 refused" in page.text
    overview = await api.http.get("/dashboard", params={"q": "rollup"})
    assert "rollup-co" in overview.text
    assert re.search(r"<dt>Refusals today</dt><dd>1</dd>", overview.text)
    # A charge on another day lands on that day's row.
    clock.shift_to(clock.now() + timedelta(days=1))
    assert (await tenant.submit()).status_code == 402  # the month's budget still binds
    rows = await _rollup(api, tenant.id)
    assert sorted((r.spent_cents, r.refusals) for r in rows) == [(0, 1), (18, 1)]


async def test_lists_filter_and_page(api: Api, sim: Any) -> None:
    await login(api)
    tenant = await api.tenant(name="list-co")
    other = await api.tenant(name="other-co")
    for _ in range(3):
        assert (await tenant.submit()).status_code == 200
    assert (await other.submit()).status_code == 200
    page = await api.http.get("/dashboard/predictions", params={"tenant": tenant.id})
    assert page.status_code == 200
    assert page.text.count('<tr class="status-processing">') == 3
    assert "other-co" not in page.text
    by_status = await api.http.get("/dashboard/predictions", params={"status": "processing"})
    assert by_status.text.count('<tr class="status-processing">') == 4
    future = await api.http.get("/dashboard/predictions", params={"from": "2999-01-01"})
    assert "No predictions match." in future.text
    bad = await api.http.get("/dashboard/predictions", params={"from": "yesterday"})
    assert bad.status_code == 422 and "from must be a date" in bad.text
    bad = await api.http.get("/dashboard/deliveries", params={"status": "lost"})
    assert bad.status_code == 422 and bad.headers["content-type"].startswith("text/html")
    assert "status: String should match pattern" in bad.text
    deliveries = await api.http.get("/dashboard/deliveries", params={"status": "dead"})
    assert deliveries.status_code == 200 and "No deliveries match." in deliveries.text
    csv = await api.http.get("/dashboard/usage.csv", params={"groupBy": "tenant"})
    assert csv.status_code == 200 and csv.headers["content-type"].startswith("text/csv")
    assert csv.text.splitlines()[0] == "tenant,spentCents,predictions,storedBytes"
    assert f"{tenant.id},27,3" in csv.text


@pytest.mark.parametrize("path", ["/dashboard/static/htmx-2.0.11.min.js", "/dashboard/static/dashboard.css"])
async def test_static_files_are_served_from_the_package(api: Api, path: str) -> None:
    answer = await api.http.get(path)
    assert answer.status_code == 200 and len(answer.content) > 1000
    assert "immutable" in answer.headers["cache-control"]
    assert answer.headers["content-security-policy"].startswith("default-src 'self'")
    assert (await api.http.get("/dashboard/static/..%2Fsession.py")).status_code == 404
    # The ETag it serves is honoured, and so is `*` (issue 24 B8).
    for tag in (answer.headers["etag"], "*", f'"other", {answer.headers["etag"]}'):
        again = await api.http.get(path, headers={"If-None-Match": tag})
        assert again.status_code == 304 and again.content == b"", tag
        assert again.headers["etag"] == answer.headers["etag"]
    assert (await api.http.get(path, headers={"If-None-Match": '"other"'})).status_code == 200


async def test_ledger_verify_checks_the_rollup(api: Api) -> None:
    tenant = await api.tenant(name="verify-co")
    assert (await tenant.submit()).status_code == 200
    assert (await api.admin("GET", "/admin/v1/ledger/verify")).json() == {"ok": True, "mismatches": []}
    async with transaction(api.runtime.sessions) as session:
        await session.execute(
            update(DailyUsage).where(DailyUsage.tenant_id == tenant.id).values(spent_cents=DailyUsage.spent_cents + 1)
        )
    report = (await api.admin("GET", "/admin/v1/ledger/verify")).json()
    assert not report["ok"]
    assert [(m["scope"], m["counter_spent"], m["ledger_spent"]) for m in report["mismatches"]] == [
        (f"day:{tenant.id}", 10, 9)
    ]


async def test_migration_sums_the_existing_ledger_into_the_rollup(tmp_path: Path) -> None:
    """Upgrading a database that already has a ledger fills daily_usage from it."""
    if TEST_DB == "postgresql":
        name = f"vidgate_test_backfill_{os.getpid()}"
        url = await _fresh_postgres(name)
    else:
        url = f"sqlite+aiosqlite:///{tmp_path / 'backfill.db'}"
    engine = create_engine(url, pool_size=2)
    try:

        def upgrade(connection: Any, revision: str) -> None:
            config = alembic_config()
            config.attributes["connection"] = connection
            command.upgrade(config, revision)

        async with engine.begin() as connection:
            await connection.run_sync(upgrade, "0001")
        day1 = datetime(2026, 11, 1, 23, 59, tzinfo=UTC)
        day2 = datetime(2026, 11, 2, 0, 1, tzinfo=UTC)
        async with engine.begin() as connection:
            await connection.execute(
                insert(table_of(TenantModel)),
                [dict(id="ten_a", name="a", budget_period="month", in_flight=0, webhook_secret="s", created_at=day1)],
            )
            entry = dict(tenant_id="ten_a", period_start=day1, reserved_delta=0, note=None, model_id="m")
            await connection.execute(
                insert(table_of(LedgerEntry)),
                [
                    {**entry, "kind": "reserve", "spent_delta": 0, "reserved_delta": 9, "created_at": day1},
                    {**entry, "kind": "settle", "spent_delta": 9, "created_at": day1},
                    {**entry, "kind": "settle", "spent_delta": 7, "created_at": day2},
                    {**entry, "kind": "refund", "spent_delta": -7, "created_at": day2},
                ],
            )
        # Outside a transaction, as `vidgate migrate` runs: on SQLite batch mode rebuilds referenced tables.
        async with engine.connect() as connection:
            await connection.run_sync(upgrade, "head")
            await connection.commit()
        async with engine.connect() as connection:
            rows = (
                await connection.execute(select(DailyUsage.day, DailyUsage.spent_cents, DailyUsage.predictions))
            ).all()
        assert sorted(tuple(r) for r in rows) == [(day1.date(), 9, 1), (day2.date(), 0, 1)]
    finally:
        await engine.dispose()
        if TEST_DB == "postgresql":
            await _drop_postgres(name)


PREDICTION_ID = re.compile(r"<code>(pred_[0-9a-f]+)</code>")


async def _all_pages(api: Api, params: dict[str, str]) -> list[list[str]]:
    pages: list[list[str]] = []
    path: str | None = "/dashboard/predictions?" + urlencode(params)
    while path is not None:
        page = await api.http.get(path.replace("&amp;", "&"))
        assert page.status_code == 200
        pages.append(PREDICTION_ID.findall(page.text))
        older = re.search(r'href="(/dashboard/predictions\?[^"]*cursor=[^"]+)"', page.text)
        path = older.group(1) if older else None
        assert len(pages) < 10
    return pages


async def test_prediction_pages_follow_each_index(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    await login(api)
    tenant = await api.tenant(name="pages-co")
    other = await api.tenant(name="pages-other")
    mine = [(await tenant.submit()).json()["id"] for _ in range(5)]
    theirs = (await other.submit()).json()["id"]
    monkeypatch.setattr(dashboard_service, "PAGE_SIZE", 2)
    newest_first = mine[::-1]
    # (tenant_id, id), (status, created_at) and the primary key: each pages through all, newest first.
    assert await _all_pages(api, {"tenant": tenant.id}) == [newest_first[:2], newest_first[2:4], newest_first[4:]]
    by_status = await _all_pages(api, {"status": "processing"})
    assert [p for page in by_status for p in page] == [theirs, *newest_first]
    assert [len(page) for page in by_status] == [2, 2, 2]
    everything = await _all_pages(api, {})
    assert [p for page in everything for p in page] == [theirs, *newest_first]
