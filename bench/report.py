"""bench/results.md and the PNG charts, from the results of one run."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

from bench import providers

SETUP_COLORS = {"direct": "#4c72b0", "floor": "#55a868", "vidgate-sqlite": "#dd8452", "vidgate-postgresql": "#c44e52"}


def _f(value: Any, digits: int = 1, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}{unit}"
    return f"{value:,}{unit}"


def _ratio(a: Any, b: Any) -> float | None:
    if a is None or b is None or not b:
        return None
    return float(a) / float(b)


def _get(d: dict[str, Any], *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def recommended_workers(r: dict[str, Any]) -> int | None:
    """The `--workers N` the sweep recommends (best PostgreSQL submit throughput at 32), if it ran."""
    n = _get(r, "workers", "recommended")
    return int(n) if n is not None else None


def pg_cell_32(r: dict[str, Any], op: str) -> tuple[dict[str, Any] | None, int]:
    """PostgreSQL's cell at 32 concurrent (op "submit" or "get") with the recommended number of processes,
    or the submit phase's one-process cell when the sweep did not run (as in runs before issue 13)."""
    n = recommended_workers(r)
    if n is not None:
        cell = _get(r, "workers", "cells", str(n), op)
        if cell:
            return cell, n
    return _get(r, "submit" if op == "submit" else "reads", "vidgate-postgresql", "32"), 1


