"""The dashboard's Providers page over plain HTTP: state, figures, disable/enable with CSRF (the browser
test drives it in Chromium, tests/test_dashboard_browser.py)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from app.core import metrics
from app.core.database import transaction
from app.providers import stats
from app.providers.models import ProviderState
from app.runtime import Runtime
from tests.conftest import Api
from tests.test_dashboard import csrf_of, login
from tests.test_providers_admin import KEYS, providers_toml


@pytest.fixture
def settings_overrides(tmp_path: Path, sim_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    for name, value in KEYS.items():
        monkeypatch.setenv(name, value)
    path = tmp_path / "providers.toml"
    path.write_text(providers_toml(sim_url))
    yield {"providers_file": path}


def row(page: str, name: str) -> str:
    match = re.search(rf'<tr id="provider-{name}"[^>]*>(.*?)</tr>', page, re.S)
    assert match, page[:2000]
    return match.group(0)


async def test_logged_out_it_redirects(api: Api) -> None:
    answer = await api.http.get("/dashboard/providers")
    assert answer.status_code == 303 and answer.headers["location"].startswith("/dashboard/login")
    posted = await api.http.post("/dashboard/providers/fal/disable", data={"csrf": "x"})
    assert posted.status_code == 303


async def test_page_shows_state_figures_and_switches(api: Api, runtime: Runtime) -> None:
    metrics.take_tallies()
    metrics.observe_upstream("wavespeed", "submit", "200", 0.120)
    metrics.observe_upstream("wavespeed", "submit", "429", 0.010)
    metrics.observe_upstream("wavespeed", "submit", "502", 0.020)
    await stats.flush(runtime.sessions)
    csrf = await login(api)
    page = await api.http.get("/dashboard/providers")
    assert page.status_code == 200
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert "<script>" not in page.text and " style=" not in page.text
    assert 'href="/dashboard/providers"' in page.text  # in the navigation
    assert "routing: cheapest" in page.text
    ws = row(page.text, "wavespeed")
    cells = [re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r'<td class="num[^"]*">(.*?)</td>', ws, re.S)]
    # in flight / cap, submits, 429s, errors, mean submit, spent today
    assert cells[:6] == ["0 / ∞", "3", "1", "1", "50 ms", "$0.00"]
    assert "0 / 200" in row(page.text, "vibedream")
    assert 'action="/dashboard/providers/wavespeed/disable"' in ws

    # Without the CSRF token: 403, nothing changes.
    forged = await api.http.post("/dashboard/providers/wavespeed/disable", data={})
    assert forged.status_code == 403
    async with transaction(runtime.sessions, readonly=True) as session:
        assert not await session.scalar(select(ProviderState.disabled).where(ProviderState.name == "wavespeed"))

    done = await api.http.post("/dashboard/providers/wavespeed/disable", data={"csrf": csrf})
    assert done.status_code == 200
    assert "Provider wavespeed disabled" in done.text
    ws = row(done.text, "wavespeed")
    assert "provider-disabled" in ws and ">disabled<" in ws
    assert 'action="/dashboard/providers/wavespeed/enable"' in ws
    async with transaction(runtime.sessions, readonly=True) as session:
        assert await session.scalar(select(ProviderState.disabled).where(ProviderState.name == "wavespeed"))

    back = await api.http.post("/dashboard/providers/wavespeed/enable", data={"csrf": csrf_of(done)})
    assert back.status_code == 200 and "provider-ok" in row(back.text, "wavespeed")


async def test_unknown_provider_shows_the_problem(api: Api) -> None:
    csrf = await login(api)
    answer = await api.http.post("/dashboard/providers/nope/disable", data={"csrf": csrf})
    assert answer.status_code == 404
    assert "provider_not_found" in answer.text and "There is no provider" in answer.text
    assert 'id="provider-vibedream"' in answer.text  # the page itself, with the problem on it
