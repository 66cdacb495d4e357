"""`vidgate serve --workers 2` on PostgreSQL: both processes serve, one worker child polls for both, and
one scrape of /metrics (answered by either) counts the requests of both (Prometheus multiprocess mode,
set up by `serve`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.multiprocess import MultiProcessCollector

from bench.ports import free_port
from tests.conftest import TEST_DB
from tests.procs import ADMIN_TOKEN, Gateway, Procs, fresh_database, gateway_env, until, wait_healthy

# Fixtures: pytest finds them in this module's namespace (`x as x` marks them as used on purpose).
from tests.procs import module_procs_fixture as module_procs_fixture
from tests.procs import proc_cwd_fixture as proc_cwd_fixture
from tests.procs import procs_fixture as procs_fixture
from tests.procs import sim_fixture as sim_fixture
from tests.procs import simulator_proc_fixture as simulator_proc_fixture

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(TEST_DB != "postgresql", reason="several server processes need PostgreSQL"),
]


def healthz_count(families: Any) -> float:
    return sum(
        sample.value
        for family in families
        if family.name == "vidgate_http_requests"
        for sample in family.samples
        if sample.name.endswith("_total") and sample.labels.get("route") == "/healthz"
    )


def per_process_healthz(tmp: Path) -> dict[str, float]:
    """What each worker counted, read from its own file in the multiprocess directory."""
    files = list(tmp.glob("vidgate-metrics-*/counter_*.db"))
    return {f.stem: healthz_count(MultiProcessCollector.merge([str(f)], accumulate=True)) for f in files}


def scraped_healthz(text: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith("vidgate_http_requests_total{") and 'route="/healthz"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_two_workers_serve_and_one_scrape_sees_both(
    procs: Procs, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, sim: Any
) -> None:
    async with fresh_database(procs, tmp_path_factory, "vidgate_workers") as db:
        port = free_port()
        env = gateway_env(db, sim, VIDGATE_RUN_WORKER="true", TMPDIR=str(tmp_path))
        proc = await procs.start("serve-2", "serve", "--port", str(port), "--workers", "2", env=env, json_logs=True)
        url = f"http://127.0.0.1:{port}"
        await wait_healthy(proc, url)
        gw = Gateway(url, httpx.AsyncClient(base_url=url, trust_env=False, timeout=30), proc)
        async with gw.http:
            _, key = await gw.tenant(budgetCents=1000)
            submitted = await gw.submit(key, Prefer="wait=10")
            assert submitted.status_code == 200 and submitted.json()["status"] == "completed", submitted.text

            # New connections are spread over the workers by the kernel: go on until both have served some.
            async def both_served() -> bool:
                async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=10) as fresh:
                    assert (await fresh.get("/healthz")).status_code == 200
                counts = per_process_healthz(tmp_path)
                # The worker child has a file too (its own metrics): it serves no requests.
                return len([n for n in counts.values() if n > 0]) == 2

            await until(both_served, 30, "both workers to serve /healthz")
            # One worker child polls for the N server processes, which run none of their own.
            started = [e for e in proc.logs() if e.get("msg") == "worker started"]
            [child] = [e["pid"] for e in proc.logs() if e.get("msg") == "worker process started"]
            assert [int(e["worker_id"].split("-")[-2]) for e in started] == [child]
            for _ in range(4):  # whichever worker answers, it counts both
                # A request is counted just after its answer went out, so the last /healthz may land in the
                # files only now: the scrape is bracketed by two readings of them.
                before = per_process_healthz(tmp_path)
                scrape = await gw.http.get("/metrics", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
                after = per_process_healthz(tmp_path)
                assert scrape.status_code == 200, scrape.text
                assert sum(before.values()) <= scraped_healthz(scrape.text) <= sum(after.values())
                assert sum(before.values()) > max(before.values())  # both processes' counts, not one's
