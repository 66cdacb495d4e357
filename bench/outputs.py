"""Copy throughput of rehosted outputs (issue 14): MB/s of a `vidgate worker` copying a large output
from the simulator into its local store, against a plain streamed download of the same file into a
file, and the worker's resident memory while it copies.

    .venv/bin/python -m bench.outputs [--size-mb 200] [--runs 3] [--out bench/outputs_results.md]

The copy is timed from the commit of its job to the prediction becoming `completed` (what a caller
waits for), so it includes the copier's claim delay (at most its idle wait, 0.1 s). Until the poller
hands completed predictions to the copier (issue 13's rewrite of the terminal transition), the job
is queued here the way the poller will queue it."""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from app.core import clock
from app.core.database import create_engine, create_sessionmaker, transaction
from app.core.ids import new_id
from app.core.migrate import upgrade_to_head
from app.core.settings import Settings
from app.outputs import service as outputs_service
from app.predictions.models import Prediction
from app.tenants import service as tenants_service
from app.tenants.schemas import KeyCreate, TenantCreate
from bench.ports import free_port
from bench.procs import Processes, proc_status_kb, wait_http

ROOT = Path(__file__).resolve().parents[1]


def vidgate_bin() -> str:
    return str(Path(sys.executable).with_name("vidgate"))


async def plain_download(url: str, target: Path) -> float:
    """Seconds to stream `url` into a file: the floor any copy through a store has to beat."""
    started = time.perf_counter()
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        response.raise_for_status()
        with target.open("wb") as handle:
            async for chunk in response.content.iter_chunked(1024 * 1024):
                handle.write(chunk)
    return time.perf_counter() - started


async def queue_copy(settings: Settings, source: str) -> str:
    engine = create_engine(settings.database_url)
    sessions = create_sessionmaker(engine)
    async with transaction(sessions) as session:
        tenant = await tenants_service.create_tenant(session, TenantCreate(name=f"bench-{secrets.token_hex(3)}"))
        key, _ = await tenants_service.create_key(session, tenant, KeyCreate())
        now = clock.now()
        prediction = Prediction(
            id=new_id("pred"),
            tenant_id=tenant.id,
            api_key_id=key.id,
            model_id="ltx-2-19b",
            status="processing",
            params={},
            estimate_cents=0,
            charged_cents=0,
            period_start=now,
            created_at=now,
            poll_count=0,
            poll_failures=0,
        )
        session.add(prediction)
        await session.flush()
        await outputs_service.enqueue_copy(
            session,
            settings,
            prediction_id=prediction.id,
            tenant_id=tenant.id,
            sources=[source],
            vendor_completed_at=now,
            model_name="LTX-2 19B",
        )
    await engine.dispose()
    return prediction.id


async def wait_completed(settings: Settings, prediction_id: str, timeout_s: float = 600.0) -> float:
    engine = create_engine(settings.database_url)
    sessions = create_sessionmaker(engine)
    started = time.perf_counter()
    try:
        while time.perf_counter() - started < timeout_s:
            async with transaction(sessions, readonly=True) as session:
                prediction = await session.get(Prediction, prediction_id, populate_existing=True)
                if prediction is not None and prediction.status != "processing":
                    if prediction.status != "completed":
                        raise SystemExit(f"bench: the copy ended {prediction.status}: {prediction.error}")
                    return time.perf_counter() - started
            await asyncio.sleep(0.02)
    finally:
        await engine.dispose()
    raise SystemExit("bench: the copy did not finish in time")


async def run(size_mb: int, runs: int, out: Path) -> None:
    size = size_mb * 1024 * 1024
    work = Path(tempfile.mkdtemp(prefix="vidgate-bench-outputs-"))
    procs = Processes(work)
    try:
        sim_port = free_port()
        sim = procs.start("simulator", [vidgate_bin(), "simulator", "--port", str(sim_port)], _env(), ROOT)
        sim_url = f"http://127.0.0.1:{sim_port}"
        await wait_http(sim_url + "/", sim)
        env = _env(
            VIDGATE_DATABASE_URL=f"sqlite:///{work / 'bench.db'}",
            VIDGATE_UPSTREAM_BASE_URL=sim_url,
            VIDGATE_UPSTREAM_API_KEY="bench",
            VIDGATE_ADMIN_TOKEN=secrets.token_urlsafe(32),
            VIDGATE_WEBHOOK_ALLOW_PRIVATE="true",
            VIDGATE_OUTPUT_HOSTS=f"127.0.0.1:{sim_port}",
            VIDGATE_OUTPUTS_STORE=str(work / "store"),
            VIDGATE_PUBLIC_BASE_URL="http://127.0.0.1:1",
            VIDGATE_LOG_LEVEL="WARNING",
        )
        settings = Settings(
            _env_file=None,
            database_url=env["VIDGATE_DATABASE_URL"],
            public_base_url=env["VIDGATE_PUBLIC_BASE_URL"],
            admin_token=env["VIDGATE_ADMIN_TOKEN"],
        )
        engine = create_engine(settings.database_url)
        await upgrade_to_head(engine)
        await engine.dispose()
        worker = procs.start("worker", [vidgate_bin(), "worker"], env, ROOT)
        await asyncio.sleep(3.0)  # started and idle: its resident size before any copy
        if not worker.alive():
            raise SystemExit("bench: the worker did not start:\n" + worker.log_tail())
        rss_before_kb = proc_status_kb(worker.pid, "VmRSS") or 0

        plain, copied = [], []
        for run_index in range(runs):
            source = f"{sim_url}/sandbox/generated/{size}/run{run_index}.mp4"
            plain.append(await plain_download(source, work / "plain.bin"))
            prediction_id = await queue_copy(settings, source)
            copied.append(await wait_completed(settings, prediction_id))
            print(
                f"run {run_index + 1}: plain {size_mb / plain[-1]:.0f} MB/s, via vidgate {size_mb / copied[-1]:.0f} MB/s"
            )
        peak_kb = proc_status_kb(worker.pid, "VmHWM") or 0
        procs.stop(worker)
        # SIGTERM: a graceful stop exits 0 (a store library aborting at interpreter exit would not).
        print(f"worker exit status after SIGTERM: {worker.popen.returncode}")
        plain_s, copy_s = statistics.median(plain), statistics.median(copied)
        lines = [
            "# Output copy throughput (bench/outputs.py)",
            "",
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {size_mb} MiB generated by the simulator, "
            f"{runs} runs, medians; local store on the same disk.",
            "",
            "| what | seconds | MiB/s |",
            "|---|---|---|",
            f"| plain streamed download into a file | {plain_s:.2f} | {size_mb / plain_s:.0f} |",
            f"| `vidgate worker` copy, enqueue to `completed` | {copy_s:.2f} | {size_mb / copy_s:.0f} |",
            "",
            f"Worker resident memory: {rss_before_kb / 1024:.0f} MiB idle before the copies, peak "
            f"{peak_kb / 1024:.0f} MiB over all of them (growth {(peak_kb - rss_before_kb) / 1024:.0f} MiB "
            f"while copying {size_mb} MiB files).",
            "",
        ]
        out.write_text("\n".join(lines))
        print("\n".join(lines))
    finally:
        procs.stop_all()


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIDGATE_")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "outputs_results.md")
    args = parser.parse_args(argv)
    asyncio.run(run(args.size_mb, args.runs, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
