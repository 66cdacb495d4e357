"""The fair queue's cell (SPEC §12): N predictions queued across T tenants in front of one provider with a
simulated cap, then sent by the worker's dispatcher as the provider frees room.

    python -m bench.queue                      # 10,000 predictions, 100 tenants, cap 200
    python -m bench.queue --predictions 2000   # smaller, on a busy machine

The queue is filled tenant after tenant (tenant 0's predictions first, then tenant 1's, ...), which is
the worst case for fairness: first-come-first-served would send tenant 0's whole backlog first. The
simulator runs as its own process (`vidgate simulator`); the gateway's worker (poller, dispatcher)
runs in this process on PostgreSQL, so its CPU is this process's CPU. Reported:
- dispatch throughput: predictions sent per second, from the dispatcher's start to the last send;
- Jain's fairness index of sends per tenant in each window of `--window` consecutive sends while every
  tenant still has a backlog (1.0: perfectly equal; 1/T: one tenant takes all): min and mean;
- CPU per dispatched prediction: this process's CPU over the run / predictions (the dispatch, and the
  polls and completion of those sent meanwhile).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.ports import free_port

HERE = Path(__file__).resolve().parent
PG_BASE = os.environ.get("BENCH_PG", "postgresql+asyncpg://postgres@127.0.0.1:5432")


def jain(counts: list[int]) -> float:
    total = sum(counts)
    squares = sum(c * c for c in counts)
    return 1.0 if squares == 0 else total * total / (len(counts) * squares)


def windows(order: list[str], tenants: int, per_tenant: int, size: int) -> list[float]:
    """Jain's index per window of `size` sends, while every tenant still had predictions waiting."""
    sent: dict[str, int] = {}
    indices: list[float] = []
    window: dict[str, int] = {}
    names: set[str] = set()
    for i, tenant in enumerate(order, 1):
        names.add(tenant)
        window[tenant] = window.get(tenant, 0) + 1
        sent[tenant] = sent.get(tenant, 0) + 1
        if i % size == 0:
            indices.append(jain([window.get(t, 0) for t in sorted(names | set(window))] + [0] * (tenants - len(names))))
            window = {}
            if any(n >= per_tenant for n in sent.values()):
                break  # a tenant ran out of backlog: later windows need not be equal
    return indices


