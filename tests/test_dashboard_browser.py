"""The dashboard in a real browser: Debian's Chromium driven by Playwright, against a real uvicorn server
on loopback with the worker running (poller and webhook dispatcher) and the upstream simulator.

Each page is saved as a screenshot (to docs/screenshots/, which the README shows, with VIDGATE_SCREENSHOTS=docs). Without /usr/bin/chromium these tests
skip, except in CI (CI=true), where they fail: `.ci/run` installs it.
"""

from __future__ import annotations

import asyncio
import os
import re
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from app.main import create_app
from app.runtime import Runtime
from tests.conftest import ADMIN_TOKEN, eventually, valid_body

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# Every run takes the screenshots; they replace the README's only when asked (VIDGATE_SCREENSHOTS=docs),
# so a test run leaves the work tree clean.
SCREENSHOTS = (
    Path(__file__).resolve().parents[1] / "docs" / "screenshots"
    if os.environ.get("VIDGATE_SCREENSHOTS") == "docs"
    else Path(tempfile.gettempdir()) / "vidgate-screenshots"
)

if not CHROMIUM.exists():
    if os.environ.get("CI") == "true":
        raise RuntimeError("CI needs Chromium for the dashboard's browser tests: apt-get install chromium")
    pytest.skip(
        "browser tests need Debian's Chromium at /usr/bin/chromium (apt-get install chromium)", allow_module_level=True
    )

from playwright.async_api import Browser, Page, async_playwright  # noqa: E402


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    # Webhook retries a fifth of a second apart, so a failing receiver's delivery is dead at once.
    return {"webhook_retry_schedule_s": [0, 0.2], "webhook_timeout_s": 2.0}


@pytest.fixture
async def gateway(live_runtime: Runtime, worker: Any) -> AsyncIterator[str]:
    """A real HTTP server on a loopback port, serving the app on the test's runtime."""
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(live_runtime.settings, live_runtime),
            host="127.0.0.1",
            port=0,
            log_level="warning",
            lifespan="off",
        )
    )
    task = asyncio.create_task(server.serve())
    await eventually(lambda: _true(server.started), what="the server to start")
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    await asyncio.wait_for(task, 15)


async def _true(value: bool) -> bool:
    return value


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        await browser.close()


async def shoot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


async def sign_in(page: Page, base: str) -> None:
    await page.goto(f"{base}/dashboard")
    assert "/dashboard/login" in page.url  # logged out: redirected
    await page.fill("input[name=token]", ADMIN_TOKEN)
    await page.click("text=Sign in")
    await page.wait_for_url(f"{base}/dashboard")


async def test_operator_walkthrough_in_chromium(
    gateway: str, browser: Browser, receiver_factory: Any, live_runtime: Runtime
) -> None:
    base = gateway
    receiver = await receiver_factory(default_status=500)  # every delivery fails until told otherwise
    context = await browser.new_context(viewport={"width": 1280, "height": 800})
    page = await context.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"{m.text} {m.location}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))

    await page.goto(f"{base}/dashboard")
    await page.wait_for_url(re.compile(r"/dashboard/login"))
    await shoot(page, "login")
    await sign_in(page, base)
    assert await page.evaluate("typeof htmx") == "object"  # the vendored script loaded under the CSP

    # Create a tenant with a budget and a webhook endpoint, from the overview's form.
    await page.fill("form.settings input[name=name]", "acme")
    await page.fill("form.settings input[name=budgetCents]", "500")
    await page.fill("form.settings input[name=webhookUrl]", receiver.url)
    await page.click("text=Create tenant")
    await page.wait_for_selector("#webhook-secret")
    tenant_id = (await page.text_content("h1 small") or "").strip()
    assert tenant_id.startswith("ten_")

    # A key, shown once.
    await page.click("text=Create key")
    await page.wait_for_selector("#new-key")
    key = (await page.text_content("#new-key") or "").strip()
    assert key.startswith("vg_")

    # The tenant calls the API with it; the prediction completes and its cost shows on the page.
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        submitted = await http.post(
            "/api/v1/models/ltx-2-19b/generate",
            json=valid_body(),
            headers={"Authorization": f"Bearer {key}", "Prefer": "wait=20"},
        )
        assert submitted.status_code == 200, submitted.text
        assert submitted.json()["status"] == "completed"
        cost = submitted.json()["costCents"]
        await page.goto(f"{base}/dashboard/tenants/{tenant_id}")
        assert (await page.text_content("#spent")) == f"${cost / 100:,.2f}"
        await shoot(page, "tenant")

        # The completed event's delivery fails until it is dead; the operator redelivers it.
        async def dead() -> bool:
            answer = await http.get(
                "/admin/v1/webhook-deliveries",
                params={"status": "dead", "tenant": tenant_id},
                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            )
            return len(answer.json()["data"]) == 1

        await eventually(dead, what="the delivery to be dead")
        await page.click("text=Webhook deliveries")
        await page.wait_for_url(f"{base}/dashboard/deliveries")
        await page.select_option("select[name=status]", "dead")
        await page.click("text=Filter")
        await page.wait_for_selector("text=Redeliver")
        await shoot(page, "deliveries")
        receiver.default_status = 204
        await page.click("text=Redeliver")
        await page.wait_for_selector("text=queued again")
        delivered = await receiver.next()
        assert '"type":"prediction.completed"' in delivered.body

        # Overview and predictions pages.
        await page.click("text=Overview")
        await page.wait_for_url(f"{base}/dashboard")
        row = page.locator("table.tenants tr", has_text="acme")
        assert f"${cost / 100:,.2f}" in (await row.text_content() or "")
        await shoot(page, "overview")
        await page.click("text=Predictions")
        await page.wait_for_url(f"{base}/dashboard/predictions")
        assert await page.locator("tr.status-completed").count() == 1
        await shoot(page, "predictions")

        # Revoke the key: the next API call is refused.
        await page.goto(f"{base}/dashboard/tenants/{tenant_id}")
        await page.click("button:has-text('Revoke')")
        await page.wait_for_selector("text=revoked")
        refused = await http.get("/api/v1/usage", headers={"Authorization": f"Bearer {key}"})
        assert refused.status_code == 401

    # A form posted without its CSRF token, with the browser's session cookie: 403.
    forged = await context.request.post(f"{base}/dashboard/tenants/{tenant_id}/keys", form={"name": "x"})
    assert forged.status == 403
    # Logged out: every page redirects to the login.
    await page.click("text=Log out")
    await page.wait_for_url(re.compile(r"/dashboard/login$"))
    await page.goto(f"{base}/dashboard/tenants/{tenant_id}")
    assert "/dashboard/login" in page.url
    assert problems == []  # no CSP violation or script error on any page
    await context.close()


