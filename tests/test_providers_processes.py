"""Providers across real processes (SPEC §11): caps that hold across replicas, and a failover killed
half way through.

- Three `vidgate serve` replicas on one PostgreSQL route 200 concurrent submits between a provider with
  max_concurrent = 5 and one without a cap: the capped provider's simulator never has more than 5 of
  them in flight, and the budget edge admits exactly what fits (0 cents over) although the two
  providers charge different prices.
- `kill -9` of the gateway while a submit fails over (the first provider answered 503, the second holds
  the answer): nothing is lost (the hold comes back by the submit recovery) and the caller's retry with
  the same Idempotency-Key is charged once.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import TEST_DB, valid_body
from tests.procs import ADMIN_TOKEN, Gateway, Procs, Simulator, base_env, fresh_database, running_simulator, until

# Fixtures: pytest finds them in this module's namespace.
from tests.procs import proc_cwd_fixture as proc_cwd_fixture
from tests.procs import procs_fixture as procs_fixture

pytestmark = pytest.mark.slow

CAPPED_PRICE = 10  # 2 c/s x 5 s
SPILL_PRICE = 9  # the simulator's costCents for 480p, 5 s


@pytest.fixture(name="providers_db")
async def providers_db_fixture(procs: Procs, tmp_path_factory: pytest.TempPathFactory) -> Any:
    async with fresh_database(procs, tmp_path_factory, "vidgate_providers") as url:
        yield url


def providers_file(tmp_path: Path, first: Simulator, second: Simulator, *, cap: int | None) -> Path:
    capped = f"max_concurrent = {cap}\n" if cap is not None else ""
    text = f"""
routing = "priority"

[[providers]]
name = "capped"
kind = "wavespeed"
base_url = "{first.url}"
api_key_env = "CAPPED_KEY"
priority = 1
{capped}output_hosts = ["{urlsplit(first.url).netloc}"]
resolutions = ["480p"]
cents_per_second = {{ "480p" = 2 }}

