"""Interleaved A/B of the busy cells: rounds of (quiet cells, busy cells of A, busy cells of B), the order
of A and B alternating by round, so that a neighbour's load lands on both sides alike. The quiet cells
(worker off) take the same code path on both sides and are measured once per round, with B.

    PYTHONPATH=. .venv/bin/python bench/experiments/worker-process/interleaved.py OUT_DIR ROUNDS \\
        A_VIDGATE_BIN B_VIDGATE_BIN

Each cell is the benchmark's own (bench/run.py: phase_submit at 32 for the quiet cells, phase_busy for
the busy ones). Writes OUT_DIR/interleaved.json and prints every cell and the medians.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
from pathlib import Path
from statistics import median
from typing import Any

import aiohttp

from bench import run as bench_run
from bench.cellmeter import CellMeter, Snapshot

_snapshot = CellMeter._snapshot
_close = CellMeter.close


async def _kept_snapshot(self: CellMeter, *, cpu_and_statements: bool, database: bool) -> Snapshot:
    snap = await _snapshot(self, cpu_and_statements=cpu_and_statements, database=database)
    if cpu_and_statements:
        self.last = snap  # type: ignore[attr-defined]
    return snap


async def _close_with_serving_cpu(self: CellMeter, requests: int) -> dict[str, Any]:
    """Also the CPU of the serving process alone (the tree's root: not serve's worker child), per request."""
    before = self.before
    out = await _close(self, requests)
    after = self.last  # type: ignore[attr-defined]
    pid = self.server_pid
    if pid is not None and pid in after.server_cpu and pid in before.server_cpu and requests:
        out["serving_cpu_ms"] = (after.server_cpu[pid] - before.server_cpu[pid]) * 1000 / requests
    return out


CellMeter._snapshot = _kept_snapshot  # type: ignore[method-assign]
CellMeter.close = _close_with_serving_cpu  # type: ignore[method-assign]

SETUPS = ("vidgate-postgresql", "vidgate-sqlite")


def forget_sqlite(bench: bench_run.Bench) -> None:
    """phase_submit and phase_busy reuse their SQLite file names: each cell starts from an empty file."""
    for path in bench.workdir.glob("vidgate-*.db*"):
        path.unlink()


async def rounds(bench: bench_run.Bench, n: int, sides: dict[str, str]) -> list[dict[str, Any]]:
    cells: list[dict[str, Any]] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as bench.http:
        for number in range(n):
            bench.vidgate_bin = sides["B"]
            forget_sqlite(bench)
            bench.log(f"== round {number + 1}: quiet")
            await bench.phase_submit()
            for setup in SETUPS:
                for op, phase in (("submit", "submit"), ("get", "reads")):
                    q = bench.results[phase][setup]["32"]
                    cells.append(
                        dict(
                            round=number,
                            side="quiet",
                            setup=setup,
                            op=op,
                            p99=q["p99"],
                            rps=q["rps"],
                            foreign=q["foreign_cores"],
                            cpu_ms=q.get("cost", {}).get("server_cpu_ms"),
                            serving_cpu_ms=q.get("cost", {}).get("serving_cpu_ms"),
                        )
                    )
            order = ("A", "B") if number % 2 == 0 else ("B", "A")
            for side in order:
                bench.vidgate_bin = sides[side]
                forget_sqlite(bench)
                bench.log(f"== round {number + 1}: busy {side}")
                await bench.phase_busy()
                for setup, cell in bench.results["busy"]["cells"].items():
                    for op in ("submit", "get"):
                        c = cell[op]
                        cells.append(
                            dict(
                                round=number,
                                side=side,
                                setup=setup,
                                op=op,
                                p99=c["p99"],
                                rps=c["rps"],
                                foreign=c["foreign_cores"],
                                polls_per_s=c.get("upstream_polls_per_s"),
                                cpu_ms=c.get("cost", {}).get("server_cpu_ms"),
                                serving_cpu_ms=c.get("cost", {}).get("serving_cpu_ms"),
                            )
                        )
    return cells


def main() -> int:
    out, n, a_bin, b_bin = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    out.mkdir(parents=True, exist_ok=True)
    bench_run.SETUPS = SETUPS
    plan = dataclasses.replace(bench_run.FULL, name="worker-process-interleaved", levels=(32,), read_levels=(32,))
    bench = bench_run.Bench(plan, out, False, "bench/experiments/worker-process/interleaved.py", {"submit", "busy"})
    try:
        cells = asyncio.run(rounds(bench, n, {"A": a_bin, "B": b_bin}))
    finally:
        bench.procs.stop_all()
        asyncio.run(bench.drop_databases())
    (out / "interleaved.json").write_text(json.dumps({"A": a_bin, "B": b_bin, "cells": cells}, indent=1))
    for c in cells:
        print(json.dumps(c))
    for setup in SETUPS:
        for op in ("submit", "get"):
            quiet = median(c["p99"] for c in cells if c["setup"] == setup and c["op"] == op and c["side"] == "quiet")
            for side in ("A", "B"):
                busy = [c["p99"] for c in cells if c["setup"] == setup and c["op"] == op and c["side"] == side]
                serving = [
                    c["serving_cpu_ms"]
                    for c in cells
                    if c["setup"] == setup and c["op"] == op and c["side"] == side and c.get("serving_cpu_ms")
                ]
                print(
                    f"{setup:20} {op:6} {side}: serving process CPU ms/req median "
                    f"{median(serving) if serving else float('nan'):.2f};  busy p99 median {median(busy):7.1f} ms / quiet median {quiet:7.1f} ms"
                    f" = {median(busy) / quiet:.2f}   (busy p99s {', '.join(f'{p:.0f}' for p in busy)})"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
