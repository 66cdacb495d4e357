"""Dashboard pages at scale: seed a PostgreSQL database with N tenants and M predictions (plus their
counters, 60 days of rollup and webhook deliveries), then time every page in-process and print the
plan of every query a page runs (EXPLAIN ANALYZE).

    python -m bench.dashboard [--tenants 1000] [--predictions 1000000] [--rounds 20]

Writes bench/dashboard.md. The goal (issue 16): each page answers in <= 100 ms at 1,000 tenants and
1,000,000 predictions.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from sqlalchemy import event

from app.core.database import create_engine, create_sessionmaker
from app.core.migrate import upgrade_to_head
from app.core.settings import Settings
from app.main import create_app
from app.runtime import build_runtime

PG = "postgresql://postgres@127.0.0.1:5432"
DB = "vidgate_bench_dashboard"
TOKEN = "bench-admin-token-0123456789abcdef"
OUT = Path(__file__).parent / "dashboard.md"


async def seed(tenants: int, predictions: int) -> None:
    conn = await asyncpg.connect(f"{PG}/{DB}")
    try:
        started = time.perf_counter()
        # ids sort by creation time (app/core/ids.py): 'pred_' + 12 hex digits of milliseconds + random.
        await conn.execute(
            f"""
            INSERT INTO tenants (id, name, budget_cents, budget_period, in_flight, webhook_secret, created_at)
            SELECT 'ten_' || lpad(to_hex(i), 32, '0'), 'tenant-' || i,
                   CASE WHEN i % 5 = 0 THEN NULL ELSE 10000 + i * 10 END,
                   (ARRAY['month','week','day','total'])[1 + i % 4], 0, 'whsec_x', now()
            FROM generate_series(1, {tenants}) i;
            INSERT INTO api_keys (id, tenant_id, prefix, key_hash, created_at)
            SELECT 'key_' || substr(id, 5), id, 'vg_x', md5(id) || md5(id || 'x'), now() FROM tenants;
            INSERT INTO budget_counters (scope, period_start, spent_cents, reserved_cents)
            SELECT 'tenant:' || id,
                   CASE budget_period WHEN 'day' THEN date_trunc('day', now())
                        WHEN 'week' THEN date_trunc('week', now())
                        WHEN 'month' THEN date_trunc('month', now())
                        ELSE timestamptz '1970-01-01 00:00:00+00' END,
                   (random() * 9000)::int, (random() * 200)::int
            FROM tenants;
            INSERT INTO daily_usage (tenant_id, day, spent_cents, predictions, refusals)
            SELECT t.id, (now() at time zone 'UTC')::date - d, (random() * 500)::int, (random() * 50)::int,
                   (random() * 3)::int
            FROM tenants t, generate_series(0, 59) d;
            INSERT INTO predictions (id, tenant_id, api_key_id, model_id, model_name, status, params,
                                     estimate_cents, holds_slot, charged_cents, period_start, created_at,
                                     poll_count, poll_failures)
            SELECT 'pred_' || lpad(to_hex(ms), 12, '0') || substr(md5(i::text), 1, 20),
                   'ten_' || lpad(to_hex(1 + i % {tenants}), 32, '0'),
                   'key_' || lpad(to_hex(1 + i % {tenants}), 32, '0'),
                   'ltx-2-19b', 'LTX-2 19B',
                   CASE WHEN i > {predictions} - 1000 THEN 'processing' WHEN i % 100 = 0 THEN 'failed'
                        ELSE 'completed' END,
                   '{{}}', 9, false, 9, date_trunc('month', now()),
                   to_timestamp(ms / 1000.0), 3, 0
            FROM (SELECT i, (extract(epoch FROM now()) * 1000)::bigint - ({predictions} - i) * 2000 AS ms
                  FROM generate_series(1, {predictions}) i) s;
            INSERT INTO webhook_deliveries (id, tenant_id, event_type, url, target_host, payload, status, attempts,
                                            next_attempt_at, created_at)
            SELECT 'msg_' || lpad(to_hex(ms), 12, '0') || substr(md5(i::text), 1, 20),
                   'ten_' || lpad(to_hex(1 + i % {tenants}), 32, '0'), 'prediction.completed',
                   'https://hooks.example.com/x', 'hooks.example.com:443', '{{}}',
                   CASE WHEN i % 100 = 0 THEN 'dead' WHEN i > {predictions // 5} - 500 THEN 'pending'
                        ELSE 'succeeded' END,
                   1, now(), to_timestamp(ms / 1000.0)
            FROM (SELECT i, (extract(epoch FROM now()) * 1000)::bigint - ({predictions // 5} - i) * 10000 AS ms
                  FROM generate_series(1, {predictions // 5}) i) s;
            """
        )
        await conn.execute("ANALYZE")
        print(f"seeded in {time.perf_counter() - started:.0f} s")
    finally:
        await conn.close()


async def fresh_database() -> None:
    conn = await asyncpg.connect(f"{PG}/postgres")
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{DB}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{DB}"')
    finally:
        await conn.close()


PAGES = {
    "overview (sorted by use)": "/dashboard",
    "overview, sorted by name, page 5": "/dashboard?sort=name&order=asc&page=5",
    "overview, search": "/dashboard?q=tenant-77",
    "tenant page": "/dashboard/tenants/{tenant}",
    "predictions": "/dashboard/predictions",
    "predictions, status=failed": "/dashboard/predictions?status=failed",
    "predictions, tenant + time range": "/dashboard/predictions?tenant={tenant}&from={day}",
    "predictions, page 2": None,  # filled from the first page's "Older" link
    "deliveries, status=dead": "/dashboard/deliveries?status=dead",
    "deliveries, tenant": "/dashboard/deliveries?tenant={tenant}",
}


async def measure(rounds: int, tenants: int) -> str:
    url = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{DB}"
    settings = Settings(database_url=url, admin_token=TOKEN, upstream_api_key="bench", run_worker=False)
    engine = create_engine(url, pool_size=5)
    runtime = build_runtime(settings, engine, create_sessionmaker(engine))
    statements: list[tuple[str, Any]] = []
    capture = False

    @event.listens_for(engine.sync_engine, "before_cursor_execute")
    def _record(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        if capture and not statement.startswith("EXPLAIN"):
            statements.append((statement, parameters))

    lines = ["# Dashboard pages at scale", ""]
    transport = httpx.ASGITransport(app=create_app(settings, runtime))
    async with httpx.AsyncClient(transport=transport, base_url="http://bench") as http:
        login = await http.get("/dashboard/login")
        csrf = re.search(r'name="csrf" value="([^"]+)"', login.text).group(1)  # type: ignore[union-attr]
        await http.post("/dashboard/login", data={"csrf": csrf, "token": TOKEN})
        tenant = "ten_" + f"{min(777, tenants):032x}"
        day = time.strftime("%Y-%m-%d", time.gmtime(time.time() - 3 * 86400))
        first = await http.get("/dashboard/predictions")
        older = re.search(r'href="(/dashboard/predictions\?cursor=[^"]+)"', first.text)
        lines += ["| page | median ms | p95 ms | max ms |", "|---|---:|---:|---:|"]
        plans: list[str] = []
        for name, template in PAGES.items():
            path = (template or (older.group(1) if older else "/dashboard/predictions")).format(tenant=tenant, day=day)
            for _ in range(3):  # warm up
                assert (await http.get(path)).status_code == 200, path
            times = []
            for _ in range(rounds):
                started = time.perf_counter()
                answer = await http.get(path)
                times.append((time.perf_counter() - started) * 1000)
                assert answer.status_code == 200
            times.sort()
            p95 = times[min(len(times) - 1, int(len(times) * 0.95))]
            lines.append(f"| {name} | {statistics.median(times):.1f} | {p95:.1f} | {times[-1]:.1f} |")
            print(lines[-1])
            statements.clear()
            capture = True
            await http.get(path)
            capture = False
            plans += [f"## {name}: `{path}`", ""]
            async with engine.connect() as conn:
                for statement, parameters in list(statements):
                    if not statement.lstrip().upper().startswith("SELECT"):
                        continue
                    result = await conn.exec_driver_sql("EXPLAIN (ANALYZE, COSTS OFF) " + statement, parameters)
                    plan = "\n".join(row[0] for row in result)
                    plans += ["```sql", statement.strip(), "```", "```", plan, "```", ""]
    await engine.dispose()
    await runtime.close()
    return "\n".join([*lines, "", *plans])


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tenants", type=int, default=1000)
    parser.add_argument("--predictions", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--reuse", action="store_true", help="measure the database seeded by a previous run")
    args = parser.parse_args()
    if not args.reuse:
        await fresh_database()
        engine = create_engine(f"postgresql+asyncpg://postgres@127.0.0.1:5432/{DB}", pool_size=2)
        await upgrade_to_head(engine)
        await engine.dispose()
        await seed(args.tenants, args.predictions)
    report = await measure(args.rounds, args.tenants)
    header = f"{args.tenants} tenants, {args.predictions} predictions, {args.predictions // 5} webhook deliveries, "
    header += "60 days of rollup; in-process (httpx ASGI transport), one PostgreSQL on the same 2-core machine.\n"
    OUT.write_text(report.replace("# Dashboard pages at scale\n", "# Dashboard pages at scale\n\n" + header, 1))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    asyncio.run(main())