[[providers]]
name = "spill"
kind = "vibedream"
base_url = "{second.url}"
api_key_env = "SPILL_KEY"
priority = 2
output_hosts = ["{urlsplit(second.url).netloc}"]
"""
    path = tmp_path / "providers.toml"
    path.write_text(text)
    return path


def env(db: str, path: Path, **extra: str) -> dict[str, str]:
    return base_env(
        VIDGATE_DATABASE_URL=db,
        VIDGATE_PROVIDERS_FILE=str(path),
        CAPPED_KEY="capped-" + secrets.token_hex(8),
        SPILL_KEY="spill-" + secrets.token_hex(8),
        VIDGATE_ADMIN_TOKEN=ADMIN_TOKEN,
        VIDGATE_WEBHOOK_ALLOW_PRIVATE="true",
        VIDGATE_POLL_INTERVAL_S="0.3",
        VIDGATE_LEASE_S="3",
        VIDGATE_DATABASE_POOL_SIZE="5",
        VIDGATE_REHOST_OUTPUTS="false",
        **extra,
    )


async def usage(gateway: Gateway, key: str) -> dict[str, Any]:
    answer = await gateway.http.get("/api/v1/usage", headers={"Authorization": f"Bearer {key}"})
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


@pytest.mark.skipif(TEST_DB != "postgresql", reason="several gateway processes on one database need PostgreSQL")
async def test_three_replicas_hold_a_providers_cap_and_the_budget_edge(
    procs: Procs, providers_db: str, tmp_path: Path
) -> None:
    async with (
        running_simulator(procs, completion_s=1.5, estimated_time="0-1s") as first,
        running_simulator(procs, completion_s=1.5, estimated_time="0-1s") as second,
    ):
        path = providers_file(tmp_path, first, second, cap=5)
        gateway_env = env(providers_db, path)
        replicas = [await procs.serve(gateway_env, name=f"serve-{i}") for i in range(3)]
        budget = 1000  # at 10 and 9 cents a prediction: about 100 of the 200 fit
        _, key = await replicas[0].tenant(budgetCents=budget, budgetPeriod="total")
        gate = asyncio.Semaphore(60)

        async def one(i: int) -> httpx.Response:
            async with gate:
                return await replicas[i % 3].submit(key, valid_body())

        answers = await asyncio.gather(*(one(i) for i in range(200)))
        codes = [a.status_code for a in answers]
        errors = [line for r in replicas for line in r.proc.stderr if '"level":"error"' in line or "Traceback" in line]
        assert set(codes) <= {200, 402, 503}, "\n".join(errors[-3:])
        admitted = [a.json() for a in answers if a.status_code == 200]
        by_provider = {name: [p for p in admitted if p["provider"] == name] for name in ("capped", "spill")}
        assert len(by_provider["capped"]) + len(by_provider["spill"]) == len(admitted)
        assert all(p["costCents"] == CAPPED_PRICE for p in by_provider["capped"])
        assert all(p["costCents"] == SPILL_PRICE for p in by_provider["spill"])
        # The cap was reached and held across the three replicas.
        stats = await first.stats()
        assert stats["maxInFlight"] <= 5, stats
        assert len(by_provider["capped"]) >= 5 and len(by_provider["spill"]) > 0
        # The budget edge: every cent charged is accounted, none over, and nothing more would fit
        # (outputs are not rehosted here: the charge is final at the submit's answer).
        spent = await usage(replicas[2], key)
        charged = CAPPED_PRICE * len(by_provider["capped"]) + SPILL_PRICE * len(by_provider["spill"])
        assert (spent["spentCents"], spent["reservedCents"]) == (charged, 0)
        assert spent["spentCents"] <= budget
        assert budget - spent["spentCents"] < CAPPED_PRICE  # the hold: what a submit needs, and it does not fit
        assert codes.count(402) == 200 - len(admitted) - codes.count(503)
        # Every slot came back once the predictions ended.
        await until(lambda: _in_flight_zero(providers_db), 60, "the capped provider's slots back")


async def _in_flight_zero(db: str) -> bool:
    import asyncpg

    conn = await asyncpg.connect(db)
    try:
        value = await conn.fetchval("SELECT in_flight FROM provider_states WHERE name = 'capped'")
    finally:
        await conn.close()
    return value == 0


async def test_kill_9_in_the_middle_of_a_failover_loses_nothing_and_charges_once(
    procs: Procs, providers_db: str, tmp_path: Path
) -> None:
    async with (
        running_simulator(procs, completion_s=1.0, estimated_time="0-1s") as first,
        running_simulator(procs, completion_s=1.0, estimated_time="0-1s") as second,
    ):
        path = providers_file(tmp_path, first, second, cap=3)
        gateway_env = env(
            providers_db,
            path,
            VIDGATE_UPSTREAM_TIMEOUT_S="5",
            VIDGATE_SUBMIT_RECOVERY_S="11",
        )
        await first.faults(submit_status=503, submit_count=1000)  # the first provider fails ...
        await second.faults(submit_delay_s=60)  # ... and the second holds its answer
        gateway = await procs.serve(gateway_env, name="serve-killed")
        tenant, key = await gateway.tenant(budgetCents=100, budgetPeriod="total")
        idempotency = "once-" + secrets.token_hex(6)
        pending = asyncio.create_task(gateway.submit(key, valid_body(), **{"Idempotency-Key": idempotency}))

        async def failing_over() -> bool:
            return (await first.stats())["submits"] >= 1 and (await second.stats())["submits"] >= 1

        await until(failing_over, 30, "the submit to reach the second provider")
        os.killpg(gateway.proc.pid, signal.SIGKILL)  # serve and its worker child, as a crash would
        assert await gateway.proc.wait(10) == -signal.SIGKILL
        with pytest.raises(httpx.HTTPError):
            await pending
        await second.faults(submit_delay_s=0)

        survivor = await procs.serve(gateway_env, name="serve-survivor")
        answers: list[httpx.Response] = []

        async def retried() -> bool:
            answer = await survivor.submit(key, valid_body(), **{"Idempotency-Key": idempotency})
            answers.append(answer)
            assert answer.status_code in (200, 409), answer.text  # in flight until the recovery frees it
            return answer.status_code == 200

        await until(retried, 90, "the retry to be accepted once the killed attempt is recovered", every=1.0)
        body = answers[-1].json()
        assert body["provider"] == "spill" and body["costCents"] == SPILL_PRICE
        again = await survivor.submit(key, valid_body(), **{"Idempotency-Key": idempotency})
        assert again.status_code == 200 and again.json()["id"] == body["id"]  # the same answer, not a new run
        spent = await usage(survivor, key)
        assert (spent["spentCents"], spent["reservedCents"]) == (SPILL_PRICE, 0)  # charged once, nothing held
        listed = await survivor.http.get("/api/v1/predictions", headers={"Authorization": f"Bearer {key}"})
        assert [p["id"] for p in listed.json()["data"]] == [body["id"]]
        # The ledger of the tenant: the killed attempt's hold and its release, then the retry's hold and settle.
        report = await survivor.admin("GET", "/admin/v1/usage?groupBy=tenant")
        assert report.status_code == 200
        assert tenant["id"] in report.text


async def test_sandbox_with_a_providers_file_runs_every_format(procs: Procs, tmp_path: Path) -> None:
    """`serve --sandbox` with a providers file: one simulator per provider, no key needed or sent."""
    import re

    from tests.procs import TENANT_KEYS, free_port, wait_healthy

    path = tmp_path / "providers.toml"
    path.write_text(
        """
