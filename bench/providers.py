"""The providers phase of `python -m bench` (issue 21): what routing among several providers costs a submit.

Two cells, PostgreSQL, one `vidgate serve` per setup (`VIDGATE_RUN_WORKER=false`), all on one database
and one simulator, measured in interleaved repetitions so drift hits every setup alike:

- **routing CPU**: submits at ROUTING_CONCURRENCY against a providers file of one provider (`vibedream`)
  and of three (`vibedream`, `wavespeed`, `fal`, routing `priority`, so the first takes every submit and
  the difference is choosing it: the candidates, their health and caps, the highest price for the hold).
  Figure: the gateway's CPU ms per submit, three over one (goal: at most 1.10).
- **failover p50**: submits one at a time against a first provider whose port refuses connections (its
  `failure_threshold` high enough that its circuit never opens, so every submit tries it first) and a
  second that serves, against the one-provider setup. Figure: the added p50 in ms.
"""

from __future__ import annotations

import asyncio
import statistics
from typing import TYPE_CHECKING, Any

from bench.cellmeter import CellMeter
from bench.loadgen import run_load
from bench.ports import free_port

if TYPE_CHECKING:
    from bench.run import Bench

ROUTING_CONCURRENCY = 8
FAILOVER_CONCURRENCY = 1
KEYS = {"BENCH_VD_KEY": "bench-vd", "BENCH_WS_KEY": "bench-ws", "BENCH_FAL_KEY": "bench-fal"}
NEVER_OPENS = 1_000_000  # failure_threshold: the refusing provider's circuit stays closed all run


def _provider(name: str, kind: str, base_url: str, key_env: str, priority: int, extra: str = "") -> str:
    return (
        f'[[providers]]\nname = "{name}"\nkind = "{kind}"\nbase_url = "{base_url}"\n'
        f'api_key_env = "{key_env}"\npriority = {priority}\n{extra}\n'
    )


def setups(sim_url: str, refused_url: str, host: str) -> dict[str, str]:
    """The providers file of each setup."""
    hosts = f'output_hosts = ["{host}"]\n'
    priced = 'cents_per_second = { "480p" = 1.8, "720p" = 3.6, "1080p" = 7.2 }\n'
    head = 'routing = "priority"\n\n'
    return {
        "one": head + _provider("vibedream", "vibedream", sim_url, "BENCH_VD_KEY", 1, hosts),
        "three": head
        + _provider("vibedream", "vibedream", sim_url, "BENCH_VD_KEY", 1, hosts)
        + _provider("wavespeed", "wavespeed", sim_url, "BENCH_WS_KEY", 2, hosts + priced)
        + _provider("fal", "fal", sim_url, "BENCH_FAL_KEY", 3, hosts + priced),
        "failover": head
        + _provider("down", "vibedream", refused_url, "BENCH_VD_KEY", 1, hosts + f"failure_threshold = {NEVER_OPENS}\n")
        + _provider("vibedream", "vibedream", sim_url, "BENCH_VD_KEY", 2, hosts),
    }


async def phase(bench: Bench) -> None:
    from bench.run import MODEL, SUBMIT_BODY, VidgateDb

    url = await bench.fresh_postgres(f"vidgate_bench_providers_{bench.db_tag}")
    await bench.migrate(url)
    sim, sim_url = await bench.start_simulator()
    refused_url = f"http://127.0.0.1:{free_port()}"  # nothing listens there: every connection is refused
    servers: dict[str, Any] = {}
    try:
        bases: dict[str, str] = {}

        async def start(name: str, text: str) -> None:
            path = bench.workdir / f"providers-{name}.toml"
            path.write_text(text)
            db = VidgateDb(f"providers-{name}", url)
            servers[name], bases[name] = await bench.start_vidgate(
                db, sim_url, run_worker=False, env={"VIDGATE_PROVIDERS_FILE": str(path), **KEYS}
            )

        # Side by side: the processes' start-up is most of this phase's time in a smoke run.
        files = setups(sim_url, refused_url, sim_url.removeprefix("http://"))
        await asyncio.gather(*(start(name, text) for name, text in files.items()))
        _, key = await bench.make_tenant(bases["one"], "bench-providers", budget_cents=10**9)
        auth = f"Bearer {key}"
        for name in servers:  # the failover setup answers too (through its second provider)
            ids = await bench.submit_many(bases[name], auth, 4, 2)
            assert len(ids) == 4
        out: dict[str, Any] = {}
        for cell, names, concurrency in (
            ("routing", ("one", "three"), ROUTING_CONCURRENCY),
            ("failover", ("one", "failover"), FAILOVER_CONCURRENCY),
        ):
            out[cell] = await _interleaved(bench, servers, bases, names, concurrency, auth, MODEL, SUBMIT_BODY)
            for name in names:
                x = out[cell][name]
                bench.log(
                    f"  {cell} {name:<9} c={concurrency:<2} {x['rps']:7.0f} req/s  p50 {x['p50']:6.2f} ms  "
                    f"gateway CPU {x['server_cpu_ms']:.3f} ms/submit  errors {x['errors']}"
                )
        out["routing"]["ratio"] = out["routing"]["three"]["server_cpu_ms"] / out["routing"]["one"]["server_cpu_ms"]
        out["failover"]["added_p50_ms"] = out["failover"]["failover"]["p50"] - out["failover"]["one"]["p50"]
        bench.log(f"  routing CPU, three providers / one: {out['routing']['ratio']:.3f} (goal <= 1.10)")
        bench.log(f"  failover added p50: {out['failover']['added_p50_ms']:.2f} ms")
        bench.results["providers"] = out
    finally:
        for proc in servers.values():
            bench.procs.stop(proc)
        bench.procs.stop(sim)


