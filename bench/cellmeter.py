"""What one measured cell cost, per request: CPU of the server under test (every process of it) and of
PostgreSQL, the statements and commits PostgreSQL saw, and the ledger writer's batch sizes.

A snapshot is taken when the measured runs start and one when they end; the cell's figures are the
differences divided by the requests the load generator completed in between. Sources:

- CPU: utime + stime from /proc/<pid>/stat. The server is its process and all its descendants (the
  workers of `vidgate serve --workers N`). PostgreSQL is split in two: the backends connected to the
  cell's database (their ps title names it), and the cluster's auxiliary processes (WAL writer,
  checkpointer, background writer, autovacuum), which serve every database on the machine, so other
  work on PostgreSQL lands in that column too.
- Statements: pg_stat_statements (when the server preloads it; CREATE EXTENSION in the cell's database
  is all it takes then), calls in the cell's database, transaction control (BEGIN/COMMIT/...) counted
  apart. Updated when a statement ends, so nothing lags.
- Commits: pg_stat_database.xact_commit of the cell's database: every transaction that committed,
  explicit or a single statement's own, read-only ones included. Backends publish these counters when
  idle at most once a second, so the snapshot waits for that (see `SETTLE_S`).
- Batch sizes: the delta of the gateway's `vidgate_ledger_batch_size` histogram (per `op`) on /metrics;
  under several workers one scrape merges every process's values (Prometheus multiprocess mode).
"""

from __future__ import annotations

import asyncio
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.procs import proc_status_kb
from bench.stats import parse_prometheus

_CLK = os.sysconf("SC_CLK_TCK")
# A PostgreSQL backend publishes its transaction counters when it goes idle, at most once a second
# (PGSTAT_MIN_INTERVAL); waiting this long after the load stops lets every backend publish.
SETTLE_S = 1.2
AUX = ("walwriter", "checkpointer", "background writer", "autovacuum", "logical replication", "walsender")
BATCH_METRIC = "vidgate_ledger_batch_size"
STATEMENTS_METRIC = "vidgate_db_statements_total"
_OWN = "/* bench.cellmeter */"
# A PostgreSQL regular expression: \y is its word boundary (\b would be a backspace there).
_TX_CONTROL = r"^\s*(BEGIN|COMMIT|END|ROLLBACK|START\s+TRANSACTION|SAVEPOINT|RELEASE|ABORT)\y"


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds) of a process."""
    try:
        rest = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(rest[1]), (int(rest[11]) + int(rest[12])) / _CLK
    except (OSError, IndexError, ValueError):
        return None


def _all_processes() -> dict[int, tuple[int, float]]:
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            got = _stat(int(entry.name))
            if got is not None:
                out[int(entry.name)] = got
    return out


def tree_cpu_s(root: int, processes: dict[int, tuple[int, float]] | None = None) -> dict[int, float]:
    """CPU seconds of `root` and every descendant, by pid."""
    procs = processes if processes is not None else _all_processes()
    ours = {root}
    grew = True
    while grew:
        grew = False
        for pid, (parent, _) in procs.items():
            if parent in ours and pid not in ours:
                ours.add(pid)
                grew = True
    return {pid: procs[pid][1] for pid in ours if pid in procs}


def tree_status_kb(root: int, field: str) -> int | None:
    """A /proc status field (VmHWM, VmRSS) summed over `root` and its descendants: `vidgate serve` runs its
    worker as a child process, and the gateway's memory is both. A sum of peaks bounds the joint peak."""
    values = [proc_status_kb(pid, field) for pid in tree_cpu_s(root)]
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def postgres_cpu_s(database: str, exclude: set[int]) -> tuple[dict[int, float], dict[int, float]]:
    """CPU seconds of (the backends connected to `database`, the cluster's auxiliary processes), by pid."""
    backends: dict[int, float] = {}
    aux: dict[int, float] = {}
    needle = f" {database} ".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in exclude:
            continue
        try:
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if not title.startswith(b"postgres: "):
            continue
        got = _stat(int(entry.name))
        if got is None:
            continue
        if needle in title:
            backends[int(entry.name)] = got[1]
        elif any(name.encode() in title for name in AUX):
            aux[int(entry.name)] = got[1]
    return backends, aux