routing = "priority"
[[providers]]
name = "fal-queue"
kind = "fal"
base_url = "https://queue.fal.run"
api_key_env = "FAL_KEY_NOT_SET"
priority = 1
cents_per_second = { "480p" = 2, "720p" = 4, "1080p" = 8 }

[[providers]]
name = "wave"
kind = "wavespeed"
base_url = "https://api.wavespeed.ai"
api_key_env = "WAVESPEED_KEY_NOT_SET"
priority = 2
cents_per_second = { "480p" = 1.8, "720p" = 3.6, "1080p" = 7.2 }
"""
    )
    port = free_port()
    env = base_env(
        VIDGATE_DATABASE_URL=f"sqlite:///{tmp_path / 'sandbox.db'}",
        VIDGATE_PROVIDERS_FILE=str(path),
        VIDGATE_SANDBOX_COMPLETION_S="1",
        VIDGATE_SANDBOX_ESTIMATED_TIME="0-1s",
    )
    proc = await procs.start("sandbox serve", "serve", "--sandbox", "--port", str(port), env=env, json_logs=True)
    url = f"http://127.0.0.1:{port}"
    await wait_healthy(proc, url)
    await until(lambda: any("vg_" in line for line in proc.stdout), 10, "the demo key on stdout")
    match = re.search(r"\b(vg_[A-Za-z0-9_\-]+)", "\n".join(proc.stdout))
    assert match
    key = match.group(1)
    proc.allowed_in_stdout.add(key)
    TENANT_KEYS.add(key)
    async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=30) as http:
        auth = {"Authorization": f"Bearer {key}"}
        submitted = await http.post(
            "/api/v1/models/ltx-2-19b/generate", json=valid_body(), headers={**auth, "Prefer": "wait=15"}
        )
        assert submitted.status_code == 200, submitted.text
        body = submitted.json()
        assert (body["provider"], body["status"], body["costCents"]) == ("fal-queue", "completed", 10), body
        video = await http.get(body["outputs"][0])
        assert video.status_code == 200 and video.content[4:8] == b"ftyp"
