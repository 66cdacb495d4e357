"""The Providers page in Chromium (as tests/test_dashboard_browser.py drives the other pages): with HTMX
and without JavaScript, under the strict CSP, disabling and enabling a provider through its form."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from app.core.database import transaction
from app.providers.models import ProviderState
from app.runtime import Runtime
from tests.test_dashboard_browser import CHROMIUM, gateway, shoot, sign_in
from tests.test_providers_admin import KEYS, providers_toml

if not CHROMIUM.exists():  # test_dashboard_browser skipped (or, in CI, failed) already
    pytest.skip("browser tests need /usr/bin/chromium", allow_module_level=True)

from playwright.async_api import Browser

from tests.test_dashboard_browser import browser

__all__ = ["browser", "gateway"]  # fixtures used below


@pytest.fixture
def settings_overrides(tmp_path: Path, sim_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    for name, value in KEYS.items():
        monkeypatch.setenv(name, value)
    path = tmp_path / "providers.toml"
    path.write_text(providers_toml(sim_url))
    yield {"providers_file": path, "webhook_retry_schedule_s": [0, 0.2], "webhook_timeout_s": 2.0}


async def disabled(runtime: Runtime, name: str) -> bool:
    async with transaction(runtime.sessions, readonly=True) as session:
        return bool(await session.scalar(select(ProviderState.disabled).where(ProviderState.name == name)))


@pytest.mark.parametrize("javascript", [True, False], ids=["htmx", "no-js"])
async def test_providers_page_disables_and_enables(
    gateway: str, browser: Browser, live_runtime: Runtime, javascript: bool
) -> None:
    context = await browser.new_context(viewport={"width": 1280, "height": 800}, java_script_enabled=javascript)
    page = await context.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"{m.text} {m.location}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    await sign_in(page, gateway)
    await page.click("nav >> text=Providers")
    await page.wait_for_url(f"{gateway}/dashboard/providers")
    assert await page.locator("table.providers tbody tr").count() == 3
    row = page.locator("#provider-wavespeed")
    assert "enabled" in (await row.locator("td.state").text_content() or "")
    if javascript:
        await shoot(page, "providers")

    await row.locator("button:has-text('Disable')").click()
    await page.wait_for_selector("text=Provider wavespeed disabled")
    assert "disabled" in (await page.locator("#provider-wavespeed td.state").text_content() or "")
    assert await disabled(live_runtime, "wavespeed")
    assert await page.locator("#provider-vibedream button:has-text('Disable')").count() == 1  # the others untouched

    await page.locator("#provider-wavespeed button:has-text('Enable')").click()
    await page.wait_for_selector("text=Provider wavespeed enabled")
    assert not await disabled(live_runtime, "wavespeed")
    assert problems == []  # no CSP violation or script error
    await context.close()
