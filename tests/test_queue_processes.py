"""The fair queue across real processes (SPEC §12), on one PostgreSQL.

- Three `vidgate serve` replicas (each dispatching from the one queue in its worker) in front of one
  provider with max_concurrent = 4: every submit is answered 200 (most of them queued), every one
  completes, the simulator never has more than 4 in flight and never receives a prediction twice.
- `kill -9` of the process dispatching a queued prediction, its send in flight: after the lease, the
  survivor ends it failed with its hold released, and it is never sent a second time.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.conftest import TEST_DB, valid_body
from tests.procs import ADMIN_TOKEN, Procs, Simulator, base_env, fresh_database, running_simulator, until

# Fixtures: pytest finds them in this module's namespace.
from tests.procs import proc_cwd_fixture as proc_cwd_fixture
from tests.procs import procs_fixture as procs_fixture

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(TEST_DB != "postgresql", reason="several gateway processes on one database need PostgreSQL"),
]

PRICE = 10  # 2 c/s x 5 s


@pytest.fixture(name="queue_db")
async def queue_db_fixture(procs: Procs, tmp_path_factory: pytest.TempPathFactory) -> Any:
    async with fresh_database(procs, tmp_path_factory, "vidgate_queue") as url:
        yield url


def env(db: str, tmp_path: Path, sim: Simulator, cap: int, **extra: str) -> dict[str, str]:
    path = tmp_path / "providers.toml"
    path.write_text(
        f"""
[[providers]]
name = "only"
kind = "wavespeed"
base_url = "{sim.url}"
api_key_env = "ONLY_KEY"
max_concurrent = {cap}
failure_threshold = 1000
output_hosts = ["{urlsplit(sim.url).netloc}"]
cents_per_second = {{ "480p" = 2, "720p" = 4, "1080p" = 8 }}
"""
    )
    return base_env(
        VIDGATE_DATABASE_URL=db,
        VIDGATE_PROVIDERS_FILE=str(path),
        ONLY_KEY="only-" + secrets.token_hex(8),
        VIDGATE_ADMIN_TOKEN=ADMIN_TOKEN,
        VIDGATE_WEBHOOK_ALLOW_PRIVATE="true",
        VIDGATE_POLL_INTERVAL_S="0.3",
        VIDGATE_LEASE_S="3",
        VIDGATE_DATABASE_POOL_SIZE="3",
        # A small pool per replica, yet every submit of the burst admitted: shedding is not what this shows.
        VIDGATE_MAX_INFLIGHT_REQUESTS="1000",
        VIDGATE_REHOST_OUTPUTS="false",
        **extra,
    )


async def test_three_replicas_dispatch_from_one_queue_and_never_pass_the_cap(
    procs: Procs, queue_db: str, tmp_path: Path
) -> None:
    async with running_simulator(procs, completion_s=0.5, estimated_time="0-1s") as sim:
        gateway_env = env(queue_db, tmp_path, sim, cap=4)
        replicas = [await procs.serve(gateway_env, name=f"serve-{i}") for i in range(3)]
        keys = [(await replicas[0].tenant(name=f"t{i}"))[1] for i in range(2)]
        gate = asyncio.Semaphore(30)

        async def one(i: int) -> dict[str, Any]:
            async with gate:
                for _ in range(20):  # bounded: a shared PostgreSQL may run out of connections for a moment
                    answer = await replicas[i % 3].submit(keys[i % 2], valid_body(prompt=f"p {i}"))
                    if answer.json().get("code") != "database_unavailable":
                        break
                    await asyncio.sleep(0.5)
                assert answer.status_code == 200, answer.text
                return dict(answer.json())

        answers = await asyncio.gather(*(one(i) for i in range(120)))
        assert sum(1 for a in answers if a.get("queued")) > 0
        ids = {a["id"] for a in answers}

        async def spent() -> bool:
            totals = [
                await replicas[2].http.get("/api/v1/usage", headers={"Authorization": f"Bearer {k}"}) for k in keys
            ]
            return [t.json()["spentCents"] for t in totals] == [60 * PRICE, 60 * PRICE] and all(
                t.json()["reservedCents"] == 0 for t in totals
            )

        await until(spent, 240, "every prediction sent and charged once", every=0.5)
        stats = await sim.stats()
        assert stats["maxInFlight"] <= 4, stats
        assert stats["submits"] == 120 and stats["accepted"] == 120, stats  # none sent twice
        assert len(ids) == 120


async def test_kill_9_of_a_dispatching_process_never_sends_twice(procs: Procs, queue_db: str, tmp_path: Path) -> None:
    async with running_simulator(procs, completion_s=0.5, estimated_time="0-1s") as sim:
        gateway_env = env(
            queue_db, tmp_path, sim, cap=4, VIDGATE_UPSTREAM_TIMEOUT_S="2", VIDGATE_SUBMIT_RECOVERY_S="10"
        )
        await sim.faults(submit_status=503, submit_count=1)  # the submit finds no provider: queued
        gateway = await procs.serve(gateway_env, name="serve-killed")
        _, key = await gateway.tenant(budgetCents=100, budgetPeriod="total")
        await sim.faults(submit_delay_s=60)  # the dispatch's answer never comes before the kill
        queued = await gateway.submit_ok(key, valid_body())
        assert queued["queued"] is True

        async def dispatched() -> bool:
            return int((await sim.stats())["submits"]) >= 2

        await until(dispatched, 30, "the dispatcher to send it")
        os.killpg(gateway.proc.pid, signal.SIGKILL)  # serve and its worker child, as a crash would
        assert await gateway.proc.wait(10) == -signal.SIGKILL
        await sim.faults(submit_delay_s=0)
        survivor = await procs.serve(gateway_env, name="serve-survivor")

        async def failed() -> bool:
            return (await survivor.prediction(key, queued["id"]))["status"] == "failed"

        await until(failed, 60, "the unknown dispatch to end failed", every=0.5)
        got = await survivor.prediction(key, queued["id"])
        assert "never sent again" in got["error"] and got["costCents"] is None
        usage = await survivor.http.get("/api/v1/usage", headers={"Authorization": f"Bearer {key}"})
        assert (usage.json()["spentCents"], usage.json()["reservedCents"]) == (0, 0)
        # Sent once by the killed process, never by the survivor.
        assert (await sim.stats())["submits"] == 2
