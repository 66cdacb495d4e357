"""A `vidgate worker` killed with SIGKILL half way through copying an output: another worker takes the
copy over when the lease runs out, and the prediction ends `completed` once, with one webhook whose
link serves the very bytes the vendor had (SPEC section 8, issue 14)."""

from __future__ import annotations

import hashlib
import signal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from sqlalchemy import update

from app.core.database import create_engine, create_sessionmaker, transaction
from app.core.settings import Settings, normalize_database_url
from app.outputs import service as outputs_service
from app.predictions.models import Prediction
from app.upstream.simulator import generated_chunks
from tests.conftest import Receiver
from tests.procs import Procs, Simulator, gateway_env, until, verify

# Fixtures: pytest finds them in this module's namespace (`x as x` marks them as used on purpose).
from tests.procs import module_procs_fixture as module_procs_fixture
from tests.procs import proc_cwd_fixture as proc_cwd_fixture
from tests.procs import proc_db_fixture as proc_db_fixture
from tests.procs import procs_fixture as procs_fixture
from tests.procs import sim_fixture as sim_fixture
from tests.procs import simulator_proc_fixture as simulator_proc_fixture

pytestmark = pytest.mark.slow

SIZE = 8 * 1024 * 1024  # 128 chunks of 64 KiB


async def queue_copy(db: str, public_base_url: str, prediction_id: str, tenant_id: str, source: str) -> None:
    """What the poller's terminal transition will do when the vendor says completed."""
    engine = create_engine(normalize_database_url(db))
    try:
        async with transaction(create_sessionmaker(engine)) as session:
            await session.execute(update(Prediction).where(Prediction.id == prediction_id).values(next_poll_at=None))
            queued = await outputs_service.enqueue_copy(
                session,
                Settings(_env_file=None, public_base_url=public_base_url),
                prediction_id=prediction_id,
                tenant_id=tenant_id,
                sources=[source],
                vendor_completed_at=None,
                model_name="LTX-2 19B",
            )
            assert queued
    finally:
        await engine.dispose()


async def test_sigkill_mid_copy_resumes_and_completes_once(
    procs: Procs, proc_db: str, sim: Simulator, receiver_factory: Any, tmp_path: Path
) -> None:
    await sim.configure(completion_s=3600)  # the vendor never finishes by itself: the copy is queued here
    env = gateway_env(
        proc_db,
        sim,
        VIDGATE_RUN_WORKER="false",
        VIDGATE_OUTPUT_HOSTS=urlsplit(sim.url).netloc,
        VIDGATE_OUTPUTS_STORE=str(tmp_path / "store"),
    )
    gw = await procs.serve(env)
    async with gw.http:
        receiver: Receiver = await receiver_factory()
        tenant, key = await gw.tenant(webhookUrl=receiver.url)
        prediction_id = (await gw.submit_ok(key))["id"]
        await sim.faults(output_chunk_delay_s=0.03, output_gone=False, output_count=0)
        before = await sim.stats()
        source = f"{sim.url}/sandbox/generated/{SIZE}/resume.mp4"
        await queue_copy(proc_db, gw.url, prediction_id, tenant["id"], source)

        first = await procs.worker(env, "worker-1")

        async def half_sent() -> bool:
            return (await sim.stats())["outputBytesSent"] - before["outputBytesSent"] >= SIZE // 4

        await until(half_sent, 30, "worker-1 to be a quarter of the way through the copy")
        first.send(signal.SIGKILL)
        assert await first.wait(10) == -signal.SIGKILL
        assert (await gw.prediction(key, prediction_id))["status"] == "processing"
        assert receiver.received == []

        await sim.faults(output_chunk_delay_s=0.0)
        await procs.worker(env, "worker-2")

        async def completed() -> bool:
            return (await gw.prediction(key, prediction_id))["status"] == "completed"

        await until(completed, 60, "the copy to be resumed and the prediction completed", every=0.2)
        delivery = await receiver.next(20)
        event = verify(tenant["webhookSecret"], delivery)
        assert event["type"] == "prediction.completed"
        got = await gw.prediction(key, prediction_id)
        assert event["data"]["outputs"] == got["outputs"]
        (link,) = got["outputs"]
        assert link.startswith(f"{gw.url}/outputs/{prediction_id}/")

        # The vendor deleting its file afterwards does not matter.
        await sim.faults(output_gone=True)
        served = await gw.http.get(link)
        assert served.status_code == 200
        want = hashlib.sha256(b"".join(generated_chunks("resume.mp4", SIZE))).hexdigest()
        assert hashlib.sha256(served.content).hexdigest() == want
        after = await sim.stats()
        assert after["outputFetches"] - before["outputFetches"] == 2  # the killed copy and its resumption
        rows = await gw.deliveries(tenant["id"])
        assert [r["eventType"] for r in rows] == ["prediction.completed"]
        await sim.faults(output_gone=False)
