"""A/B of the settle's statements: submit p50 at 8 concurrent and throughput/p99 at 32, PostgreSQL, one
`vidgate serve` against the upstream simulator, variants interleaved (A B, B A, ...) on a shared machine.

    .venv/bin/python bench/experiments/lean-settle/ab.py --a /path/to/checkout-A --b /path/to/checkout-B

Each variant runs its own checkout's code (PYTHONPATH) with this checkout's virtualenv and bench plumbing
(bench/run.py), on a fresh database migrated by that variant. Writes ab.json beside this file.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import stat
import sys
from pathlib import Path
from statistics import median
from typing import Any

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from bench.run import MODEL, SMOKE, SUBMIT_BODY, Bench, VidgateDb  # noqa: E402

HERE = Path(__file__).resolve().parent


def wrapper(bench: Bench, name: str, checkout: Path) -> str:
    """A `vidgate` command that runs `checkout`'s code."""
    path = bench.workdir / f"vidgate-{name}"
    path.write_text(
        f"#!/bin/sh\nPYTHONPATH={checkout} exec {sys.executable} -c "
        '\'import sys; from app.cli import main; sys.argv[0] = "vidgate"; sys.exit(main())\' "$@"\n'
    )
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


async def cell(bench: Bench, name: str, checkout: Path, round_: int) -> dict[str, Any]:
    bench.vidgate_bin = wrapper(bench, name, checkout)
    db = VidgateDb("postgresql", await bench.fresh_postgres(f"lean_ab_{bench.db_tag}_{name}_{round_}"))
    await bench.migrate(db.url)
    sim, sim_url = await bench.start_simulator()
    server, base = await bench.start_vidgate(db, sim_url, run_worker=False)
    try:
        _, key = await bench.make_tenant(base, "bench-submit", budget_cents=10**9)
        out: dict[str, Any] = {}
        for level in (8, 32):
            await bench.wait_quiet()
            out[str(level)] = await bench.measure(
                base,
                method="POST",
                paths=[f"/api/v1/models/{MODEL}/generate"],
                auths=[f"Bearer {key}"],
                body=SUBMIT_BODY,
                concurrency=level,
                label=f"submit {name} r{round_}",
                server=server,
                cost=bench.cost_meter(server, base, db),
            )
        return out
    finally:
        bench.procs.stop(server)
        bench.procs.stop(sim)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--a", type=Path, required=True)
    parser.add_argument("--b", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=10)
    args = parser.parse_args()
    plan = dataclasses.replace(SMOKE, warmup_s=3, duration_s=args.duration, reps=1, quiet_budget_s=60)
    bench = Bench(plan, HERE, profile=False, command=" ".join(sys.argv), phases=set())
    results: dict[str, list[dict[str, Any]]] = {"A": [], "B": []}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as bench.http:
            for round_ in range(args.rounds):
                order = ("A", "B") if round_ % 2 == 0 else ("B", "A")
                for name in order:
                    results[name].append(await cell(bench, name, args.a if name == "A" else args.b, round_))
    finally:
        bench.procs.stop_all_but(None)
        await bench.drop_databases()

    def pick(name: str, level: str, field: str) -> list[float]:
        return [float(r[level][field]) for r in results[name]]

    def cost(name: str, level: str, field: str) -> list[float]:
        return [float((r[level].get("cost") or {}).get(field, float("nan"))) for r in results[name]]

    summary = {}
    for level, field in (("8", "p50"), ("32", "rps"), ("32", "p99"), ("8", "rps"), ("32", "p50")):
        a, b = pick("A", level, field), pick("B", level, field)
        ratios = [y / x for x, y in zip(a, b, strict=True)]
        summary[f"c{level} {field}"] = {"A": a, "B": b, "B/A per round": ratios, "B/A median": median(ratios)}
    for field in ("statements", "commits", "server_cpu_ms", "pg_backend_cpu_ms"):
        summary[f"c32 {field}/req"] = {"A": cost("A", "32", field), "B": cost("B", "32", field)}
    (HERE / "ab.json").write_text(json.dumps({"summary": summary, "raw": results}, indent=1, default=str))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    asyncio.run(main())