async def run(n: int, tenants: int, cap: int, window: int) -> dict[str, Any]:
    import asyncpg
    from pydantic import SecretStr
    from sqlalchemy import update

    from app.core.database import create_engine, create_sessionmaker, transaction
    from app.core.settings import Settings
    from app.predictions import failover
    from app.predictions.schemas import GenerateRequest
    from app.providers import service as providers_service
    from app.providers.config import ProviderConfig, Registry
    from app.providers.models import ProviderState
    from app.runtime import build_runtime
    from app.tenants import service as tenants_service
    from app.tenants.models import ApiKey, Tenant
    from app.tenants.schemas import KeyCreate, TenantCreate
    from app.worker import Worker

    name = "vidgate_bench_queue"
    conn = await asyncpg.connect(PG_BASE.replace("+asyncpg", "") + "/postgres")
    await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    db_url = f"{PG_BASE}/{name}"
    vidgate = str(Path(sys.executable).parent / "vidgate")
    port = free_port()
    sim = subprocess.Popen(
        [vidgate, "simulator", "--port", str(port), "--completion-s", "0.5", "--estimated-time", "0-1s"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    sim_url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "VIDGATE_DATABASE_URL": db_url, "VIDGATE_UPSTREAM_BASE_URL": sim_url}
    env["VIDGATE_UPSTREAM_API_KEY"] = "bench"
    subprocess.run([vidgate, "migrate"], env=env, check=True, capture_output=True)
    settings = Settings(
        database_url=db_url,
        upstream_base_url=sim_url,
        upstream_api_key="bench",
        admin_token="bench-" + secrets.token_hex(8),
        run_worker=False,
        rehost_outputs=False,
        poll_interval_s=0.5,
        log_level="WARNING",
    )
    registry = Registry(
        providers=[
            ProviderConfig(
                name="vibedream",
                kind="vibedream",
                base_url=sim_url,
                api_key=SecretStr("bench"),
                api_key_env="BENCH_KEY",
                max_concurrent=cap,
                output_hosts=[f"127.0.0.1:{port}"],
            )
        ],
        source="bench",
    )
    engine = create_engine(db_url, pool_size=20)
    runtime = build_runtime(settings, engine, create_sessionmaker(engine), registry=registry)
    try:
        owners: dict[str, str] = {}
        callers: list[tuple[Tenant, ApiKey]] = []
        async with transaction(runtime.sessions) as session:
            for t in range(tenants):
                tenant = await tenants_service.create_tenant(session, TenantCreate(name=f"t{t:03d}", max_queued=n))
                key, _ = await tenants_service.create_key(session, tenant, KeyCreate())
                callers.append((tenant, key))
            await providers_service.ensure_rows(session, ["vibedream"])
            await session.execute(update(ProviderState).values(disabled=True))  # every submit queues
        await runtime.providers.health.refresh(force=True)
        per_tenant = n // tenants
        request = GenerateRequest.model_validate(
            {"image": "https://example.com/cat.png", "prompt": "bench", "resolution": "480p", "duration": 5}
        )
        filled = time.monotonic()
        for tenant, key in callers:  # tenant after tenant: the worst case for first-come-first-served
            results = await asyncio.gather(
                *(
                    failover.submit(
                        runtime, tenant, key, "ltx-2-19b", request, idempotency_key=None, status_url_base=""
                    )
                    for _ in range(per_tenant)
                )
            )
            for result in results:
                assert result.body.get("queued"), result.body
                owners[result.prediction_id] = tenant.name
        fill_s = time.monotonic() - filled
        async with transaction(runtime.sessions) as session:
            await session.execute(update(ProviderState).values(disabled=False))
        await runtime.providers.health.refresh(force=True)
        worker = Worker(runtime)
        total = per_tenant * tenants
        cpu0, t0 = time.process_time(), time.monotonic()
        task = asyncio.create_task(worker.run())
        while len(worker.queue.sent) < total:
            await asyncio.sleep(0.2)
            if time.monotonic() - t0 > 1800:
                raise RuntimeError(f"only {len(worker.queue.sent)} of {total} sent in 30 minutes")
        elapsed, cpu = time.monotonic() - t0, time.process_time() - cpu0
        worker.stop()
        await asyncio.wait_for(task, 60)
        order = [owners[p] for p in worker.queue.sent]
        per_window = windows(order, tenants, per_tenant, window)
        stats = json.loads(subprocess.run(["curl", "-s", sim_url + "/_sim/stats"], capture_output=True).stdout)
        return {
            "predictions": total,
            "tenants": tenants,
            "cap": cap,
            "fill_s": round(fill_s, 1),
            "dispatch_s": round(elapsed, 1),
            "dispatch_per_s": round(total / elapsed, 1),
            "jain_window": window,
            "jain_min": round(min(per_window), 4) if per_window else None,
            "jain_mean": round(sum(per_window) / len(per_window), 4) if per_window else None,
            "windows": len(per_window),
            "cpu_ms_per_dispatch": round(1000 * cpu / total, 2),
            "sim_max_in_flight": stats.get("maxInFlight"),
            "sim_submits": stats.get("submits"),
        }
    finally:
        await runtime.close()
        await engine.dispose()
        sim.terminate()
        sim.wait(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--predictions", type=int, default=10_000)
    parser.add_argument("--tenants", type=int, default=100)
    parser.add_argument("--cap", type=int, default=200)
    parser.add_argument("--window", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=HERE / "queue_results.json")
    args = parser.parse_args()
    result = asyncio.run(run(args.predictions, args.tenants, args.cap, args.window))
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
