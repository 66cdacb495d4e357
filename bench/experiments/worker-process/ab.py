"""The busy phase of the benchmark beside its quiet cells, and nothing else, for an A/B of one code base
against another: `python -m bench`'s own phases (submit and busy), trimmed to the cells the issue 13
goal compares (submit and GET at 32 concurrent, vidgate on PostgreSQL and SQLite).

Run from the root of the checkout to measure (its `.venv` is the code under test):

    PYTHONPATH=. .venv/bin/python bench/experiments/worker-process/ab.py OUT_DIR [VIDGATE_X=Y ...]

It writes OUT_DIR/results.json (the benchmark's own format) and prints one line per cell:
p99 busy / p99 quiet, with both figures.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from bench import run as bench_run


def ratios(results: dict[str, Any]) -> list[str]:
    lines = []
    for setup, cell in results.get("busy", {}).get("cells", {}).items():
        for op, phase in (("submit", "submit"), ("get", "reads")):
            quiet = results.get(phase, {}).get(setup, {}).get("32", {})
            busy = cell.get(op, {})
            if quiet.get("p99") and busy.get("p99"):
                lines.append(
                    f"{setup:20} {op:6} busy p99 {busy['p99']:7.1f} ms / quiet {quiet['p99']:7.1f} ms = "
                    f"{busy['p99'] / quiet['p99']:.2f}  (rps {busy['rps']:.0f} vs {quiet['rps']:.0f}; "
                    f"polls/s {busy.get('upstream_polls_per_s', 0):.0f}; "
                    f"cpu ms/req {busy.get('cost', {}).get('server_cpu_ms')} vs {quiet.get('cost', {}).get('server_cpu_ms')})"
                )
    return lines


def main() -> int:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    bench_run.SETUPS = ("vidgate-postgresql", "vidgate-sqlite")
    plan = dataclasses.replace(bench_run.FULL, name="worker-process-ab", levels=(32,), read_levels=(32,))
    bench = bench_run.Bench(plan, out, False, "bench/experiments/worker-process/ab.py", {"submit", "busy"})
    for item in sys.argv[2:]:
        name, _, value = item.partition("=")
        bench.extra_vidgate_env[name] = value
    bench.results["vidgate_env"] = dict(bench.extra_vidgate_env)
    try:
        asyncio.run(bench.run())
    finally:
        bench.procs.stop_all()
        asyncio.run(bench.drop_databases())
    (out / "results.json").write_text(json.dumps(bench.results, indent=1, default=str))
    print("\n".join(ratios(bench.results)), flush=True)
    if not bench.results.get("had_errors"):
        shutil.rmtree(bench.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