def goals(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 13's goals, then issue 6's polling and webhook goals, each with the measured value and whether it was met."""
    rows: list[dict[str, Any]] = []

    def add(goal: str, value: Any, text: str, target: str, ok: bool | None) -> None:
        rows.append({"goal": goal, "value": value, "measured": text, "target": target, "met": ok})

    floor32 = _get(r, "submit", "floor", "32", "rps")
    pg_submit, n = pg_cell_32(r, "submit")
    pg_get, _ = pg_cell_32(r, "get")
    one = _get(r, "submit", "vidgate-postgresql", "32", "rps")
    share = _ratio(_get(pg_submit or {}, "rps"), floor32)
    add(
        f"Submit throughput vidgate-postgresql (`--workers {n}`, recommended) / floor at 32 concurrent",
        share,
        f"{_f(share, 2)} (one process: {_f(_ratio(one, floor32), 2)})",
        "≥ 0.5",
        None if share is None else share >= 0.5,
    )
    share = _ratio(_get(r, "submit", "vidgate-sqlite", "32", "rps"), floor32)
    add(
        "Submit throughput vidgate-sqlite (one process) / floor at 32 concurrent",
        share,
        _f(share, 2),
        "≥ 0.25",
        None if share is None else share >= 0.25,
    )
    for db in ("postgresql", "sqlite"):
        setup = f"vidgate-{db}"
        added = _sub(_get(r, "submit", setup, "8", "p50"), _get(r, "submit", "direct", "8", "p50"))
        add(
            f"Added p50 latency over direct at 8 concurrent ({setup}, one process)",
            added,
            _f(added, 2, " ms"),
            "≤ 3 ms",
            None if added is None else added <= 3,
        )
    direct99 = _get(r, "submit", "direct", "32", "p99")
    for setup, cell, label in (
        ("vidgate-postgresql", pg_submit, f"`--workers {n}`"),
        ("vidgate-sqlite", _get(r, "submit", "vidgate-sqlite", "32"), "one process"),
    ):
        p99 = _get(cell or {}, "p99")
        add(
            f"Submit p99 latency at 32 concurrent ({setup}, {label}) [added over direct]",
            p99,
            f"{_f(p99, 1, ' ms')} [{_f(_sub(p99, direct99), 1, ' ms')}]",
            "≤ 25 ms (the p99 itself)",
            None if p99 is None else p99 <= 25,
        )
    floor_get = _get(r, "reads", "floor", "32", "rps")
    for setup, cell, label in (
        ("vidgate-postgresql", pg_get, f"`--workers {n}`"),
        ("vidgate-sqlite", _get(r, "reads", "vidgate-sqlite", "32"), "one process"),
    ):
        share = _ratio(_get(cell or {}, "rps"), floor_get)
        add(
            f"GET /api/v1/predictions/{{id}} throughput {setup} ({label}) / floor's GET at 32",
            share,
            _f(share, 2),
            "≥ 0.5",
            None if share is None else share >= 0.5,
        )
    busy = _get(r, "busy", "cells") or {}
    for setup, cell in busy.items():
        for op, quiet in (
            ("submit", _get(r, "submit", setup, "32", "p99")),
            ("get", _get(r, "reads", setup, "32", "p99")),
        ):
            p99 = _get(cell, op, "p99")
            ratio = _ratio(p99, quiet)
            add(
                f"{'Submit' if op == 'submit' else 'GET'} p99 at 32 with the worker polling "
                f"{cell.get('polled_predictions'):,} predictions / quiet ({setup})",
                ratio,
                f"{_f(ratio, 2)} ({_f(p99, 1, ' ms')} vs {_f(quiet, 1, ' ms')})",
                "≤ 1.5",
                None if ratio is None else ratio <= 1.5,
            )
    c = r.get("contention") or {}
    spread = next((v for k, v in c.items() if k != "one tenant"), None)
    ratio = _ratio(_get(c, "one tenant", "rps"), _get(spread or {}, "rps"))
    add(
        "One tenant taking all the load / 32 tenants sharing it (PostgreSQL, submit at 32)",
        ratio,
        _f(ratio, 2),
        "≥ 0.8",
        None if ratio is None else ratio >= 0.8,
    )
    p = r.get("polling")
    if p:
        add(
            "(issue 6) Polling: upstream polls per prediction (max over all predictions)",
            p["polls_max"],
            f"max {p['polls_max']}, mean {_f(p['polls_mean'], 2)}; {p['polls_over_allowed']} over the limit",
            f"≤ schedule + 1 = {p['allowed_polls']}",
            None if p["polls_max"] is None else p["polls_max"] <= p["allowed_polls"],
        )
        add(
            "(issue 6) Polling: poll lag p99 (vidgate_poll_lag_seconds)",
            p["poll_lag_p99"],
            _f(p["poll_lag_p99"], 2, " s"),
            "≤ 0.5 s",
            None if p["poll_lag_p99"] is None else p["poll_lag_p99"] <= 0.5,
        )
        limit = p["poll_interval_s"] + 1
        add(
            "(issue 6) Polling: notification lag p99, upstream completion → webhook received",
            p["notify_e2e_p99"],
            _f(p["notify_e2e_p99"], 2, " s")
            + f" (gateway histogram, terminal seen → delivered: {_f(p['notify_metric_p99'], 2, ' s')})",
            f"≤ poll interval + 1 s = {limit:g} s",
            None if _nan(p["notify_e2e_p99"]) else p["notify_e2e_p99"] <= limit,
        )
        add(
            "(issue 6) Polling: peak RSS of the gateway (VmHWM)",
            p["peak_rss_mb"],
            _f(p["peak_rss_mb"], 0, " MB"),
            "≤ 300 MB",
            None if not p["peak_rss_mb"] else p["peak_rss_mb"] <= 300,
        )
    w = r.get("webhooks")
    if w:
        a = w.get("healthy only", {}).get("rate")
        b = w.get("with a black hole", {}).get("rate")
        add(
            "(issue 6) Webhook deliveries per second to local receivers",
            a,
            _f(a, 0, "/s"),
            "≥ 500/s",
            None if _nan(a) else a >= 500,
        )
        ratio = _ratio(b, a)
        add(
            "(issue 6) Healthy receivers' rate with one receiver that never answers, vs without",
            ratio,
            f"{_f(ratio, 2)} ({_f(b, 0, '/s')} vs {_f(a, 0, '/s')})",
            "≥ 0.90 (drop ≤ 10 %)",
            None if ratio is None else ratio >= 0.9,
        )
    return rows


def lean_goals(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 25's goals: one process, against the floor of the same run; per submit, what it cost the
    gateway and PostgreSQL, and the statements and commits it took."""
    rows: list[dict[str, Any]] = []

    def add(goal: str, value: Any, text: str, target: str, ok: bool | None) -> None:
        rows.append({"goal": goal, "value": value, "measured": text, "target": target, "met": ok})

    floor32 = _get(r, "submit", "floor", "32", "rps")
    pg32 = _get(r, "submit", "vidgate-postgresql", "32") or {}
    share = _ratio(pg32.get("rps"), floor32)
    add(
        "PostgreSQL submit / floor at 32 concurrent (one process)",
        share,
        f"{_f(share, 2)} ({_f(pg32.get('rps'), 0, '/s')} vs {_f(floor32, 0, '/s')})",
        "≥ 0.35 (stretch 0.5)",
        None if share is None else share >= 0.35,
    )
    added = _sub(_get(r, "submit", "vidgate-postgresql", "8", "p50"), _get(r, "submit", "direct", "8", "p50"))
    add(
        "PostgreSQL submit: added p50 over direct at 8 concurrent",
        added,
        _f(added, 2, " ms"),
        "≤ 6 ms",
        None if added is None else added <= 6,
    )
    p99 = pg32.get("p99")
    add("PostgreSQL submit p99 at 32 concurrent", p99, _f(p99, 1, " ms"), "≤ 30 ms", None if p99 is None else p99 <= 30)
    share = _ratio(_get(r, "submit", "vidgate-sqlite", "32", "rps"), floor32)
    add(
        "SQLite submit / floor at 32 concurrent (one process)",
        share,
        _f(share, 2),
        "≥ 0.25",
        None if share is None else share >= 0.25,
    )
    share = _ratio(_get(r, "reads", "vidgate-postgresql", "32", "rps"), _get(r, "reads", "floor", "32", "rps"))
    add(
        "PostgreSQL GET of a prediction / floor's GET at 32 concurrent (one process)",
        share,
        _f(share, 2),
        "≥ 0.5",
        None if share is None else share >= 0.5,
    )
    for level in ("8", "32"):
        cell = _get(r, "submit", "vidgate-postgresql", level) or {}
        cpu, pg = _cost(cell, "server_cpu_ms"), _cost(cell, "pg_backend_cpu_ms")
        add(
            f"PostgreSQL submit at {level}: gateway CPU per submit",
            cpu,
            _f(cpu, 3, " ms"),
            "≤ 0.45 ms",
            None if cpu is None else cpu <= 0.45,
        )
        add(
            f"PostgreSQL submit at {level}: PostgreSQL CPU per submit (its backends)",
            pg,
            _f(pg, 3, " ms"),
            "≤ 0.2 ms",
            None if pg is None else pg <= 0.2,
        )
    for setup in ("vidgate-postgresql", "vidgate-sqlite"):
        for level in ("8", "32"):
            cell = _get(r, "submit", setup, level) or {}
            statements, commits = _cost(cell, "statements"), _cost(cell, "commits")
            add(
                f"{setup} submit at {level}: statements / commits per submit",
                statements,
                f"{_f(statements, 2)} / {_f(commits, 2)}",
                "reported",
                None,
            )
    return rows


def _nan(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _sub(a: Any, b: Any) -> float | None:
    return None if a is None or b is None else float(a) - float(b)


def _errors(c: dict[str, Any]) -> str:
    text = str(c.get("errors", 0))
    if c.get("server_5xx"):
        text += f" (+{c['server_5xx']} 5xx answers in vidgate's log)"
    return text


def _met(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**missed**")


def _black_hole_ratio(r: dict[str, Any]) -> float | None:
    return _ratio(_get(r, "webhooks", "with a black hole", "rate"), _get(r, "webhooks", "healthy only", "rate"))


# (what, how to read it from a results.json, unit, digits, whether higher is better)
def _cost(cell: dict[str, Any] | None, key: str) -> Any:
    return _get(cell or {}, "cost", key)


BEFORE_AFTER: list[tuple[str, Any, str, int, bool]] = [
    (
        "submit share of floor, vidgate-postgresql with the recommended N (before: one process), c=32",
        lambda r: _ratio(_get(pg_cell_32(r, "submit")[0] or {}, "rps"), _get(r, "submit", "floor", "32", "rps")),
        "",
        3,
        True,
    ),
    (
        "submit p99 ms, vidgate-postgresql with the recommended N (before: one process), c=32",
        lambda r: _get(pg_cell_32(r, "submit")[0] or {}, "p99"),
        "",
        0,
        False,
    ),
    (
        "GET share of the floor's GET, vidgate-postgresql with the recommended N, c=32",
        lambda r: _ratio(_get(pg_cell_32(r, "get")[0] or {}, "rps"), _get(r, "reads", "floor", "32", "rps")),
        "",
        3,
        True,
    ),
    (
        "submit share of floor, vidgate-sqlite, c=32",
        lambda r: _ratio(_get(r, "submit", "vidgate-sqlite", "32", "rps"), _get(r, "submit", "floor", "32", "rps")),
        "",
        3,
        True,
    ),
    (
        "gateway CPU ms per submit, vidgate-postgresql, one process, c=32",
        lambda r: _cost(_get(r, "submit", "vidgate-postgresql", "32"), "server_cpu_ms"),
        "",
        2,
        False,
    ),
    (
        "PostgreSQL backend CPU ms per submit, one process, c=32",
        lambda r: _cost(_get(r, "submit", "vidgate-postgresql", "32"), "pg_backend_cpu_ms"),
        "",
        2,
        False,
    ),
    (
        "statements per submit (PostgreSQL, one process, c=32)",
        lambda r: _cost(_get(r, "submit", "vidgate-postgresql", "32"), "statements"),
        "",
        2,
        False,
    ),
    (
        "submit req/s, vidgate-postgresql one process, c=32",
        lambda r: _get(r, "submit", "vidgate-postgresql", "32", "rps"),
        "",
        0,
        True,
    ),
    (
        "submit share of floor, vidgate-postgresql one process, c=32",
        lambda r: _ratio(_get(r, "submit", "vidgate-postgresql", "32", "rps"), _get(r, "submit", "floor", "32", "rps")),
        "",
        3,
        True,
    ),
    (
        "submit p50 ms, vidgate-postgresql, c=1",
        lambda r: _get(r, "submit", "vidgate-postgresql", "1", "p50"),
        "",
        2,
        False,
    ),
    (
        "submit p50 ms, vidgate-postgresql, c=8",
        lambda r: _get(r, "submit", "vidgate-postgresql", "8", "p50"),
        "",
        1,
        False,
    ),
    (
        "submit p99 ms, vidgate-postgresql one process, c=32",
        lambda r: _get(r, "submit", "vidgate-postgresql", "32", "p99"),
        "",
        0,
        False,
    ),
    ("submit req/s, vidgate-sqlite, c=32", lambda r: _get(r, "submit", "vidgate-sqlite", "32", "rps"), "", 0, True),
    ("submit p99 ms, vidgate-sqlite, c=32", lambda r: _get(r, "submit", "vidgate-sqlite", "32", "p99"), "", 0, False),
    ("submit p99 ms, vidgate-sqlite, c=128", lambda r: _get(r, "submit", "vidgate-sqlite", "128", "p99"), "", 0, False),
    ("GET req/s, vidgate-postgresql, c=32", lambda r: _get(r, "reads", "vidgate-postgresql", "32", "rps"), "", 0, True),
    (
        "GET share of the simulator's GET, vidgate-postgresql, c=32",
        lambda r: _ratio(_get(r, "reads", "vidgate-postgresql", "32", "rps"), _get(r, "reads", "direct", "32", "rps")),
        "",
        3,
        True,
    ),
    ("GET req/s, vidgate-sqlite, c=32", lambda r: _get(r, "reads", "vidgate-sqlite", "32", "rps"), "", 0, True),
    ("contention: one tenant req/s, c=32", lambda r: _get(r, "contention", "one tenant", "rps"), "", 0, True),
    ("polling: submits/s while filling 10k in flight", lambda r: _get(r, "polling", "submit_rps"), "", 0, True),
    ("polling: poll lag p99 s", lambda r: _get(r, "polling", "poll_lag_p99"), "", 2, False),
    ("polling: notification lag p99 s", lambda r: _get(r, "polling", "notify_e2e_p99"), "", 2, False),
    ("polling: peak RSS MB", lambda r: _get(r, "polling", "peak_rss_mb"), "", 0, False),
    ("webhooks/s, healthy receivers", lambda r: _get(r, "webhooks", "healthy only", "rate"), "", 0, True),
    ("webhooks: healthy rate with a black hole / without", _black_hole_ratio, "", 2, True),
]


def _before_after_section(r: dict[str, Any], before: dict[str, Any] | None, w: Any) -> None:
    if not before:
        return
    bmeta = before.get("meta", {})
    w("## Before and after")
    w("")
    w(
        f"*Before* is the run of git {bmeta.get('git')} ({bmeta.get('date')}, `{bmeta.get('command')}`), the "
        "results.json given with `--before` (by default `bench/before/results.json`, the run committed before issue "
        "13). *After* is this run. Both ran on this machine with the same plan; the shares against the floor and the "
        "simulator are measured within each run, so they are the fairest comparison on a shared machine. Phases this "
        "run did not measure, and costs the before run did not record, show n/a."
    )
    w("")
    w("| metric | before | after | after / before |")
    w("|---|---|---|---|")
    for label, read, unit, digits, higher in BEFORE_AFTER:
        old, new = read(before), read(r)
        change = _ratio(new, old)
        mark = ""
        if change is not None and abs(change - 1.0) > 0.05:
            mark = " (better)" if (change > 1.0) == higher else " (worse)"
        w(f"| {label} | {_f(old, digits, unit)} | {_f(new, digits, unit)} | {_f(change, 2, 'x')}{mark} |")
    w("")


def write(r: dict[str, Any], out: Path, *, smoke: bool, before: dict[str, Any] | None = None) -> None:
    charts = _charts(r, out)
    meta = r.get("meta", {})
    plan = r.get("plan", {})
    lines: list[str] = []
    w = lines.append
    w("# vidgate benchmark results")
    w("")
    w(
        f"Generated by `{meta.get('command', 'python -m bench')}` on {meta.get('date', '?')}; the whole run took "
        f"{_f(r.get('timings', {}).get('total'), 0, ' s')}. Do not edit by hand: rerun the command."
    )
    if smoke:
        w("")
        w(
            "> **Smoke mode**: tiny runs that only prove the benchmark works. These numbers mean nothing; run `python -m bench` for real ones."
        )
    noisy = r.get("max_foreign_cores") or 0.0
    if noisy > 0.25:
        w("")
        w(
            f"> **Shared machine**: other processes (not started by the benchmark) used up to {noisy:.2f} of the {meta.get('cores')} cores "
            "during some measurements (column *other CPU*); the run waited "
            f"{_f(r.get('quiet_waited_s', 0.0), 0, ' s')} for quiet. Rows with more than 0.25 cores of other load are less trustworthy."
        )
    for phase, why in (r.get("failed_phases") or {}).items():
        w("")
        w(f"> **Phase `{phase}` did not complete**: {why}")
    if r.get("profiles"):
        w("")
        w(
            "> **Profiled run**: py-spy was sampling the gateway during some measurements, so those numbers are slightly perturbed."
        )
    w("")
    w("## Machine and versions")
    w("")
    w("| | |")
    w("|---|---|")
    w(f"| cores | {meta.get('cores')} ({meta.get('cpu_model')}), {meta.get('memory_gib')} GiB |")
    w(f"| kernel | {meta.get('kernel')} |")
    w(f"| Python | {meta.get('python')} |")
    w(f"| databases | {meta.get('postgresql')} (same machine); SQLite {meta.get('sqlite')} |")
    w(f"| load generator | {meta.get('wrk')} |")
    changed = meta.get("app_digest_end") and meta.get("app_digest_end") != meta.get("app_digest")
    w(
        f"| vidgate | git {meta.get('git')}; code digest {meta.get('app_digest')}"
        + (f" → **{meta.get('app_digest_end')}: app/ changed on disk during the run**" if changed else "")
        + " |"
    )
    if r.get("vidgate_env"):
        w("| settings changed for this run | " + ", ".join(f"`{k}={v}`" for k, v in r["vidgate_env"].items()) + " |")
    pk = meta.get("packages", {})
    w("| packages | " + ", ".join(f"{k} {v}" for k, v in pk.items()) + " |")
    w("")
    w("## Goals (issue 25: a lean hot path, one process)")
    w("")
    w(
        "One gateway process against the floor of the same run. Statements per submit are PostgreSQL's "
        "(pg_stat_statements) when it preloads that extension, else the gateway's own count "
        "(`vidgate_db_statements_total`); commits are PostgreSQL's (`pg_stat_database`), read-only autocommit "
        "reads included."
    )
    w("")
    w("| goal | measured | target | result |")
    w("|---|---|---|---|")
    for g in lean_goals(r):
        w(f"| {g['goal']} | {g['measured']} | {g['target']} | {_met(g['met'])} |")
    w("")
    w("## Goals (issue 13, and issue 6's polling and webhook goals)")
    w("")
    w(
        "PostgreSQL's throughput, p99 and GET goals use the number of processes the `--workers` sweep recommends "
        "(best submit throughput at 32, measured in the workers phase); SQLite runs one process. The floor's figures "
        "come from the submit phase of the same run."
    )
    w("")
    w("| goal | measured | target | result |")
    w("|---|---|---|---|")
    for g in goals(r):
        w(f"| {g['goal']} | {g['measured']} | {g['target']} | {_met(g['met'])} |")
    w("")
    _before_after_section(r, None if smoke else before, w)
    w("## How it was measured")
    w("")
    w(
        "- Everything runs on this one machine, on loopback, started by the command: the upstream simulator (`vidgate simulator`, an aiohttp server, "
        "its own process), the **floor** proxy (`bench/floor.py`: aiohttp server + the fastest client measured below, no database, no parsing), "
        "vidgate (`vidgate serve`, one process) on SQLite and on PostgreSQL, receivers for webhooks (`bench/receiver.py`). With 2 cores, "
        "the load generator, the simulator, the server under test and PostgreSQL share the CPU; every setup pays that alike."
    )
    w(
        f"- Load: {meta.get('wrk')} with a generated Lua script (`bench/loadgen.py`), one thread, closed loop, "
        f"concurrency {', '.join(map(str, plan.get('levels', [])))}; each cell starts **fresh server processes**, runs a "
        f"{plan.get('warmup_s')} s warm-up that is thrown away, then {plan.get('reps')} measured runs of {plan.get('duration_s')} s; "
        "tables show the **median** of the runs (throughput counts only 2xx answers; the error column counts non-2xx, timeouts and socket "
        "errors seen by wrk, plus the 5xx answers vidgate's own access log recorded, which also catches requests still hanging when a run "
        "ended). Before each cell the run waits (within a bounded budget) until processes outside the benchmark leave the CPU alone; "
        "*other CPU* is how many cores such processes still used during the measured runs."
    )
    w(
        '- Submit body: `{"image": "https://example.com/cat.png", "prompt": ..., "resolution": "480p", "duration": 5}`. '
        "vidgate runs the full path with `VIDGATE_RUN_WORKER=false`: key check, validation, rate/concurrency/budget reservation "
        "(the tenant has a budget of 10^9 cents, so the conditional UPDATE really compares), ledger rows, the upstream call, the settle "
        "transaction. Tenants and keys are made through the operator API over HTTP."
    )
    w("- Direct and floor send the vendor key; vidgate gets the tenant's `vg_` key and forwards with the vendor key.")
    w("")
    _clients_section(r, w, charts)
    _submit_section(r, w, charts)
    _reads_section(r, w)
    _workers_section(r, w)
    _busy_section(r, w)
    _cost_section(r, w)
    _server_timing_section(r, w)
    _contention_section(r, w)
    _scopes_section(r, w)
    _polling_section(r, w, charts)
    _webhooks_section(r, w)
    providers.section(r, w)
    _profiles_section(r, w)
    w("## Raw data")
    w("")
    w(
        "Every run's numbers (each repetition, every percentile) are in `results.json` next to this file. Phase durations: "
        + ", ".join(f"{k} {_f(v, 0, ' s')}" for k, v in r.get("timings", {}).items())
        + "."
    )
    w("")
    (out / "results.md").write_text("\n".join(lines))


def _clients_section(r: dict[str, Any], w: Any, charts: dict[str, str]) -> None:
    rows = r.get("clients")
    if not rows:
        return
    w("## HTTP clients (which one the floor and vidgate should use)")
    w("")
    w(
        "Each client in a process of its own sends submits to the simulator with N concurrent tasks "
        "(`bench/clients.py`), warm-up excluded, median of the repetitions. The floor proxy uses the one with the best throughput at the "
        f"highest concurrency: **{r.get('floor_client')}**. vidgate uses aiohttp (`app/core/http.py`)."
    )
    w("")
    levels = sorted({x["concurrency"] for x in rows})
    base = {x["concurrency"]: x.get("rps") for x in rows if x["client"] == "aiohttp"}
    w("| client | " + " | ".join(f"c={c} req/s | vs aiohttp | p50 ms | p99 ms" for c in levels) + " | other CPU |")
    w("|---|" + "---|---|---|---|" * len(levels) + "---|")
    for name in dict.fromkeys(x["client"] for x in rows):
        cells = []
        for c in levels:
            x = next((y for y in rows if y["client"] == name and y["concurrency"] == c), None)
            if x is None or "rps" not in x:
                cells.append("failed | | | ")
                continue
            cells.append(
                f"{_f(x['rps'], 0)} | {_f(_ratio(x['rps'], base.get(c)), 2)} | {_f(x['p50'], 2)} | {_f(x['p99'], 2)}"
            )
        desc = next((y.get("description", "") for y in rows if y["client"] == name), "")
        other = max((y.get("foreign_cores") or 0.0 for y in rows if y["client"] == name), default=0.0)
        cells.append(_f(other, 2))
        ver = next((y.get("version", "") for y in rows if y["client"] == name), "")
        w(f"| {name} {ver} ({desc}) | " + " | ".join(cells) + " |")
    w("")
    if "clients" in charts:
        w(f"![clients]({charts['clients']})")
        w("")


def _submit_section(r: dict[str, Any], w: Any, charts: dict[str, str]) -> None:
    sub = r.get("submit")
    if not sub:
        return
    w("## Submit: `POST /api/v1/models/ltx-2-19b/generate`")
    w("")
    w(
        f"Floor proxy client: {r.get('floor_client_used')}. Shares are against the baselines of the same run and concurrency."
    )
    w("")
    w(
        "| concurrency | setup | req/s | share of floor | share of direct | p50 ms | p90 ms | p99 ms | added p50 vs direct | added p99 vs direct | peak RSS MB | errors | other CPU |"
    )
    w("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    levels = sorted({int(k) for s in sub.values() for k in s}, key=int)
    for level in levels:
        d = sub.get("direct", {}).get(str(level), {})
        f = sub.get("floor", {}).get(str(level), {})
        for setup, cells in sub.items():
            c = cells.get(str(level))
            if not c:
                continue
            rss = c.get("rss_kb")
            w(
                f"| {level} | {setup} | {_f(c['rps'], 0)} | {_f(_ratio(c['rps'], f.get('rps')), 2)} | {_f(_ratio(c['rps'], d.get('rps')), 2)} | "
                f"{_f(c['p50'], 2)} | {_f(c['p90'], 2)} | {_f(c['p99'], 2)} | {_f(_sub(c['p50'], d.get('p50')), 2)} | "
                f"{_f(_sub(c['p99'], d.get('p99')), 2)} | {_f(rss / 1024 if rss else None, 0)} | {_errors(c)} | {_f(c.get('foreign_cores'), 2)} |"
            )
    w("")
    for key in ("throughput", "latency"):
        if key in charts:
            w(f"![{key}]({charts[key]})")
            w("")


def _reads_section(r: dict[str, Any], w: Any) -> None:
    reads = r.get("reads")
    if not reads or not any(reads.values()):
        return
    w("## Reads: `GET /api/v1/predictions/{id}`")
    w("")
    w(
        "64 predictions made in the same cell, read round-robin. The simulator's own GET (direct) is the baseline; vidgate reads its "
        "database (key check + one SELECT), never the upstream."
    )
    w("")
    w("| concurrency | setup | req/s | share of simulator GET | p50 ms | p99 ms | errors | other CPU |")
    w("|---|---|---|---|---|---|---|---|")
    levels = sorted({int(k) for s in reads.values() for k in s})
    for level in levels:
        d = reads.get("direct", {}).get(str(level), {})
        for setup, cells in reads.items():
            c = cells.get(str(level))
            if c:
                w(
                    f"| {level} | {setup} | {_f(c['rps'], 0)} | {_f(_ratio(c['rps'], d.get('rps')), 2)} | {_f(c['p50'], 2)} | {_f(c['p99'], 2)} | {_errors(c)} | {_f(c.get('foreign_cores'), 2)} |"
                )
    w("")


def _workers_section(r: dict[str, Any], w: Any) -> None:
    sweep = r.get("workers")
    if not sweep:
        return
    floor = _get(r, "submit", "floor", "32", "rps")
    floor_get = _get(r, "reads", "floor", "32", "rps")
    w("## Processes: `vidgate serve --workers N` (PostgreSQL, 32 concurrent)")
    w("")
    w(
        f"Each N in fresh processes, submit then GET, measured in one phase so the rows compare with each other; shares against the "
        f"floor of the submit phase. **Recommended: `--workers {sweep['recommended']}`** (the best submit throughput "
        f"on this machine's {r.get('meta', {}).get('cores')} cores)."
    )
    w("")
    w(
        "| N | submit req/s | share of floor | p50 ms | p99 ms | gateway CPU ms/submit | PostgreSQL CPU ms/submit | hold batch mean | GET req/s | share of floor's GET | GET p99 ms | errors |"
    )
    w("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n, cell in sweep["cells"].items():
        sub, get = cell.get("submit") or {}, cell.get("get") or {}
        hold = _get(sub, "cost", "batches", "hold") or {}
        w(
            f"| {n} | {_f(sub.get('rps'), 0)} | {_f(_ratio(sub.get('rps'), floor), 2)} | {_f(sub.get('p50'), 2)} | "
            f"{_f(sub.get('p99'), 1)} | {_f(_cost(sub, 'server_cpu_ms'), 2)} | {_f(_cost(sub, 'pg_backend_cpu_ms'), 2)} | "
            f"{_f(hold.get('mean'), 1)} | {_f(get.get('rps'), 0)} | {_f(_ratio(get.get('rps'), floor_get), 2)} | "
            f"{_f(get.get('p99'), 1)} | {_errors(sub)} / {_errors(get)} |"
        )
    w("")


def _busy_section(r: dict[str, Any], w: Any) -> None:
    busy = r.get("busy")
    if not busy or not busy.get("cells"):
        return
    w("## With the worker on: submit and GET while predictions are polled (32 concurrent, one process)")
    w("")
    w(
        "A fresh database and `vidgate serve` with its embedded worker; predictions are submitted first and announce an "
        f"`estimatedTime` of a second, so the worker polls each of them every {busy.get('poll_interval_s')} s (the simulator "
        "completes them only after an hour); the measurement starts once every one of them has been polled. The load's own "
        "submits announce an hour, so the polled set does not grow during the cell. *Quiet* is the same cell of the submit "
        "phase (worker off, nothing polled)."
    )
    w("")
    w(
        "| setup | request | polled predictions | upstream polls/s meanwhile | req/s (quiet) | p50 ms (quiet) | p99 ms (quiet) | p99 / quiet | errors |"
    )
    w("|---|---|---|---|---|---|---|---|---|")
    for setup, cell in busy["cells"].items():
        for op, quiet in (("submit", _get(r, "submit", setup, "32")), ("get", _get(r, "reads", setup, "32"))):
            c = cell.get(op)
            if not c:
                continue
            q = quiet or {}
            w(
                f"| {setup} | {'submit' if op == 'submit' else 'GET'} | {cell.get('polled_predictions'):,} | "
                f"{_f(c.get('upstream_polls_per_s'), 0)} | {_f(c['rps'], 0)} ({_f(q.get('rps'), 0)}) | "
                f"{_f(c['p50'], 2)} ({_f(q.get('p50'), 2)}) | {_f(c['p99'], 1)} ({_f(q.get('p99'), 1)}) | "
                f"{_f(_ratio(c['p99'], q.get('p99')), 2)} | {_errors(c)} |"
            )
    w("")


def _cost_rows(r: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    rows: list[tuple[str, dict[str, Any]]] = []
    for phase, op in (("submit", "submit"), ("reads", "GET")):
        for setup, cells in (r.get(phase) or {}).items():
            for level in sorted(cells, key=int):
                if cells[level].get("cost"):
                    rows.append((f"{op} {setup} c={level}", cells[level]))
    for n, cell in (_get(r, "workers", "cells") or {}).items():
        for op in ("submit", "get"):
            if _get(cell, op, "cost"):
                rows.append(
                    (f"{'submit' if op == 'submit' else 'GET'} vidgate-postgresql --workers {n} c=32", cell[op])
                )
    for setup, cell in (_get(r, "busy", "cells") or {}).items():
        for op in ("submit", "get"):
            if _get(cell, op, "cost"):
                rows.append((f"{'submit' if op == 'submit' else 'GET'} {setup} + worker c=32", cell[op]))
    return rows


def _batch_text(batches: dict[str, Any] | None, op: str) -> str:
    b = (batches or {}).get(op)
    if not b:
        return ""
    return f"{_bound(b.get('p50'))} / {_bound(b.get('p99'))} ({_f(b.get('mean'), 1)})"


def _bound(value: Any) -> str:
    if value is None:
        return "n/a"
    return "> 512" if math.isinf(value) else f"≤ {value:g}"


def _cost_section(r: dict[str, Any], w: Any) -> None:
    rows = _cost_rows(r)
    if not rows:
        return
    w("## What each request costs")
    w("")
    w(
        "Per cell, over its measured runs (warm-up excluded), divided by the requests wrk completed: "
        "**server CPU** is utime + stime from `/proc` of the server under test and every process under it (all workers of "
        "`--workers N`; the floor's one process); **PostgreSQL CPU** is the same for the backends connected to the cell's "
        "database (*backends*) and for the cluster's auxiliary processes, WAL writer, checkpointer, background writer and "
        "autovacuum (*aux*, shared with anything else using this PostgreSQL). **Statements** are `pg_stat_statements` calls in "
        "the cell's database without transaction control, which is counted apart (*BEGIN/COMMIT*); **commits** are "
        "`pg_stat_database.xact_commit` of the database: every committed transaction, explicit or a lone statement's own, "
        "read-only ones included; *rows written* = tuples inserted + updated + deleted. **Batch sizes** are the delta of the "
        "gateway's `vidgate_ledger_batch_size` histogram per operation: the power-of-two bucket holding the median and "
        "the p99 (the histogram knows no finer; the mean is exact). With the worker on, the worker's polling is in every figure of the cell."
    )
    w("")
    w(
        "| cell | req/s | server CPU ms/req | PostgreSQL CPU ms/req: backends + aux | statements/req | BEGIN/COMMIT/req | commits/req | rows written/req | hold batch p50 / p99 (mean) | settle batch p50 / p99 (mean) |"
    )
    w("|---|---|---|---|---|---|---|---|---|---|")
    for label, cell in rows:
        c = cell["cost"]
        pg = (
            f"{_f(c.get('pg_backend_cpu_ms'), 3)} + {_f(c.get('pg_aux_cpu_ms'), 3)}" if "pg_backend_cpu_ms" in c else ""
        )
        w(
            f"| {label} | {_f(cell.get('rps'), 0)} | {_f(c.get('server_cpu_ms'), 3)} | {pg} | {_f(c.get('statements'), 2) if 'statements' in c else ''} | "
            f"{_f(c.get('tx_control'), 2) if 'tx_control' in c else ''} | {_f(c.get('commits'), 2) if 'commits' in c else ''} | "
            f"{_f(c.get('rows_written'), 2) if 'rows_written' in c else ''} | {_batch_text(c.get('batches'), 'hold')} | "
            f"{_batch_text(c.get('batches'), 'settle')} |"
        )
    w("")


def _server_timing_section(r: dict[str, Any], w: Any) -> None:
    timing = r.get("server_timing")
    if not timing:
        return
    w("")
    w("## Server-Timing, as a gateway user sees it")
    w("")
    w(
        "Each gateway answer's `Server-Timing` header (`db`, `upstream`, `app` ms), sampled over requests sent one at a "
        "time after the cell at the highest concurrency (so no queueing is in the figures)."
    )
    w("")
    w("| cell | db p50 | db p99 | upstream p50 | upstream p99 | app p50 | app p99 |")
    w("|---|---|---|---|---|---|---|")
    for cell, parts in timing.items():
        row = [cell]
        for name in ("db", "upstream", "app"):
            part = parts.get(name, {})
            row += [_f(part.get("p50"), 2), _f(part.get("p99"), 2)]
        w("| " + " | ".join(row) + " |")


def _contention_section(r: dict[str, Any], w: Any) -> None:
    c = r.get("contention")
    if not c:
        return
    plan = r.get("plan", {})
    names = list(c)
    w("## Budget contention (PostgreSQL)")
    w("")
    w(
        f"{plan.get('contention_concurrency')} concurrent submits, all charged to one tenant (every reservation updates the same tenant and "
        f"budget-counter rows) vs spread round-robin over {plan.get('contention_tenants')} tenants; both with a budget; runs interleaved."
    )
    w("")
    w("| tenants | req/s | p50 ms | p99 ms | errors |")
    w("|---|---|---|---|---|")
    for name in names:
        x = c[name]
        w(f"| {name} | {_f(x['rps'], 0)} | {_f(x['p50'], 2)} | {_f(x['p99'], 2)} | {x['errors']} |")
    if len(names) == 2:
        w("")
        w(
            f"One tenant runs at **{_f(_ratio(c[names[0]]['rps'], c[names[1]]['rps']), 2)} times** the throughput of spread tenants: "
            "that is the cost of the atomic reservation under contention."
        )
    w("")


def _scopes_section(r: dict[str, Any], w: Any) -> None:
    c = r.get("scopes")
    if not c:
        return
    plan = r.get("plan", {})
    w("## Scoped keys (PostgreSQL)")
    w("")
    w(
        f"{plan.get('contention_concurrency')} concurrent submits over 8 tenants, with today's keys (every scope, every "
        "model, no expiry) vs keys narrowed by scopes, models and an expiry (a key's own budget is older, and measured "
        "apart: it adds a counter row); runs interleaved. "
        "Server CPU is the serving process tree's, per answered submit."
    )
    w("")
    w("| keys | req/s | server CPU ms/submit | p50 ms | p99 ms | errors |")
    w("|---|---|---|---|---|---|")
    for name, x in c.items():
        if name == "ratio":
            continue
        w(
            f"| {name} | {_f(x['rps'], 0)} | {_f(x.get('server_cpu_ms_per_submit'), 3)} | {_f(x['p50'], 2)} "
            f"| {_f(x['p99'], 2)} | {x['errors']} |"
        )
    ratio = (c.get("ratio") or {}).get("scoped_over_today_cpu")
    w("")
    w(f"Scoped keys cost **{_f(ratio, 3)} times** today's server CPU per submit.")
    w("")


def _polling_section(r: dict[str, Any], w: Any, charts: dict[str, str]) -> None:
    p = r.get("polling")
    if not p:
        return
    w("## Polling at scale (PostgreSQL, one `vidgate serve` with its worker)")
    w("")
    w(
        f"{p['predictions']:,} predictions are submitted through the gateway "
        f"({r.get('plan', {}).get('poll_tenants', 1)} tenants, their webhook URLs spread over {r.get('plan', {}).get('webhook_receivers', 0) + 1} local receivers, {r.get('plan', {}).get('poll_submit_concurrency')} at once) in "
        f"{_f(p['submit_s'], 1)} s ({_f(p['submit_rps'], 0)}/s), "
        + (
            "all before the first one completes"
            if p.get("all_in_flight", True)
            else "**not** all before the first one completed (the gateway accepted them too slowly)"
        )
        + f"; the simulator makes them complete evenly over "
        f"{_f(p['completion_spread_s'], 0)} s starting {_f(p['first_completion_after_s'], 0)} s after the first submit. Each one announces "
        f'`estimatedTime` "L-(L+15)s" and completes {p["window_s"]:g} s after L, so vidgate\'s first poll (not before L) is followed by '
        f"polls every {p['poll_interval_s']:g} s: the interval schedule implies **{p['schedule_polls']} polls** per prediction "
        f"(1 + ⌈{p['window_s']:g}/{p['poll_interval_s']:g}⌉), and the steady demand is ≈ {_f(p['demand_polls_per_s'], 0)} upstream polls/s."
    )
    w("")
    w("| measure | value |")
    w("|---|---|")
    w(
        f"| predictions polled / webhooks received | {p['polled_predictions']:,} / {p['delivered']:,} (duplicates {p['duplicates']}) |"
    )
    w(f"| upstream polls in total | {_f(p['upstream_polls'])} |")
    w(
        f"| polls per prediction: mean / median / max | {_f(p['polls_mean'], 2)} / {_f(p['polls_p50'])} / {_f(p['polls_max'])} (allowed {p['allowed_polls']}; {p['polls_over_allowed']} over) |"
    )
    w(f"| peak upstream polls per second (2 s samples) | {_f(p['peak_polls_per_s'], 0)} |")
    w(
        f"| poll lag (due → polled), histogram: mean / p50 / p99 / share > 0.5 s | {_f(p['poll_lag_mean'], 3, ' s')} / {_f(p['poll_lag_p50'], 2, ' s')} / {_f(p['poll_lag_p99'], 2, ' s')} / {_f((p['poll_lag_share_over_0_5'] or 0) * 100, 1, ' %')} |"
    )
    w(
        f"| notification lag, upstream `completedAt` → webhook received (receiver clock): p50 / p99 / max | {_f(p['notify_e2e_p50'], 2, ' s')} / {_f(p['notify_e2e_p99'], 2, ' s')} / {_f(p['notify_e2e_max'], 2, ' s')} |"
    )
    w(
        f"| notification lag, gateway histogram (terminal seen → delivered): p50 / p99 | {_f(p['notify_metric_p50'], 2, ' s')} / {_f(p['notify_metric_p99'], 2, ' s')} |"
    )
    w(f"| peak RSS of the gateway (VmHWM) | {_f(p['peak_rss_mb'], 0, ' MB')} |")
    w(f"| gateway CPU time / wall time | {_f(p['cpu_s'], 0, ' s')} / {_f(p['wall_s'], 0, ' s')} |")
    w("")
    w(
        "Histogram quantiles are interpolated inside the gateway's buckets (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300 s), as Prometheus' "
        "`histogram_quantile` does; the end-to-end notification lag is exact (every webhook timed by the receiver)."
    )
    w("")
    if "polling" in charts:
        w(f"![polling]({charts['polling']})")
        w("")


def _webhooks_section(r: dict[str, Any], w: Any) -> None:
    wh = r.get("webhooks")
    if not wh:
        return
    w("## Webhooks (PostgreSQL, one `vidgate worker`)")
    w("")
    w(
        f"The polling run's {wh.get('total_rows', 0):,} outbox rows are queued again by the UPDATE the operator's redeliver endpoint runs, in "
        f"bulk, spread over {wh.get('receivers')} healthy local receivers (each answers 200 at once); one `vidgate worker` (default settings: 64 "
        "deliveries at once, 4 per endpoint, 15 s timeout) drains them. Rate = deliveries ÷ time from the first to the last arrival. "
        "Run B adds the other rows, pointed at a receiver that accepts the connection and never answers."
    )
    w("")
    w("| run | healthy deliveries | rows to the black hole | seconds | deliveries/s | per receiver /s |")
    w("|---|---|---|---|---|---|")
    for name in ("healthy only", "with a black hole"):
        x = wh.get(name)
        if not x:
            continue
        per = ", ".join(_f(v, 0) for v in x["per_receiver"].values())
        w(
            f"| {name} | {x['received']:,} of {x['expected']:,} | {x['black_hole_rows']:,} | {_f(x['span_s'], 2)} | {_f(x['rate'], 0)} | {per} |"
        )
    w("")


def _profiles_section(r: dict[str, Any], w: Any) -> None:
    profiles = r.get("profiles")
    if not profiles:
        return
    w("## Profiles (py-spy, share of the gateway's busy CPU samples)")
    w("")
    w(
        "Component shares are self time (the code on top of the stack). SQLAlchemy's async layer runs statements in greenlets, "
        "whose stacks py-spy does not join to the request's, so inclusive shares of app functions undercount their database work."
    )
    w("")
    for name, prof in profiles.items():
        w(f"### {name}")
        w("")
        if "error" in prof or not prof.get("samples"):
            w(f"no profile: {prof.get('error', 'no samples')}")
            w("")
            continue
        w(
            f"{prof['samples']:,} samples"
            + (
                f" (the gateway was busy about {prof['busy_share_of_one_core']:.0%} of one core: "
                + (
                    "CPU-bound"
                    if prof["busy_share_of_one_core"] > 0.85
                    else "partly waiting: on the database, on locks, or for the 2 cores it shares"
                    if prof["busy_share_of_one_core"] > 0.5
                    else "mostly waiting, not CPU-bound"
                )
                + ")"
                if prof.get("busy_share_of_one_core")
                else ""
            )
            + f"; flamegraph [`{prof['svg']}`]({prof['svg']}), collapsed stacks `{prof['raw']}`."
        )
        w("")
        w("By component (self time): " + ", ".join(f"{k} {v:.0%}" for k, v in prof["components"][:10]))
        w("")
        w("| vidgate function (inclusive) | share |")
        w("|---|---|")
        for k, v in prof["app_inclusive"][:12]:
            w(f"| `{k}` | {v:.1%} |")
        w("")
        w("| hottest functions (self) | share |")
        w("|---|---|")
        for k, v in prof["self"][:10]:
            w(f"| `{k}` | {v:.1%} |")
        w("")


# ---------------------------------------------------------------------- charts


def _charts(r: dict[str, Any], out: Path) -> dict[str, str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    made: dict[str, str] = {}
    sub = r.get("submit") or {}
    reads = r.get("reads") or {}
    if sub:
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 2]})
        ax = axes[0]
        for setup, cells in sub.items():
            levels = sorted(int(k) for k in cells)
            ax.plot(
                levels, [cells[str(k)]["rps"] for k in levels], marker="o", label=setup, color=SETUP_COLORS.get(setup)
            )
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({int(k) for c in sub.values() for k in c}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel("requests / s (median), log scale")
        ax.set_yscale("log")
        ax.set_title("Submit throughput per setup")
        ax.grid(alpha=0.3)
        ax.legend()
        ax = axes[1]
        read_levels = sorted({int(k) for c in reads.values() for k in c})
        setups = [s for s in reads if reads[s]]
        width = 0.8 / max(len(setups), 1)
        for i, setup in enumerate(setups):
            xs = [j + i * width for j in range(len(read_levels))]
            ax.bar(
                xs,
                [reads[setup].get(str(k), {}).get("rps", 0) for k in read_levels],
                width,
                label=setup,
                color=SETUP_COLORS.get(setup),
            )
        ax.set_xticks(
            [j + width * (len(setups) - 1) / 2 for j in range(len(read_levels))], [f"c={k}" for k in read_levels]
        )
        ax.set_ylabel("requests / s (median), log scale")
        ax.set_yscale("log")
        ax.set_title("GET /api/v1/predictions/{id} throughput")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        fig.savefig(out / "throughput.png", dpi=110)
        plt.close(fig)
        made["throughput"] = "throughput.png"

        levels = sorted({int(k) for c in sub.values() for k in c})
        fig, axes = plt.subplots(1, len(levels), figsize=(4 * len(levels), 4.5), sharey=True)
        axes = axes if len(levels) > 1 else [axes]
        for ax, level in zip(axes, levels, strict=False):
            setups = [s for s in sub if str(level) in sub[s]]
            pcts = ("p50", "p90", "p99")
            width = 0.8 / len(pcts)
            for i, pct in enumerate(pcts):
                xs = [j + i * width for j in range(len(setups))]
                ax.bar(
                    xs,
                    [sub[s][str(level)][pct] for s in setups],
                    width,
                    label=pct,
                    alpha=0.9,
                    color=("#8fbbd9", "#3b75af", "#1f3d66")[i],
                )
            ax.set_xticks(
                [j + width for j in range(len(setups))], [s.replace("vidgate-", "vg-") for s in setups], rotation=20
            )
            ax.set_yscale("log")
            ax.set_title(f"submit latency, c={level}")
            ax.grid(alpha=0.3, axis="y")
        axes[0].set_ylabel("ms (median of runs), log scale")
        axes[0].legend()
        fig.tight_layout()
        fig.savefig(out / "latency.png", dpi=110)
        plt.close(fig)
        made["latency"] = "latency.png"
    clients = [c for c in r.get("clients") or [] if "rps" in c]
    if clients:
        names = list(dict.fromkeys(c["client"] for c in clients))
        levels = sorted({c["concurrency"] for c in clients})
        fig, ax = plt.subplots(figsize=(8, 4))
        width = 0.8 / len(levels)
        for i, level in enumerate(levels):
            vals = [
                next((c["rps"] for c in clients if c["client"] == n and c["concurrency"] == level), 0) for n in names
            ]
            ax.bar([j + i * width for j in range(len(names))], vals, width, label=f"c={level}")
        ax.set_xticks([j + width * (len(levels) - 1) / 2 for j in range(len(names))], names)
        ax.set_ylabel("submits / s to the simulator (median)")
        ax.set_title("Python async HTTP clients against the simulator")
        ax.grid(alpha=0.3, axis="y")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "clients.png", dpi=110)
        plt.close(fig)
        made["clients"] = "clients.png"
    p = r.get("polling")
    if p and p.get("samples"):
        s = p["samples"]
        fig, ax = plt.subplots(figsize=(11, 4.5))
        polled = [x for x in s if "polls" in x]
        rate = [
            (b["t"], (b["polls"] - a["polls"]) / (b["t"] - a["t"]))
            for a, b in itertools.pairwise(polled)
            if b["t"] > a["t"]
        ]
        got = [
            (b["t"], (b["delivered"] - a["delivered"]) / (b["t"] - a["t"]))
            for a, b in itertools.pairwise(polled)
            if b["t"] > a["t"] and "delivered" in a and "delivered" in b
        ]
        subs = [
            (b["t"], (b["submits"] - a["submits"]) / (b["t"] - a["t"]))
            for a, b in itertools.pairwise(polled)
            if b["t"] > a["t"]
        ]
        if rate:
            ax.plot(*zip(*rate, strict=False), label="upstream polls/s", color="#4c72b0")
        if subs:
            ax.plot(*zip(*subs, strict=False), label="upstream submits/s", color="#937860")
        if got:
            ax.plot(*zip(*got, strict=False), label="webhooks received/s", color="#55a868")
        ax.axhline(p["demand_polls_per_s"], color="#4c72b0", ls=":", label="poll demand of the schedule")
        ax.set_xlabel("seconds since the first submit")
        ax.set_ylabel("per second")
        ax.grid(alpha=0.3)
        ax2 = ax.twinx()
        ax2.plot([x["t"] for x in s], [x["rss_mb"] for x in s], color="#c44e52", label="gateway RSS MB")
        ax2.set_ylabel("RSS MB", color="#c44e52")
        lines = ax.get_legend_handles_labels()
        lines2 = ax2.get_legend_handles_labels()
        ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper left", fontsize=8)
        ax.set_title(f"Polling {p['predictions']:,} predictions (PostgreSQL)")
        fig.tight_layout()
        fig.savefig(out / "polling.png", dpi=110)
        plt.close(fig)
        made["polling"] = "polling.png"
    return made
