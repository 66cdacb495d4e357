"""What operators see of real traffic across providers: the `provider` label on metrics, the daily call
tallies, live state after a failover, and the usage report by provider, from submits that went through
the simulator (the first provider refuses connections; the second serves)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.core import metrics
from app.providers import stats
from app.runtime import Runtime
from bench.ports import free_port
from tests.conftest import Api
from tests.test_metrics import scrape, total


@pytest.fixture
def settings_overrides(tmp_path: Path, sim_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    monkeypatch.setenv("VIS_KEY", "vis-secret")
    refused = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    path = tmp_path / "providers.toml"
    path.write_text(
        f"""
routing = "priority"

[[providers]]
name = "down"
kind = "vibedream"
base_url = "{refused}"
api_key_env = "VIS_KEY"
priority = 1
failure_threshold = 100

[[providers]]
name = "up"
kind = "vibedream"
base_url = "{sim_url}"
api_key_env = "VIS_KEY"
priority = 2
max_concurrent = 10
output_hosts = ["{sim_url.removeprefix("http://")}"]
"""
    )
    yield {"providers_file": path}


async def test_a_failover_as_operators_see_it(api: Api, runtime: Runtime) -> None:
    metrics.take_tallies()
    before = await scrape(api)
    tenant = await api.tenant(budgetCents=1000)
    for _ in range(2):
        answer = await tenant.submit()
        assert answer.status_code == 200, answer.text
        assert answer.json()["provider"] == "up"
    after = await scrape(api)

    def delta(**labels: str) -> float:
        name = "vidgate_upstream_request_seconds_count"
        return total(after, name, **labels) - total(before, name, **labels)

    assert delta(provider="down", op="submit", outcome="connection_error") == 2
    assert delta(provider="up", op="submit", outcome="200") == 2
    assert delta(provider="down", op="submit", outcome="200") == 0

    await stats.flush(runtime.sessions)
    listed = {p["name"]: p for p in (await api.admin("GET", "/admin/v1/providers")).json()["data"]}
    down, up = listed["down"], listed["up"]
    assert (down["today"]["submits"], down["today"]["accepted"], down["today"]["errors"]) == (2, 0, 2)
    assert (up["today"]["submits"], up["today"]["accepted"], up["today"]["errors"]) == (2, 2, 0)
    assert down["state"]["failuresInARow"] == 2 and down["state"]["lastError"]
    assert down["state"]["circuit"] == "closed"  # 2 of its 100
    assert up["state"]["inFlight"] == 2 and up["maxConcurrent"] == 10  # counted across replicas
    assert up["today"]["spentCents"] == 18 and up["today"]["predictions"] == 2
    assert down["today"]["spentCents"] == 0

    usage = await api.admin("GET", "/admin/v1/usage", params={"groupBy": "provider"})
    assert usage.json()["data"] == [{"provider": "up", "spentCents": 18, "predictions": 2}]