def _delta(after: dict[int, float], before: dict[int, float]) -> float:
    # A process that started since counts from zero; one that ended since is lost (none do mid-cell).
    return sum(v - before.get(pid, 0.0) for pid, v in after.items())


def batch_histograms(metrics_text: str) -> dict[str, dict[str, Any]]:
    """op -> {"buckets": [(upper bound, cumulative count)], "count", "sum"} of the batch-size histogram."""
    metrics = parse_prometheus(metrics_text)
    out: dict[str, dict[str, Any]] = {}
    for labels, value in metrics.get(f"{BATCH_METRIC}_bucket", []):
        bound = math.inf if labels["le"] == "+Inf" else float(labels["le"])
        out.setdefault(labels.get("op", ""), {"buckets": [], "count": 0.0, "sum": 0.0})["buckets"].append(
            (bound, value)
        )
    for suffix in ("count", "sum"):
        for labels, value in metrics.get(f"{BATCH_METRIC}_{suffix}", []):
            out.setdefault(labels.get("op", ""), {"buckets": [], "count": 0.0, "sum": 0.0})[suffix] = value
    for h in out.values():
        h["buckets"].sort()
    return out


def bucket_bound(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """The upper bound of the bucket holding quantile q: batch sizes are whole numbers and the buckets
    powers of two, so "p50 ≤ 8" is what the histogram knows (interpolating would invent fractions)."""
    if not buckets or buckets[-1][1] == 0:
        return None
    rank = q * buckets[-1][1]
    return next(bound for bound, count in buckets if count >= rank)


def batch_delta(after: dict[str, dict[str, Any]], before: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per op: batches, items, mean, and the bucket bounds holding p50 and p99 of the batches made between
    two scrapes."""
    out: dict[str, dict[str, Any]] = {}
    for op, h in after.items():
        old = before.get(op, {"buckets": [], "count": 0.0, "sum": 0.0})
        old_buckets = dict(old["buckets"])
        buckets = [(bound, count - old_buckets.get(bound, 0.0)) for bound, count in h["buckets"]]
        batches = h["count"] - old["count"]
        if batches <= 0:
            continue
        items = h["sum"] - old["sum"]
        out[op] = {
            "batches": batches,
            "items": items,
            "mean": items / batches,
            "p50": bucket_bound(0.5, buckets),
            "p99": bucket_bound(0.99, buckets),
        }
    return out


@dataclass
class Snapshot:
    server_cpu: dict[int, float] = field(default_factory=dict)
    pg_backends: dict[int, float] = field(default_factory=dict)
    pg_aux: dict[int, float] = field(default_factory=dict)
    statements: tuple[float, float] | None = None  # (all calls, transaction control calls)
    database: dict[str, float] | None = None  # pg_stat_database counters
    batches: dict[str, dict[str, Any]] | None = None
    gateway_statements: float | None = None  # the gateway's own count (vidgate_db_statements_total)


class CellMeter:
    """Snapshots around a cell's measured runs; `open()` before, `close()` after."""

    def __init__(
        self,
        *,
        server_pid: int | None,
        http: aiohttp.ClientSession,
        metrics_url: str | None = None,
        metrics_auth: str | None = None,
        pg_url: str | None = None,
    ) -> None:
        self.server_pid = server_pid
        self.http = http
        self.metrics_url = metrics_url
        self.metrics_auth = metrics_auth
        self.pg_url = pg_url
        self.database = pg_url.rsplit("/", 1)[1] if pg_url else None
        self.conn: Any = None
        self.own_pid: int | None = None
        self.has_statements = False
        self.before = Snapshot()

    async def open(self) -> None:
        if self.pg_url:
            import asyncpg

            self.conn = await asyncpg.connect(self.pg_url)
            self.own_pid = await self.conn.fetchval("SELECT pg_backend_pid()")
            try:
                await self.conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
                await self.conn.fetchval(f"SELECT count(*) FROM pg_stat_statements {_OWN}")
                self.has_statements = True
            except Exception:  # not preloaded (shared_preload_libraries): statements stay n/a
                self.has_statements = False
            await asyncio.sleep(SETTLE_S)  # the warm-up's counters published
        self.before = await self._snapshot(cpu_and_statements=True, database=True)

    async def close(self, requests: int) -> dict[str, Any]:
        """The cell's figures per request (`requests` completed between open and close)."""
        after = await self._snapshot(cpu_and_statements=True, database=False)
        if self.conn is not None:
            await asyncio.sleep(SETTLE_S)
            after.database = (await self._snapshot(cpu_and_statements=False, database=True)).database
            await self.conn.close()
            self.conn = None
        return self.figures(self.before, after, requests)

    @staticmethod
    def figures(before: Snapshot, after: Snapshot, requests: int) -> dict[str, Any]:
        per = 1.0 / requests if requests else math.nan
        out: dict[str, Any] = {"requests": requests}
        if after.server_cpu:
            out["server_cpu_ms"] = _delta(after.server_cpu, before.server_cpu) * 1000 * per
            out["server_processes"] = len(after.server_cpu)
        if after.pg_backends or after.pg_aux:
            out["pg_backend_cpu_ms"] = _delta(after.pg_backends, before.pg_backends) * 1000 * per
            out["pg_aux_cpu_ms"] = _delta(after.pg_aux, before.pg_aux) * 1000 * per
            out["pg_backends"] = len(after.pg_backends)
        if after.statements and before.statements:
            out["statements"] = (
                after.statements[0] - before.statements[0] - after.statements[1] + before.statements[1]
            ) * per
            out["tx_control"] = (after.statements[1] - before.statements[1]) * per
        elif after.gateway_statements is not None and before.gateway_statements is not None:
            # Without pg_stat_statements (SQLite, or a server that does not preload it): the gateway's count.
            out["statements"] = (after.gateway_statements - before.gateway_statements) * per
            out["statements_counted_by"] = "gateway"
        if after.database and before.database:
            d = {k: after.database[k] - before.database[k] for k in after.database}
            out["commits"] = d["xact_commit"] * per
            out["rollbacks"] = d["xact_rollback"] * per
            out["rows_written"] = (d["tup_inserted"] + d["tup_updated"] + d["tup_deleted"]) * per
        if after.batches is not None and before.batches is not None:
            out["batches"] = batch_delta(after.batches, before.batches)
        return out

    async def _snapshot(self, *, cpu_and_statements: bool, database: bool) -> Snapshot:
        snap = Snapshot()
        if cpu_and_statements:
            if self.metrics_url:
                snap.batches, snap.gateway_statements = await self._metrics()
            if self.server_pid is not None:
                snap.server_cpu = tree_cpu_s(self.server_pid)
            if self.database:
                snap.pg_backends, snap.pg_aux = postgres_cpu_s(self.database, {self.own_pid or -1})
            if self.has_statements:
                row = await self.conn.fetchrow(
                    f"""SELECT coalesce(sum(calls), 0) AS calls,
                               coalesce(sum(calls) FILTER (WHERE query ~* $1), 0) AS tx
                        FROM pg_stat_statements
                        WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
                          AND query NOT LIKE '%bench.cellmeter%' {_OWN}""",
                    _TX_CONTROL,
                )
                snap.statements = (float(row["calls"]), float(row["tx"]))
        if database and self.conn is not None:
            row = await self.conn.fetchrow(
                f"""SELECT xact_commit, xact_rollback, tup_inserted, tup_updated, tup_deleted
                    FROM pg_stat_database WHERE datname = current_database() {_OWN}"""
            )
            snap.database = {k: float(v) for k, v in dict(row).items()}
        return snap

    async def _metrics(self) -> tuple[dict[str, dict[str, Any]] | None, float | None]:
        """The ledger writer's batch sizes and the statements the gateway counted, from /metrics."""
        assert self.metrics_url is not None
        headers = {"Authorization": self.metrics_auth} if self.metrics_auth else None
        try:
            async with self.http.get(self.metrics_url, headers=headers) as response:
                if response.status != 200:
                    return None, None
                text = await response.text()
        except (aiohttp.ClientError, TimeoutError):
            return None, None
        statements = sum(v for _labels, v in parse_prometheus(text).get(STATEMENTS_METRIC, []))
        return batch_histograms(text), statements