async def test_pages_work_without_javascript(gateway: str, browser: Browser) -> None:
    context = await browser.new_context(java_script_enabled=False)
    page = await context.new_page()
    await sign_in(page, gateway)
    for name in ("beta", "alpha"):
        await page.fill("form.settings input[name=name]", name)
        await page.click("text=Create tenant")
        await page.wait_for_selector("#webhook-secret")
        await page.goto(f"{gateway}/dashboard")
    names = page.locator("table.tenants tbody td:first-child a")
    await page.click("a:has-text('Tenant')")  # sort by name, descending first
    assert await names.all_text_contents() == ["beta", "alpha"]
    await page.click("a:has-text('Tenant')")
    assert await names.all_text_contents() == ["alpha", "beta"]
    await page.fill("input[name=q]", "alp")
    await page.click("button:has-text('Search')")
    assert await page.locator("table.tenants tbody tr").count() == 1
    await context.close()


async def _operator_token(base: str, name: str, role: str) -> str:
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as http:
        made = await http.post("/admin/v1/operator-tokens", json={"name": name, "role": role})
        assert made.status_code == 201, made.text
        return str(made.json()["token"])


async def test_a_viewers_pages_have_no_forms_that_change_anything(gateway: str, browser: Browser) -> None:
    base = gateway
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as http:
        tenant = (await http.post("/admin/v1/tenants", json={"name": "watched"})).json()
        await http.post(f"/admin/v1/tenants/{tenant['id']}/keys", json={})
    token = await _operator_token(base, "viewer-eve", "viewer")
    context = await browser.new_context(viewport={"width": 1280, "height": 800})
    page = await context.new_page()
    await page.goto(f"{base}/dashboard/login")
    await page.fill("input[name=token]", token)
    await page.click("text=Sign in")
    await page.wait_for_url(f"{base}/dashboard")
    for path in (
        "/dashboard",
        f"/dashboard/tenants/{tenant['id']}",
        "/dashboard/predictions",
        "/dashboard/deliveries",
        "/dashboard/audit",
    ):
        await page.goto(base + path)
        forms = await page.eval_on_selector_all(
            "form", "els => els.map(f => [f.getAttribute('method') || 'get', f.getAttribute('action')])"
        )
        # Filters read (GET) and the session ends (log out); nothing else is a form.
        changing = [f for f in forms if f[0].lower() != "get" and f[1] != "/dashboard/logout"]
        assert changing == [], (path, forms)
        assert await page.locator("button:has-text('Revoke'), button:has-text('Create')").count() == 0
        assert "operator:viewer-eve (viewer)" in await page.inner_text("header")
    await shoot(page, "viewer-tenant")
    await context.close()


async def test_the_audit_page_filters(gateway: str, browser: Browser) -> None:
    base = gateway
    alice = await _operator_token(base, "alice", "admin")
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {alice}"}) as http:
        first = (await http.post("/admin/v1/tenants", json={"name": "one"})).json()
        second = (await http.post("/admin/v1/tenants", json={"name": "two"})).json()
        await http.patch(f"/admin/v1/tenants/{second['id']}", json={"budgetCents": 300})
    context = await browser.new_context(viewport={"width": 1280, "height": 800})
    page = await context.new_page()
    await sign_in(page, base)
    await page.click("text=Audit log")
    await page.wait_for_url(f"{base}/dashboard/audit")
    rows = page.locator("table.audit tbody tr[data-action]")
    assert await rows.count() == 4  # the operator token, two tenants, one update

    await page.fill("input[name=actor]", "operator:alice")
    await page.fill("input[name=action]", "tenant.create")
    await page.click("form.filters button[type=submit]")
    await page.wait_for_url(re.compile(r"actor=operator%3Aalice"))
    await eventually(lambda: _count_is(rows, 2), what="the filtered audit rows")
    texts = await rows.all_inner_texts()
    assert all("tenant.create" in t and "operator:alice" in t for t in texts)
    assert all(any(f"tenant:{t['id']}" in text for text in texts) for t in (first, second))

    await page.fill("input[name=action]", "")
    await page.fill("input[name=target]", f"tenant:{second['id']}")
    await page.click("form.filters button[type=submit]")
    await page.wait_for_url(re.compile(r"target=tenant%3A"))
    await eventually(
        lambda: _count_is(page.locator('table.audit tbody tr[data-action="tenant.update"]'), 1),
        what="the rows of one target",
    )
    assert sorted(await rows.evaluate_all("els => els.map(e => e.dataset.action)")) == [
        "tenant.create",
        "tenant.update",
    ]
    await shoot(page, "audit")
    await context.close()


async def _count_is(locator: Any, n: int) -> bool:
    return bool(await locator.count() == n)