async def _interleaved(
    bench: Bench,
    servers: dict[str, Any],
    bases: dict[str, str],
    names: tuple[str, ...],
    concurrency: int,
    auth: str,
    model: str,
    body: str,
) -> dict[str, Any]:
    plan = bench.plan
    common: dict[str, Any] = dict(
        method="POST",
        paths=[f"/api/v1/models/{model}/generate"],
        auths=[auth],
        body=body,
        concurrency=concurrency,
        workdir=bench.workdir,
    )
    for name in names:
        await run_load(bases[name], duration_s=plan.warmup_s, **common)
    await bench.wait_quiet()
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for _ in range(plan.reps):
        for name in names:
            meter = CellMeter(server_pid=servers[name].pid, http=bench.http)
            await meter.open()
            load = await run_load(bases[name], duration_s=plan.duration_s, **common)
            cost = await meter.close(load.requests)
            runs[name].append({**load.as_dict(), "server_cpu_ms": cost.get("server_cpu_ms")})
    return {
        name: {
            "rps": statistics.median(r["rps"] for r in rows),
            "p50": statistics.median(r["p50"] for r in rows),
            "p99": statistics.median(r["p99"] for r in rows),
            "server_cpu_ms": statistics.median(r["server_cpu_ms"] for r in rows),
            "errors": sum(int(r["errors"]) for r in rows),
            "concurrency": concurrency,
            "runs": rows,
        }
        for name, rows in runs.items()
    }


def section(r: dict[str, Any], w: Any) -> None:
    """The report's section (bench/report.py)."""
    p = r.get("providers")
    if not p:
        return
    w("## Providers (issue 21)")
    w("")
    w(
        "PostgreSQL, one `vidgate serve` per providers file, all on one database and simulator, repetitions "
        "interleaved (medians). *routing*: one provider against three (`vibedream`, `wavespeed`, `fal`, routing "
        "`priority`: the first takes every submit, so the difference is choosing it). *failover*: the first provider's "
        "port refuses connections (its circuit never opens), so every submit moves on to the second."
    )
    w("")
    w("| cell | providers file | concurrency | req/s | p50 ms | p99 ms | gateway CPU ms/submit | errors |")
    w("|---|---|---|---|---|---|---|---|")
    for cell in ("routing", "failover"):
        for name, x in p.get(cell, {}).items():
            if isinstance(x, dict):
                w(
                    f"| {cell} | {name} | {x['concurrency']} | {x['rps']:.0f} | {x['p50']:.2f} | {x['p99']:.2f} | "
                    f"{x['server_cpu_ms']:.3f} | {x['errors']} |"
                )
    w("")
    ratio = p.get("routing", {}).get("ratio")
    added = p.get("failover", {}).get("added_p50_ms")
    if ratio is not None:
        verdict = "met" if ratio <= 1.10 else "**missed**"
        w(f"- Submit CPU with three providers over one: **{ratio:.3f}** (goal at most 1.10: {verdict}).")
    if added is not None:
        w(f"- Added p50 of a failover past a provider that refuses connections: **{added:.2f} ms**.")
    w("")
