"""The benchmark orchestrator behind `python -m bench` (see bench/README.md).

Every number in bench/results.md comes from one run of this module: it starts the simulator, the
baselines and vidgate as separate processes on loopback, drives them with wrk, reads the gateway's
/metrics, the simulator's /_sim/stats and the receivers' counts, and always stops what it started.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import platform
import secrets
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from bench import httpclients, profiling, providers, report
from bench.cellmeter import CellMeter, tree_cpu_s, tree_status_kb
from bench.loadgen import Load, have_wrk, run_load
from bench.ports import free_port
from bench.procs import CpuMeter, Proc, Processes, proc_status_kb, wait_http
from bench.stats import histogram, histogram_quantile, median, parse_prometheus, percentile, share_above

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / "bench"
MODEL = "ltx-2-19b"
SUBMIT_BODY = (
    '{"image":"https://example.com/cat.png","prompt":"a cat waves at the camera","resolution":"480p","duration":5}'
)
VENDOR_KEY = "bench-vendor-key"
SETUPS = ("direct", "floor", "vidgate-sqlite", "vidgate-postgresql")
BUSY_ESTIMATED = "1-20s"  # the polled predictions: first poll after 1 s, then every POLL_INTERVAL_S
LOAD_ESTIMATED = "3600-3700s"  # the load's own submits in a busy cell: not polled while it runs
QUIET_CORES = 0.25  # other processes may use at most this many cores for the machine to count as quiet
POLL_INTERVAL_S = 1.5
SERVER_TIMING_SAMPLE = 200  # requests sampled one at a time per gateway cell for the Server-Timing table  # vidgate's default VIDGATE_POLL_INTERVAL_S, the vendor asks for 1-2 s


@dataclass(frozen=True)
class Plan:
    name: str
    levels: tuple[int, ...]
    read_levels: tuple[int, ...]
    warmup_s: int
    duration_s: int
    reps: int
    client_levels: tuple[int, ...]
    client_warmup_s: float
    client_duration_s: float
    client_reps: int
    contention_concurrency: int
    contention_tenants: int
    poll_predictions: int
    poll_batch: int
    poll_tenants: int
    poll_submit_concurrency: int
    poll_window_s: float  # a prediction completes this long after the lower bound of its estimatedTime
    poll_spread_s: float  # completions are spread evenly over this many seconds
    poll_max_lead_s: float  # at most this long for the submissions before the first completion
    poll_drain_s: float  # after the last completion, wait at most this long for the last webhook
    webhook_receivers: int
    webhook_black_hole_share: float
    webhook_timeout_s: float
    quiet_budget_s: float  # how long the whole run may wait, in total, for other processes to quiet down
    worker_counts: tuple[int, ...]  # `vidgate serve --workers N` for the PostgreSQL sweep at 32 concurrent
    busy_predictions: int  # in flight and polled while the with-worker cells run
    busy_setups: tuple[str, ...]


FULL = Plan(
    name="full",
    levels=(1, 8, 32, 128),
    read_levels=(8, 32, 128),
    warmup_s=2,
    duration_s=3,
    reps=3,
    client_levels=(8, 32),
    client_warmup_s=1.0,
    client_duration_s=2.0,
    client_reps=3,
    contention_concurrency=32,
    contention_tenants=32,
    poll_predictions=10_000,
    poll_batch=100,
    poll_tenants=16,
    poll_submit_concurrency=32,
    poll_window_s=10.0,
    poll_spread_s=120.0,
    poll_max_lead_s=200.0,
    poll_drain_s=60.0,
    webhook_receivers=4,
    webhook_black_hole_share=0.2,
    webhook_timeout_s=180.0,
    quiet_budget_s=120.0,
    worker_counts=(1, 2, 3),
    busy_predictions=2_000,
    busy_setups=("vidgate-postgresql", "vidgate-sqlite"),
)

SMOKE = Plan(
    name="smoke",
    levels=(8, 32),
    read_levels=(32,),
    warmup_s=1,
    duration_s=1,
    reps=1,
    client_levels=(8, 32),
    client_warmup_s=0.2,
    client_duration_s=0.5,
    client_reps=1,
    contention_concurrency=32,
    contention_tenants=32,
    poll_predictions=100,
    poll_batch=25,
    poll_tenants=4,
    poll_submit_concurrency=16,
    poll_window_s=2.0,
    poll_spread_s=4.0,
    poll_max_lead_s=30.0,
    poll_drain_s=30.0,
    webhook_receivers=2,
    webhook_black_hole_share=0.2,
    webhook_timeout_s=60.0,
    quiet_budget_s=0.0,
    worker_counts=(2,),  # the several-process path; one process is the submit phase's path
    busy_predictions=40,
    busy_setups=("vidgate-postgresql",),  # SQLite takes the same code path
)


def summarize(runs: list[Load]) -> dict[str, Any]:
    """Medians over repeated runs."""
    return {
        "rps": median([r.rps for r in runs]),
        "p50": median([r.p50 for r in runs]),
        "p90": median([r.p90 for r in runs]),
        "p99": median([r.p99 for r in runs]),
        "p999": median([r.p999 for r in runs]),
        "errors": sum(r.errors for r in runs),
        "requests": sum(r.requests for r in runs),
        "runs": [r.as_dict() for r in runs],
    }


@dataclass
class VidgateDb:
    name: str
    url: str
    tenant_key: str | None = None
    tenant_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Bench:
    def __init__(self, plan: Plan, out_dir: Path, profile: bool, command: str, phases: set[str]) -> None:
        self.plan = plan
        self.out_dir = out_dir
        self.profile = profile
        self.command = command
        self.phases = phases
        self.workdir = Path(tempfile.mkdtemp(prefix="vidgate-bench-"))
        self.procs = Processes(self.workdir)
        self.admin_token = secrets.token_urlsafe(24)
        self.pg_base = os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432").rstrip("/")
        self.vidgate_bin = self._vidgate_bin()
        self.http: aiohttp.ClientSession
        self.profiles: dict[str, Any] = {}
        self.results: dict[str, Any] = {"plan": asdict(plan), "timings": {}}
        self.quiet_budget_s = plan.quiet_budget_s
        self.extra_vidgate_env: dict[str, str] = {}
        # Databases of their own per run: two runs at once (a smoke run in CI, an experiment by hand)
        # must not drop each other's databases. They are dropped again when the run ends.
        self.db_tag = f"{os.getpid()}_{secrets.token_hex(2)}"
        self.databases: list[str] = []

    # ------------------------------------------------------------------ plumbing

    @staticmethod
    def _vidgate_bin() -> str:
        beside = Path(sys.executable).with_name("vidgate")
        if beside.exists():
            return str(beside)
        found = shutil.which("vidgate")
        if not found:
            raise SystemExit("bench: the `vidgate` command was not found; install the project (pip install -e .)")
        return found

    def log(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("VIDGATE_") and k != "VIBEDREAM_API_KEY"}
        env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["PYTHONUNBUFFERED"] = "1"
        env.update(extra)
        return env

    def vidgate_env(self, db_url: str, sim_url: str, *, run_worker: bool) -> dict[str, str]:
        return (
            self.env(
                VIDGATE_DATABASE_URL=db_url,
                VIDGATE_UPSTREAM_BASE_URL=sim_url,
                VIDGATE_UPSTREAM_API_KEY=VENDOR_KEY,
                VIDGATE_ADMIN_TOKEN=self.admin_token,
                VIDGATE_WEBHOOK_ALLOW_PRIVATE="true",
                # Outputs are copied from the simulator as from the vendor: notification lag includes the copy.
                VIDGATE_OUTPUT_HOSTS=sim_url.removeprefix("http://"),
                VIDGATE_OUTPUTS_STORE=str(self.workdir / "outputs"),
                VIDGATE_RUN_WORKER="true" if run_worker else "false",
                VIDGATE_POLL_INTERVAL_S=str(POLL_INTERVAL_S),
                # No shedding: a cell measures throughput at a fixed concurrency, and at 128 the requests a
                # run's closed connections left in flight overlap the next run's (shedding has its own cell
                # in bench/hardening.py).
                VIDGATE_MAX_INFLIGHT_REQUESTS="100000",
            )
            | self.extra_vidgate_env
        )

    async def start_simulator(self, completion_s: float = 3600.0, estimated: str = "5-20s") -> tuple[Proc, str]:
        port = free_port()
        argv = [
            self.vidgate_bin,
            "simulator",
            "--port",
            str(port),
            "--completion-s",
            str(completion_s),
            "--estimated-time",
            estimated,
        ]
        proc = self.procs.start("simulator", argv, self.env(), self.workdir)
        url = f"http://127.0.0.1:{port}"
        await wait_http(url + "/", proc)
        return proc, url

    async def start_receiver(self, healthy: int) -> tuple[Proc, list[int], int]:
        """bench/receiver.py on `healthy` ports that answer 200 (and record lags) and one black hole."""
        ports = [free_port() for _ in range(healthy)]
        hole = free_port()
        argv = [sys.executable, "-m", "bench.receiver", "--ports", ",".join(map(str, ports))]
        receiver = self.procs.start("receiver", [*argv, "--blackhole-port", str(hole)], self.env(), self.workdir)
        await wait_http(f"http://127.0.0.1:{ports[0]}/_stats?lags=0", receiver)
        return receiver, ports, hole

    async def start_floor(self, sim_url: str, client: str) -> tuple[Proc, str]:
        port = free_port()
        argv = [sys.executable, "-m", "bench.floor", "--port", str(port), "--upstream", sim_url, "--client", client]
        argv += ["--server", "uvicorn"]  # vidgate's own server stack: uvicorn, uvloop, httptools
        proc = self.procs.start("floor", argv, self.env(), self.workdir)
        url = f"http://127.0.0.1:{port}"
        await wait_http(url + "/_ping", proc)
        return proc, url

    async def start_vidgate(
        self, db: VidgateDb, sim_url: str, *, run_worker: bool, workers: int = 1, env: dict[str, str] | None = None
    ) -> tuple[Proc, str]:
        port = free_port()
        argv = [self.vidgate_bin, "serve", "--port", str(port)]
        if workers > 1:
            argv += ["--workers", str(workers)]
        proc = self.procs.start(
            f"vidgate-{db.name}",
            argv,
            self.vidgate_env(db.url, sim_url, run_worker=run_worker) | (env or {}),
            self.workdir,
        )
        url = f"http://127.0.0.1:{port}"
        await wait_http(url + "/healthz", proc)
        return proc, url

    async def migrate(self, db_url: str, sim_url: str = "http://127.0.0.1:9") -> None:
        proc = await asyncio.create_subprocess_exec(
            self.vidgate_bin,
            "migrate",
            env=self.vidgate_env(db_url, sim_url, run_worker=False),
            cwd=self.workdir,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"vidgate migrate failed for {db_url}: {out.decode()[-2000:]}")

    async def fresh_postgres(self, name: str) -> str:
        import asyncpg

        self.databases.append(name)
        conn = await asyncpg.connect(self.pg_base + "/postgres")
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        return f"{self.pg_base}/{name}"

    async def drop_databases(self) -> None:
        import asyncpg

        if not self.databases:
            return
        conn = await asyncpg.connect(self.pg_base + "/postgres")
        try:
            for name in self.databases:
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    async def admin(self, base: str, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.admin_token}"}
        async with self.http.request(method, base + path, json=body, headers=headers) as response:
            data = await response.json(content_type=None)
            if response.status >= 300:
                raise RuntimeError(f"{method} {path} answered {response.status}: {data}")
            return data  # type: ignore[no-any-return]

    async def make_tenant(
        self, base: str, name: str, *, budget_cents: int | None, webhook_url: str | None = None
    ) -> tuple[str, str]:
        body: dict[str, Any] = {"name": name, "budgetCents": budget_cents, "budgetPeriod": "month"}
        if webhook_url:
            body["webhookUrl"] = webhook_url
        tenant = await self.admin(base, "POST", "/admin/v1/tenants", body)
        key = await self.admin(base, "POST", f"/admin/v1/tenants/{tenant['id']}/keys", {"name": "bench"})
        return str(tenant["id"]), str(key["key"])

    async def submit_many(
        self, base: str, auth: str | list[str], n: int, concurrency: int, extra: dict[str, Any] | None = None
    ) -> list[str]:
        """n submits (round-robin over the given Authorization values); fails on any non-200."""
        body = {**json.loads(SUBMIT_BODY), **(extra or {})}
        auths = [auth] if isinstance(auth, str) else auth
        ids: list[str] = []
        failures: list[str] = []
        queue = iter(range(n))

        async def worker() -> None:
            for i in queue:
                headers = {"Authorization": auths[i % len(auths)]}
                async with self.http.post(
                    f"{base}/api/v1/models/{MODEL}/generate", json=body, headers=headers
                ) as response:
                    data = await response.json(content_type=None)
                    if response.status == 200:
                        ids.append(data["id"])
                    else:
                        failures.append(f"{response.status} {data}")

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        if failures:
            raise RuntimeError(f"{len(failures)} of {n} submits failed, first: {failures[0]}")
        return ids

    async def server_timing(
        self, base: str, method: str, paths: list[str], auth: str, body: str | None, n: int = SERVER_TIMING_SAMPLE
    ) -> dict[str, Any]:
        """What a gateway user sees in Server-Timing: n requests one at a time (no queueing in the
        figures), the median and p99 of each part in ms. Empty when the server sends none."""
        parts: dict[str, list[float]] = {}
        headers = {"Authorization": auth, "content-type": "application/json"}
        for i in range(n):
            async with self.http.request(method, base + paths[i % len(paths)], data=body, headers=headers) as answer:
                await answer.read()
                for item in answer.headers.get("server-timing", "").split(","):
                    name, _, dur = item.strip().partition(";dur=")
                    if dur:
                        parts.setdefault(name, []).append(float(dur))
        return {name: {"p50": median(v), "p99": percentile(sorted(v), 99)} for name, v in parts.items()}

    async def measure(
        self,
        base: str,
        *,
        method: str,
        paths: list[str],
        auths: list[str],
        body: str | None,
        concurrency: int,
        label: str,
        server: Proc | None = None,
        cost: CellMeter | None = None,
    ) -> dict[str, Any]:
        """Warm-up (thrown away), then the measured repetitions; medians, the CPU that other
        processes on the machine took meanwhile and, with `cost`, what each request cost (bench/cellmeter.py)."""
        common = dict(method=method, paths=paths, auths=auths, body=body, concurrency=concurrency, workdir=self.workdir)
        await run_load(base, duration_s=self.plan.warmup_s, **common)  # type: ignore[arg-type]
        if cost is not None:
            await cost.open()
        meter = CpuMeter(self.db_tag)
        offset = server.log_size() if server is not None else 0
        runs = []
        for _ in range(self.plan.reps):
            runs.append(await run_load(base, duration_s=self.plan.duration_s, **common))  # type: ignore[arg-type]
        out = summarize(runs)
        out["foreign_cores"] = meter.foreign_cores()
        if cost is not None:
            out["cost"] = await cost.close(out["requests"])
        if server is not None and server.name.startswith("vidgate"):
            # Answers the server logged: requests still hanging when a run ended never reach wrk's counts.
            out["server_statuses"] = server.statuses_since(offset)
            out["server_5xx"] = sum(v for k, v in out["server_statuses"].items() if k.startswith("5"))
            if out["server_5xx"]:
                self.results["had_errors"] = True
        if out["errors"]:
            self.results["had_errors"] = True
        self.note_foreign(out["foreign_cores"])
        self.log(
            f"  {label:<34} c={concurrency:<4} {out['rps']:8.0f} req/s  p50 {out['p50']:7.2f} ms"
            f"  p99 {out['p99']:8.2f} ms"
            + (f"  ERRORS {out['errors']}" if out["errors"] else "")
            + (f"  SERVER 5xx {out['server_5xx']}" if out.get("server_5xx") else "")
            + (f"  (other processes used {out['foreign_cores']:.2f} cores)" if out["foreign_cores"] > 0.1 else "")
            + _cost_line(out.get("cost"))
        )
        return out

    def cost_meter(self, server: Proc | None, base: str, db: VidgateDb | None) -> CellMeter | None:
        """The per-request cost meter of a cell: the server's CPU (floor or gateway), and for the gateway its
        batch sizes and, on PostgreSQL, the database's CPU, statements and commits."""
        if server is None:
            return None
        if db is None:
            return CellMeter(server_pid=server.pid, http=self.http)
        return CellMeter(
            server_pid=server.pid,
            http=self.http,
            metrics_url=base + "/metrics",
            metrics_auth=f"Bearer {self.admin_token}",
            pg_url=db.url if db.url.startswith("postgresql") else None,
        )

    def note_foreign(self, cores: float) -> None:
        self.results["max_foreign_cores"] = max(self.results.get("max_foreign_cores", 0.0), cores)

    async def wait_quiet(self) -> None:
        """On a shared machine, wait (within a bounded budget per run) until other processes leave the
        CPU alone, so a neighbour's test suite does not land in one setup's numbers and not another's."""
        announced = False
        while self.quiet_budget_s > 0:
            meter = CpuMeter(self.db_tag)
            await asyncio.sleep(1.0)
            busy = meter.foreign_cores()
            if busy < QUIET_CORES:
                return
            self.quiet_budget_s -= 1.0
            self.results["quiet_waited_s"] = self.results.get("quiet_waited_s", 0.0) + 1.0
            if not announced:
                self.log(f"  waiting for other processes to quiet down ({busy:.2f} cores busy)")
                announced = True
        if announced:
            self.log("  stopped waiting: the quiet-wait budget is spent; numbers below may be disturbed")

    def maybe_profile(self, proc: Proc, name: str, duration_s: float) -> asyncio.Task[Any] | None:
        if not self.profile:
            return None
        return asyncio.create_task(profiling.record(proc.pid, self.out_dir / name, duration_s))

    async def finish_profile(self, task: asyncio.Task[Any] | None, name: str) -> None:
        if task is not None:
            self.profiles[name] = await task

    # ------------------------------------------------------------------ phases

    async def run(self) -> None:
        started = time.monotonic()
        self.results["meta"] = machine_info(self.command)
        self.log(f"vidgate benchmark ({self.plan.name}); logs and scratch files in {self.workdir}")
        if not have_wrk():
            self.log(
                "wrk not found: using the aiohttp stand-in (bench/aioload.py); install wrk for trustworthy numbers"
            )
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as self.http:
            for phase, step in (
                ("clients", self.phase_clients),
                ("submit", self.phase_submit),
                ("workers", self.phase_workers),
                ("busy", self.phase_busy),
                ("contention", self.phase_contention),
                ("scopes", self.phase_scopes),
                ("polling", self.phase_polling),
                ("webhooks", self.phase_webhooks),
                ("providers", self.phase_providers),
                ("queue", self.phase_queue),
            ):
                if phase not in self.phases:
                    continue
                if phase == "webhooks" and "polling" in self.results.get("failed_phases", {}):
                    self.results.setdefault("failed_phases", {})[phase] = (
                        "skipped: it reuses the polling phase's outbox"
                    )
                    continue
                began = time.monotonic()
                self.log(f"== {phase}")
                try:
                    await step()
                except Exception as exc:  # one phase failing must not cost the others, nor the report
                    self.log(f"  PHASE FAILED: {type(exc).__name__}: {str(exc)[:500]}")
                    self.results.setdefault("failed_phases", {})[phase] = f"{type(exc).__name__}: {str(exc)[:500]}"
                    self.results["had_errors"] = True
                    self.procs.stop_all_but(getattr(self, "receiver", None) if phase == "polling" else None)
                self.results["timings"][phase] = time.monotonic() - began
        self.results["timings"]["total"] = time.monotonic() - started
        self.results["meta"]["app_digest_end"] = app_digest()
        if self.results["meta"]["app_digest_end"] != self.results["meta"]["app_digest"]:
            self.log("WARNING: app/ changed on disk during the run; later phases ran newer code")
        self.results["profiles"] = self.profiles
        self.log(f"done in {self.results['timings']['total']:.0f} s")

    async def phase_providers(self) -> None:
        await providers.phase(self)

    async def phase_queue(self) -> None:
        """The fair queue's cell (bench/queue.py): a queue across tenants drained through a provider's cap."""
        from bench import queue

        smoke = self.plan.name == "smoke"
        n = 1000 if smoke else 10_000
        self.results["queue"] = await queue.run(n, 100, 200, 100 if smoke else 1000)

    async def phase_clients(self) -> None:
        plan = self.plan
        rows = []
        for client in httpclients.available():
            for concurrency in plan.client_levels:
                sim, sim_url = await self.start_simulator()
                await self.wait_quiet()
                meter = CpuMeter(self.db_tag)
                try:
                    proc = await asyncio.create_subprocess_exec(
                        sys.executable,
                        "-m",
                        "bench.clients",
                        "--client",
                        client,
                        "--url",
                        sim_url,
                        "--concurrency",
                        str(concurrency),
                        "--warmup",
                        str(plan.client_warmup_s),
                        "--duration",
                        str(plan.client_duration_s),
                        "--reps",
                        str(plan.client_reps),
                        env=self.env(),
                        cwd=ROOT,
                        stdout=asyncio.subprocess.PIPE,
                        stderr=asyncio.subprocess.PIPE,
                    )
                    out, err = await proc.communicate()
                    foreign = meter.foreign_cores()
                    self.note_foreign(foreign)
                finally:
                    self.procs.stop(sim)
                if proc.returncode != 0 or not out.strip():
                    self.log(f"  {client} c={concurrency}: failed: {err.decode()[-300:]}")
                    rows.append({"client": client, "concurrency": concurrency, "error": err.decode()[-300:]})
                    continue
                data = json.loads(out.decode().strip().splitlines()[-1])
                row = {
                    "client": client,
                    "version": httpclients.version(client),
                    "description": httpclients.DESCRIPTIONS[client],
                    "concurrency": concurrency,
                    "rps": median([r["rps"] for r in data["reps"]]),
                    "p50": median([r["p50_ms"] for r in data["reps"]]),
                    "p99": median([r["p99_ms"] for r in data["reps"]]),
                    "errors": sum(r["errors"] for r in data["reps"]),
                    "reps": data["reps"],
                    "foreign_cores": foreign,
                }
                rows.append(row)
                self.log(
                    f"  client {client:<14} c={concurrency:<3} {row['rps']:8.0f} req/s  p50 {row['p50']:.2f} ms  p99 {row['p99']:.2f} ms"
                )
        self.results["clients"] = rows
        # The floor uses the client with the best median throughput at the highest measured concurrency.
        top = max(plan.client_levels)
        ok = [r for r in rows if r.get("concurrency") == top and "rps" in r and r["errors"] == 0]
        self.results["floor_client"] = max(ok, key=lambda r: r["rps"])["client"] if ok else "aiohttp"
        self.log(f"  floor proxy will use: {self.results['floor_client']}")

    async def prepare_vidgate_dbs(self) -> dict[str, VidgateDb]:
        sqlite_path = self.workdir / "vidgate-bench.db"
        dbs = {
            "vidgate-sqlite": VidgateDb("sqlite", f"sqlite:///{sqlite_path}"),
            "vidgate-postgresql": VidgateDb("postgresql", await self.fresh_postgres(f"vidgate_bench_{self.db_tag}")),
        }
        for db in dbs.values():
            await self.migrate(db.url)
        return dbs

    async def phase_submit(self) -> None:
        plan = self.plan
        floor_client = self.results.get("floor_client", "aiohttp")
        dbs = await self.prepare_vidgate_dbs()
        self.dbs = dbs
        submit: dict[str, dict[str, Any]] = {s: {} for s in SETUPS}
        reads: dict[str, dict[str, Any]] = {s: {} for s in SETUPS}
        timing: dict[str, Any] = {}
        self.results["server_timing"] = timing
        for level in plan.levels:
            for setup in SETUPS:
                sim, sim_url = await self.start_simulator()
                server: Proc | None = None
                cell_offset = 0
                try:
                    if setup == "direct":
                        base, auth = sim_url, f"Bearer {VENDOR_KEY}"
                    elif setup == "floor":
                        server, base = await self.start_floor(sim_url, floor_client)
                        auth = f"Bearer {VENDOR_KEY}"
                    else:
                        db = dbs[setup]
                        server, base = await self.start_vidgate(db, sim_url, run_worker=False)
                        if db.tenant_key is None:
                            # A budget, so the reservation really checks a limit; far above what the run spends.
                            db.tenant_id, db.tenant_key = await self.make_tenant(
                                base, "bench-submit", budget_cents=10**9
                            )
                        auth = f"Bearer {db.tenant_key}"
                    cell_offset = server.log_size() if server is not None else 0
                    cell_db = dbs.get(setup)
                    prof = None
                    if setup == "vidgate-postgresql" and level == 32 and server is not None:
                        prof = self.maybe_profile(
                            server, "submit-postgresql-c32", plan.warmup_s + plan.reps * plan.duration_s
                        )
                    await self.wait_quiet()
                    submit[setup][str(level)] = await self.measure(
                        base,
                        method="POST",
                        paths=[f"/api/v1/models/{MODEL}/generate"],
                        auths=[auth],
                        body=SUBMIT_BODY,
                        concurrency=level,
                        label=f"submit {setup}",
                        server=server,
                        cost=self.cost_meter(server, base, cell_db),
                    )
                    await self.finish_profile(prof, "submit-postgresql-c32")
                    if server is not None:
                        submit[setup][str(level)]["rss_kb"] = proc_status_kb(server.pid, "VmHWM")
                    if setup.startswith("vidgate") and level == max(plan.levels):
                        timing[f"submit {setup}"] = await self.server_timing(
                            base, "POST", [f"/api/v1/models/{MODEL}/generate"], auth, SUBMIT_BODY
                        )
                    if level in plan.read_levels:
                        ids = await self.submit_many(base, auth, 64, 8)
                        prof = None
                        if setup == "vidgate-postgresql" and level == 32 and server is not None:
                            prof = self.maybe_profile(
                                server, "read-postgresql-c32", plan.warmup_s + plan.reps * plan.duration_s
                            )
                        reads[setup][str(level)] = await self.measure(
                            base,
                            method="GET",
                            paths=[f"/api/v1/predictions/{i}" for i in ids],
                            auths=[auth],
                            body=None,
                            concurrency=level,
                            label=f"read {setup}",
                            server=server,
                            cost=self.cost_meter(server, base, cell_db),
                        )
                        await self.finish_profile(prof, "read-postgresql-c32")
                        if setup.startswith("vidgate") and level == max(plan.read_levels):
                            timing[f"GET {setup}"] = await self.server_timing(
                                base, "GET", [f"/api/v1/predictions/{i}" for i in ids], auth, None
                            )
                finally:
                    if server is not None:
                        self.procs.stop(server)
                        self._count_hung(
                            server, cell_offset, submit[setup].get(str(level)), reads[setup].get(str(level))
                        )
                    self.procs.stop(sim)
        self.results["submit"] = submit
        self.results["reads"] = reads
        self.results["floor_client_used"] = floor_client

    def _count_hung(self, server: Proc, offset: int, *cells: dict[str, Any] | None) -> None:
        """Requests still hanging when a measurement ended are answered (500) only when the server stops;
        they count against the cell's last measurement."""
        if not server.name.startswith("vidgate"):
            return
        total = sum(v for k, v in server.statuses_since(offset).items() if k.startswith("5"))
        measured = [c for c in cells if c]
        counted = sum(c.get("server_5xx", 0) for c in measured)
        if measured and total > counted:
            measured[-1]["server_5xx"] = measured[-1].get("server_5xx", 0) + total - counted
            measured[-1]["hung_until_shutdown"] = total - counted
            self.results["had_errors"] = True
            self.log(
                f"  {server.name}: {total - counted} requests were still hanging when the server stopped (answered 500)"
            )

    async def phase_workers(self) -> None:
        """PostgreSQL submit and GET at 32 concurrent under `vidgate serve --workers N` for each N of the plan,
        measured in this one phase so they compare with each other; the best submit throughput is the
        recommended N (issue 13: which N serves best on these cores)."""
        plan = self.plan
        level = 32
        dbs = getattr(self, "dbs", None) or await self.prepare_vidgate_dbs()
        db = dbs["vidgate-postgresql"]
        cells: dict[str, dict[str, Any]] = {}
        for n in plan.worker_counts:
            sim, sim_url = await self.start_simulator()
            server: Proc | None = None
            offset = 0
            cell: dict[str, Any] = {}
            try:
                server, base = await self.start_vidgate(db, sim_url, run_worker=False, workers=n)
                if db.tenant_key is None:
                    db.tenant_id, db.tenant_key = await self.make_tenant(base, "bench-submit", budget_cents=10**9)
                auth = f"Bearer {db.tenant_key}"
                offset = server.log_size()
                await self.wait_quiet()
                cell["submit"] = await self.measure(
                    base,
                    method="POST",
                    paths=[f"/api/v1/models/{MODEL}/generate"],
                    auths=[auth],
                    body=SUBMIT_BODY,
                    concurrency=level,
                    label=f"submit postgresql --workers {n}",
                    server=server,
                    cost=self.cost_meter(server, base, db),
                )
                ids = await self.submit_many(base, auth, 64, 8)
                cell["get"] = await self.measure(
                    base,
                    method="GET",
                    paths=[f"/api/v1/predictions/{i}" for i in ids],
                    auths=[auth],
                    body=None,
                    concurrency=level,
                    label=f"read postgresql --workers {n}",
                    server=server,
                    cost=self.cost_meter(server, base, db),
                )
            finally:
                if server is not None:
                    self.procs.stop(server)
                    self._count_hung(server, offset, cell.get("submit"), cell.get("get"))
                self.procs.stop(sim)
            cells[str(n)] = cell
        clean = {n: c for n, c in cells.items() if not c["submit"]["errors"] and not c["submit"].get("server_5xx")}
        best = max(clean or cells, key=lambda n: (clean or cells)[n]["submit"]["rps"])
        self.results["workers"] = {"level": level, "cells": cells, "recommended": int(best)}
        self.log(f"  recommended: --workers {best}")

    async def phase_busy(self) -> None:
        """Submit and GET at 32 concurrent with the embedded worker on while `busy_predictions` predictions
        are in flight and polled every POLL_INTERVAL_S (the simulator completes them only after an hour).
        The load's own submits announce an estimatedTime an hour out, so the polled set stays the same
        during the cell. One process, compared with the quiet cells of the submit phase."""
        plan = self.plan
        n = plan.busy_predictions
        level = 32
        out: dict[str, Any] = {}
        for setup in plan.busy_setups:
            if setup == "vidgate-postgresql":
                db = VidgateDb("postgresql-busy", await self.fresh_postgres(f"vidgate_bench_busy_{self.db_tag}"))
            else:
                db = VidgateDb("sqlite-busy", f"sqlite:///{self.workdir / 'vidgate-busy.db'}")
            await self.migrate(db.url)
            sim, sim_url = await self.start_simulator(completion_s=3600.0, estimated=BUSY_ESTIMATED)
            server: Proc | None = None
            offset = 0
            cell: dict[str, Any] = {"polled_predictions": n}
            try:
                server, base = await self.start_vidgate(db, sim_url, run_worker=True)
                _, key = await self.make_tenant(base, "bench-busy", budget_cents=10**9)
                auth = f"Bearer {key}"
                polled = await self.submit_many(base, auth, n, 16)
                await self._until_polled(sim_url, n, timeout_s=120.0)
                await self.sim_config(sim_url, estimated_time=LOAD_ESTIMATED)
                offset = server.log_size()
                await self.wait_quiet()
                for op, method, paths, body in (
                    ("submit", "POST", [f"/api/v1/models/{MODEL}/generate"], SUBMIT_BODY),
                    ("get", "GET", [f"/api/v1/predictions/{i}" for i in polled], None),
                ):
                    before = await self._json(sim_url + "/_sim/stats")
                    began = time.monotonic()
                    cell[op] = await self.measure(
                        base,
                        method=method,
                        paths=paths,
                        auths=[auth],
                        body=body,
                        concurrency=level,
                        label=f"{op} {setup} + worker polling {n}",
                        server=server,
                        cost=self.cost_meter(server, base, db),
                    )
                    after = await self._json(sim_url + "/_sim/stats")
                    cell[op]["upstream_polls_per_s"] = (after["polls"] - before["polls"]) / (time.monotonic() - began)
                    self.log(f"    upstream polls meanwhile: {cell[op]['upstream_polls_per_s']:.0f}/s")
            finally:
                if server is not None:
                    self.procs.stop(server)
                    self._count_hung(server, offset, cell.get("submit"), cell.get("get"))
                self.procs.stop(sim)
            out[setup] = cell
        self.results["busy"] = {"level": level, "cells": out, "poll_interval_s": POLL_INTERVAL_S}

    async def _until_polled(self, sim_url: str, n: int, timeout_s: float) -> None:
        """Wait until the worker has polled n predictions at least once: polling is under way."""
        deadline = time.monotonic() + timeout_s
        while True:
            stats = await self._json(sim_url + "/_sim/stats")
            if len(stats.get("pollsById", {})) >= n:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {len(stats.get('pollsById', {}))} of {n} predictions polled in {timeout_s:g} s"
                )
            await asyncio.sleep(0.5)

    async def phase_contention(self) -> None:
        plan = self.plan
        dbs = getattr(self, "dbs", None) or await self.prepare_vidgate_dbs()
        db = dbs["vidgate-postgresql"]
        sim, sim_url = await self.start_simulator()
        server, base = await self.start_vidgate(db, sim_url, run_worker=False)
        try:
            _, one_key = await self.make_tenant(base, "contention-one", budget_cents=10**9)
            spread_keys = [
                (await self.make_tenant(base, f"contention-{i}", budget_cents=10**9))[1]
                for i in range(plan.contention_tenants)
            ]
            variants = {
                "one tenant": [f"Bearer {one_key}"],
                f"{plan.contention_tenants} tenants": [f"Bearer {k}" for k in spread_keys],
            }
            runs: dict[str, list[Load]] = {name: [] for name in variants}
            for auths in variants.values():  # warm both paths first
                await run_load(
                    base,
                    method="POST",
                    paths=[f"/api/v1/models/{MODEL}/generate"],
                    auths=auths,
                    body=SUBMIT_BODY,
                    concurrency=plan.contention_concurrency,
                    duration_s=plan.warmup_s,
                    workdir=self.workdir,
                )
            await self.wait_quiet()
            meter = CpuMeter(self.db_tag)
            for _ in range(plan.reps):  # interleaved, so drift hits both alike
                for name, auths in variants.items():
                    runs[name].append(
                        await run_load(
                            base,
                            method="POST",
                            paths=[f"/api/v1/models/{MODEL}/generate"],
                            auths=auths,
                            body=SUBMIT_BODY,
                            concurrency=plan.contention_concurrency,
                            duration_s=plan.duration_s,
                            workdir=self.workdir,
                        )
                    )
            out = {name: summarize(r) for name, r in runs.items()}
            foreign = meter.foreign_cores()
            self.note_foreign(foreign)
            for s in out.values():
                s["foreign_cores"] = foreign
            for name, s in out.items():
                self.log(
                    f"  contention {name:<12} c={plan.contention_concurrency} {s['rps']:8.0f} req/s  p50 {s['p50']:.2f} ms  p99 {s['p99']:.2f} ms"
                )
            self.results["contention"] = out
        finally:
            self.procs.stop(server)
            self.procs.stop(sim)

    async def phase_scopes(self) -> None:
        """Submit CPU with today's keys against keys narrowed by scopes, models and an expiry (SPEC §13): the
        checks read the cached key, so the gateway's CPU per submit should not move.
        PostgreSQL, one process, interleaved runs; CPU of the serving process tree over its answered submits."""
        plan = self.plan
        dbs = getattr(self, "dbs", None) or await self.prepare_vidgate_dbs()
        db = dbs["vidgate-postgresql"]
        sim, sim_url = await self.start_simulator()
        server, base = await self.start_vidgate(db, sim_url, run_worker=False)
        try:
            tenants = [(await self.make_tenant(base, f"scopes-{i}", budget_cents=10**9)) for i in range(8)]
            narrowed = {
                "scopes": ["generate"],
                "models": [MODEL],
                "expiresAt": "2999-01-01T00:00:00.000Z",
            }
            scoped = [
                (await self.admin(base, "POST", f"/admin/v1/tenants/{tenant_id}/keys", narrowed))["key"]
                for tenant_id, _ in tenants
            ]
            variants = {
                "today's keys": [f"Bearer {k}" for _, k in tenants],
                "scoped keys": [f"Bearer {k}" for k in scoped],
            }
            load = {
                "method": "POST",
                "paths": [f"/api/v1/models/{MODEL}/generate"],
                "body": SUBMIT_BODY,
                "concurrency": plan.contention_concurrency,
                "workdir": self.workdir,
            }
            for auths in variants.values():  # warm both paths first (key cache, statement caches)
                await run_load(base, auths=auths, duration_s=plan.warmup_s, **load)
            await self.wait_quiet()
            meter = CpuMeter(self.db_tag)
            runs: dict[str, list[Load]] = {name: [] for name in variants}
            cpu_ms: dict[str, list[float]] = {name: [] for name in variants}
            for _ in range(plan.reps):  # interleaved, so drift hits both alike
                for name, auths in variants.items():
                    before = sum(tree_cpu_s(server.pid).values())
                    result = await run_load(base, auths=auths, duration_s=plan.duration_s, **load)
                    spent = sum(tree_cpu_s(server.pid).values()) - before
                    runs[name].append(result)
                    answered = max(result.requests - result.errors, 1)
                    cpu_ms[name].append(1000 * spent / answered)
            out = {name: summarize(r) for name, r in runs.items()}
            foreign = meter.foreign_cores()
            self.note_foreign(foreign)
            for name, s in out.items():
                s["foreign_cores"] = foreign
                s["server_cpu_ms_per_submit"] = median(cpu_ms[name])
                s["server_cpu_ms_runs"] = cpu_ms[name]
                self.log(
                    f"  scopes {name:<13} c={plan.contention_concurrency} {s['rps']:8.0f} req/s"
                    f"  server CPU {s['server_cpu_ms_per_submit']:.3f} ms/submit  p50 {s['p50']:.2f} ms"
                )
            today, narrow = (out[n]["server_cpu_ms_per_submit"] for n in variants)
            out["ratio"] = {"scoped_over_today_cpu": narrow / today if today else None}
            self.log(f"  scopes: scoped / today's CPU per submit = {out['ratio']['scoped_over_today_cpu']:.3f}")
            self.results["scopes"] = out
        finally:
            self.procs.stop(server)
            self.procs.stop(sim)

    async def phase_polling(self) -> None:
        plan = self.plan
        n = plan.poll_predictions
        db = VidgateDb("postgresql-poll", await self.fresh_postgres(f"vidgate_bench_poll_{self.db_tag}"))
        await self.migrate(db.url)
        receiver, ports, hole = await self.start_receiver(1 + plan.webhook_receivers)
        rec_url = f"http://127.0.0.1:{ports[0]}"
        self.receiver, self.receiver_ports, self.black_hole_port, self.poll_db = receiver, ports, hole, db
        sim, sim_url = await self.start_simulator()
        self.poll_sim_url = sim_url
        server, base = await self.start_vidgate(db, sim_url, run_worker=True)
        try:
            # Several tenants, so the submissions are not serialized on one tenant's budget rows; their
            # webhook endpoints are spread over the receivers (vidgate caps deliveries per endpoint).
            keys = []
            for i in range(plan.poll_tenants):
                hook = f"http://127.0.0.1:{ports[i % len(ports)]}/hook"
                keys.append(
                    "Bearer "
                    + (await self.make_tenant(base, f"bench-poll-{i}", budget_cents=None, webhook_url=hook))[1]
                )
            await self.wait_quiet()
            meter = CpuMeter(self.db_tag)
            # Submissions must all be accepted before the first completion: size the lead from the
            # submit rate measured earlier in this run (or a cautious guess).
            pg = self.results.get("submit", {}).get("vidgate-postgresql", {}).get("32") or {}
            spread = (self.results.get("contention") or {}).values()
            measured = max([pg.get("rps") or 0.0] + [c.get("rps") or 0.0 for c in spread]) or 100.0
            submit_estimate = min(n / max(measured * 0.8, 1.0), plan.poll_max_lead_s)
            lead = max(plan.poll_window_s + 5.0, submit_estimate + plan.poll_window_s + 10.0)
            t0 = time.time()
            first_completion = t0 + lead
            batches = math.ceil(n / plan.poll_batch)
            samples: list[dict[str, float]] = []
            sampling = asyncio.create_task(self._sample(server, sim_url, rec_url, samples, t0))
            windows = []
            submitted = 0
            for b in range(batches):
                target = first_completion + plan.poll_spread_s * (b / max(batches - 1, 1))
                lower = max(1, math.floor(target - time.time() - plan.poll_window_s))
                completion = lower + plan.poll_window_s  # exactly poll_window_s after the announced lower bound
                await self.sim_config(sim_url, completion_s=completion, estimated_time=f"{lower}-{lower + 15}s")
                count = min(plan.poll_batch, n - submitted)
                await self.submit_many(base, keys, count, plan.poll_submit_concurrency)
                submitted += count
                windows.append(completion - lower)
            submit_done = time.time()
            self.log(
                f"  {n} predictions submitted in {submit_done - t0:.1f} s; completions from +{lead:.0f} s over {plan.poll_spread_s:.0f} s"
            )
            prof = self.maybe_profile(
                server, "polling-postgresql", max(first_completion - time.time(), 0) + plan.poll_spread_s
            )
            delivered = await self.wait_delivered(
                rec_url, ports, n, first_completion + plan.poll_spread_s + plan.poll_drain_s, 1.0
            )
            finished = time.time()
            await self.finish_profile(prof, "polling-postgresql")
            sampling.cancel()
            metrics_text = await self._text(base + "/metrics", {"Authorization": f"Bearer {self.admin_token}"})
            sim_stats = await self._json(sim_url + "/_sim/stats")
            rec_stats = await self._json(rec_url + "/_stats")
            hwm_kb = tree_status_kb(server.pid, "VmHWM")  # serve and its worker child
            foreign = meter.foreign_cores()
            self.note_foreign(foreign)
            cpu = sum(tree_cpu_s(server.pid).values())
        finally:
            self.procs.stop(server)
        self.procs.stop(sim)
        schedule = 1 + math.ceil(max(windows) / POLL_INTERVAL_S)
        self.results["polling"] = self._polling_summary(
            n,
            t0,
            submit_done,
            finished,
            first_completion,
            schedule,
            metrics_text,
            sim_stats,
            {
                "lags": [lag for p in ports for lag in rec_stats.get(str(p), {}).get("lags", [])],
                "duplicates": sum(rec_stats.get(str(p), {}).get("duplicates", 0) for p in ports),
            },
            hwm_kb,
            cpu,
            samples,
            delivered,
        )
        p = self.results["polling"]
        p["foreign_cores"] = foreign
        self.log(
            f"  polls/prediction mean {p['polls_mean']:.2f} max {p['polls_max']} (schedule {schedule}, allowed {schedule + 1}); "
            f"poll lag p99 {p['poll_lag_p99']}; notification lag p99 {p['notify_e2e_p99']:.2f} s; peak RSS {p['peak_rss_mb']:.0f} MB"
        )

    def _polling_summary(
        self,
        n: int,
        t0: float,
        submit_done: float,
        finished: float,
        first_completion: float,
        schedule: int,
        metrics_text: str,
        sim_stats: dict[str, Any],
        rec: dict[str, Any],
        hwm_kb: int | None,
        cpu: float | None,
        samples: list[dict[str, float]],
        delivered: int,
    ) -> dict[str, Any]:
        metrics = parse_prometheus(metrics_text)
        lag_buckets, lag_count, lag_sum = histogram(metrics, "vidgate_poll_lag_seconds")
        note_buckets, note_count, _ = histogram(metrics, "vidgate_notification_lag_seconds")
        polls = sorted(sim_stats.get("pollsById", {}).values())
        lags = sorted(rec.get("lags", []))
        peak_polls = 0.0
        for a, b in itertools.pairwise([x for x in samples if "polls" in x]):
            if b["t"] > a["t"]:
                peak_polls = max(peak_polls, (b["polls"] - a["polls"]) / (b["t"] - a["t"]))
        plan = self.plan
        return {
            "predictions": n,
            "submit_s": submit_done - t0,
            "submit_rps": n / max(submit_done - t0, 1e-9),
            "completion_spread_s": plan.poll_spread_s,
            "first_completion_after_s": first_completion - t0,
            "all_in_flight": submit_done <= first_completion,
            "window_s": plan.poll_window_s,
            "poll_interval_s": POLL_INTERVAL_S,
            "schedule_polls": schedule,
            "allowed_polls": schedule + 1,
            "polled_predictions": len(polls),
            "upstream_polls": sim_stats.get("polls"),
            "polls_mean": sum(polls) / len(polls) if polls else math.nan,
            "polls_p50": percentile(polls, 50) if polls else None,
            "polls_max": polls[-1] if polls else None,
            "polls_over_allowed": sum(1 for p in polls if p > schedule + 1),
            "demand_polls_per_s": n / plan.poll_spread_s * schedule,
            "peak_polls_per_s": peak_polls,
            "poll_lag_count": lag_count,
            "poll_lag_mean": lag_sum / lag_count if lag_count else None,
            "poll_lag_p50": histogram_quantile(0.5, lag_buckets),
            "poll_lag_p99": histogram_quantile(0.99, lag_buckets),
            "poll_lag_share_over_0_5": share_above(0.5, lag_buckets),
            "notify_metric_count": note_count,
            "notify_metric_p50": histogram_quantile(0.5, note_buckets),
            "notify_metric_p99": histogram_quantile(0.99, note_buckets),
            "delivered": delivered,
            "duplicates": rec.get("duplicates", 0),
            "notify_e2e_p50": percentile(lags, 50) if lags else math.nan,
            "notify_e2e_p99": percentile(lags, 99) if lags else math.nan,
            "notify_e2e_max": lags[-1] if lags else math.nan,
            "peak_rss_mb": (hwm_kb or 0) / 1024,
            "cpu_s": cpu,
            "wall_s": finished - t0,
            "samples": samples,
            "poll_lag_buckets": lag_buckets,
        }

    async def _sample(self, server: Proc, sim_url: str, rec_url: str, out: list[dict[str, float]], t0: float) -> None:
        tick = 0
        while True:
            row: dict[str, float] = {"t": time.time() - t0, "rss_mb": (tree_status_kb(server.pid, "VmRSS") or 0) / 1024}
            row["cpu_s"] = sum(tree_cpu_s(server.pid).values())
            if tick % 2 == 0:
                try:
                    stats = await self._json(sim_url + "/_sim/stats")
                    row["polls"] = stats["polls"]
                    row["submits"] = stats["submits"]
                    row["delivered"] = await self._received(rec_url, self.receiver_ports)
                except (aiohttp.ClientError, TimeoutError, KeyError):
                    pass
            out.append(row)
            tick += 1
            await asyncio.sleep(1.0)

    async def phase_webhooks(self) -> None:
        """Deliveries per second: the polling run's outbox is queued again by the same UPDATE the
        operator's redeliver endpoint runs, in bulk, and one `vidgate worker` drains it. Run A: the
        healthy receivers only; run B: the same, plus a share of the rows pointed at a receiver that
        accepts connections and never answers."""
        import asyncpg

        plan = self.plan
        if not hasattr(self, "poll_db"):
            raise RuntimeError("the webhooks phase reuses the polling phase's outbox: run both")
        healthy = self.receiver_ports[1:]
        rec_url = f"http://127.0.0.1:{self.receiver_ports[0]}"
        modulo = round(1 / plan.webhook_black_hole_share)
        conn = await asyncpg.connect(self.poll_db.url)
        try:
            total = await conn.fetchval("SELECT count(*) FROM webhook_deliveries")
            results = {}
            for variant in ("healthy only", "with a black hole"):
                await conn.execute(
                    "UPDATE webhook_deliveries SET status = 'succeeded', lease_owner = NULL, lease_expires_at = NULL"
                )
                await conn.execute("DELETE FROM webhook_attempts")
                cases = " ".join(f"WHEN {i} THEN {port}" for i, port in enumerate(healthy))
                await conn.execute(
                    f"""
                    WITH numbered AS (SELECT id, (row_number() OVER (ORDER BY id)) - 1 AS n FROM webhook_deliveries)
                    UPDATE webhook_deliveries d
                    SET status = 'pending', attempts = 0, next_attempt_at = now(), lease_owner = NULL,
                        lease_expires_at = NULL, delivered_at = NULL, last_status_code = NULL, last_error = NULL,
                        url = 'http://127.0.0.1:' || (CASE numbered.n % {len(healthy)} {cases} END)::text || '/hook',
                        target_host = '127.0.0.1:' || (CASE numbered.n % {len(healthy)} {cases} END)::text
                    FROM numbered WHERE numbered.id = d.id AND numbered.n % {modulo} <> {modulo - 1}
                    """
                )
                if variant == "with a black hole":
                    await conn.execute(
                        f"""
                        WITH numbered AS (SELECT id, (row_number() OVER (ORDER BY id)) - 1 AS n FROM webhook_deliveries)
                        UPDATE webhook_deliveries d
                        SET status = 'pending', attempts = 0, next_attempt_at = now(), lease_owner = NULL,
                            lease_expires_at = NULL, delivered_at = NULL,
                            url = 'http://127.0.0.1:{self.black_hole_port}/hook', target_host = '127.0.0.1:{self.black_hole_port}'
                        FROM numbered WHERE numbered.id = d.id AND numbered.n % {modulo} = {modulo - 1}
                        """
                    )
                expected = await conn.fetchval(
                    "SELECT count(*) FROM webhook_deliveries WHERE status = 'pending' AND url NOT LIKE $1",
                    f"%:{self.black_hole_port}/%",
                )
                stuck = await conn.fetchval(
                    "SELECT count(*) FROM webhook_deliveries WHERE status = 'pending' AND url LIKE $1",
                    f"%:{self.black_hole_port}/%",
                )
                async with self.http.post(rec_url + "/_reset") as r:
                    await r.read()
                await self.wait_quiet()
                meter = CpuMeter(self.db_tag)
                worker = self.procs.start(
                    "vidgate-worker",
                    [self.vidgate_bin, "worker"],
                    self.vidgate_env(self.poll_db.url, self.poll_sim_url, run_worker=True),
                    self.workdir,
                )
                prof = (
                    self.maybe_profile(worker, "webhooks-" + variant.replace(" ", "-"), 20.0)
                    if variant == "healthy only"
                    else None
                )
                began = time.time()
                received = 0
                try:
                    while time.time() - began < plan.webhook_timeout_s:
                        if not worker.alive():
                            raise RuntimeError(f"vidgate worker exited: {worker.log_tail()}")
                        received = await self._received(rec_url, healthy)
                        if received >= expected:
                            break
                        await asyncio.sleep(0.25)
                    await self.finish_profile(prof, "webhooks-healthy-only")
                    stats = await self._json(rec_url + "/_stats?lags=0")
                    foreign = meter.foreign_cores()
                finally:
                    self.procs.stop(worker, timeout_s=30)
                per = {p: stats.get(str(p), {}) for p in healthy}
                firsts = [s["first"] for s in per.values() if s.get("first")]
                lasts = [s["last"] for s in per.values() if s.get("last")]
                span = (max(lasts) - min(firsts)) if firsts and lasts else math.nan
                count = sum(s.get("count", 0) for s in per.values())
                rate = (count - 1) / span if span and span > 0 else math.nan
                self.note_foreign(foreign)
                results[variant] = {
                    "foreign_cores": foreign,
                    "expected": expected,
                    "black_hole_rows": stuck,
                    "received": count,
                    "duplicates": sum(s.get("duplicates", 0) for s in per.values()),
                    "span_s": span,
                    "rate": rate,
                    "per_receiver": {
                        str(p): ((s.get("count", 0) - 1) / (s["last"] - s["first"]))
                        if s.get("last") and s.get("first") and s["last"] > s["first"]
                        else None
                        for p, s in per.items()
                    },
                }
                self.log(
                    f"  webhooks {variant:<18} {count}/{expected} delivered to {len(healthy)} receivers in {span:.2f} s = {rate:.0f}/s"
                    + (f" ({stuck} rows to the black hole)" if stuck else "")
                )
            results["total_rows"] = total
            results["receivers"] = len(healthy)
            self.results["webhooks"] = results
        finally:
            await conn.close()
            self.procs.stop(self.receiver)

    # ------------------------------------------------------------------ small helpers

    async def sim_config(self, sim_url: str, **values: Any) -> None:
        async with self.http.post(sim_url + "/_sim/config", json=values) as response:
            await response.read()

    async def _json(self, url: str) -> Any:
        async with self.http.get(url) as response:
            return await response.json(content_type=None)

    async def _text(self, url: str, headers: dict[str, str] | None = None) -> str:
        async with self.http.get(url, headers=headers) as response:
            response.raise_for_status()
            return await response.text()

    async def wait_delivered(self, rec_url: str, ports: list[int], n: int, deadline: float, every_s: float) -> int:
        """How many webhooks the receivers got, once `n` arrived or at `deadline` (a time.time())."""
        delivered = 0
        while time.time() < deadline:
            delivered = await self._received(rec_url, ports)
            if delivered >= n:
                break
            await asyncio.sleep(every_s)
        return delivered

    async def _received(self, rec_url: str, ports: list[int]) -> int:
        stats = await self._json(rec_url + "/_stats?lags=0")
        return sum(stats.get(str(p), {}).get("count", 0) for p in ports)


def _cost_line(cost: dict[str, Any] | None) -> str:
    if not cost:
        return ""
    parts = []
    if "server_cpu_ms" in cost:
        parts.append(f"server {cost['server_cpu_ms']:.2f}")
    if "pg_backend_cpu_ms" in cost:
        parts.append(f"pg {cost['pg_backend_cpu_ms']:.2f}+{cost['pg_aux_cpu_ms']:.2f}")
    text = "  CPU ms/req " + " ".join(parts) if parts else ""
    if "statements" in cost:
        text += f"  stmts/req {cost['statements']:.2f}"
    if "commits" in cost:
        text += f"  commits/req {cost['commits']:.2f}"
    hold = (cost.get("batches") or {}).get("hold")
    if hold:
        text += f"  hold batch mean {hold['mean']:.1f}"
    return text


def app_digest() -> str:
    """A digest of the gateway's code as it is on disk (app/, migrations included): the servers a run starts
    import whatever is there at that moment, so a change mid-run is worth knowing about."""
    import hashlib

    h = hashlib.sha256()
    for folder in ("app",):
        for path in sorted((ROOT / folder).rglob("*.py")):
            h.update(str(path.relative_to(ROOT)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:12]


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def machine_info(command: str) -> dict[str, Any]:
    cpu_model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    wrk = "not installed"
    if have_wrk():
        out = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
        wrk = (out.stdout or out.stderr).splitlines()[0] if (out.stdout or out.stderr) else "wrk"
    pg = "?"
    try:
        out = subprocess.run(["psql", "--version"], capture_output=True, text=True, check=False)
        pg = out.stdout.strip() or "?"
    except OSError:
        pass
    git = "?"
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "app", "pyproject.toml"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        git = head + (" + uncommitted changes in app/" if dirty else "")
    except OSError:
        pass
    packages = [
        "fastapi",
        "starlette",
        "uvicorn",
        "h11",
        "httptools",
        "uvloop",
        "sqlalchemy",
        "asyncpg",
        "aiosqlite",
        "pydantic",
        "orjson",
        "aiohttp",
        "httpx",
        "prometheus-client",
        "matplotlib",
    ]
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "cores": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gib": round(mem_gib, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": {p: _version(p) for p in packages},
        "sqlite": sqlite3.sqlite_version,
        "postgresql": pg,
        "wrk": wrk,
        "git": git,
        "app_digest": app_digest(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="Benchmark vidgate against baselines started in the same run."
    )
    parser.add_argument(
        "--smoke", action="store_true", help="a tiny run (about a minute) that only checks the benchmark still works"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also record py-spy profiles of the gateway (numbers are perturbed; written to bench/profiles/)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where results.md, results.json and the charts go (default bench/; bench/smoke/ with --smoke; bench/profiles/ with --profile)",
    )
    parser.add_argument(
        "--only",
        default="clients,submit,workers,busy,contention,scopes,polling,webhooks,providers,queue",
        help="comma-separated phases to run",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the scratch directory (process logs, SQLite file) after the run"
    )
    parser.add_argument(
        "--vidgate-env",
        action="append",
        default=[],
        metavar="VIDGATE_NAME=VALUE",
        help="an extra setting for every vidgate process (repeatable), for before/after experiments",
    )
    parser.add_argument(
        "--report-only",
        type=Path,
        metavar="RESULTS_JSON",
        help="measure nothing: rewrite results.md and the charts next to an existing results.json",
    )
    parser.add_argument(
        "--before",
        type=Path,
        default=BENCH_DIR / "before" / "results.json",
        help="an earlier run's results.json to compare with in the report's before/after table",
    )
    args = parser.parse_args(argv)
    before = json.loads(args.before.read_text()) if args.before and args.before.exists() else None
    if args.report_only:
        results = json.loads(args.report_only.read_text())
        report.write(
            results, args.report_only.parent, smoke=results.get("plan", {}).get("name") == "smoke", before=before
        )
        print(f"bench: wrote {args.report_only.parent / 'results.md'}", flush=True)
        return 0
    plan = SMOKE if args.smoke else FULL
    # A smoke run never overwrites the real results: it writes to bench/smoke/ (ignored by git).
    out_dir = args.out or (BENCH_DIR / "profiles" if args.profile else BENCH_DIR / "smoke" if args.smoke else BENCH_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = "python -m bench" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    bench = Bench(plan, out_dir, args.profile, command, set(args.only.split(",")))
    for item in args.vidgate_env:
        name, sep, value = item.partition("=")
        if not sep or not name.startswith("VIDGATE_"):
            parser.error(f"--vidgate-env wants VIDGATE_NAME=VALUE, not {item!r}")
        bench.extra_vidgate_env[name] = value
    bench.results["vidgate_env"] = dict(bench.extra_vidgate_env)
    try:
        asyncio.run(bench.run())
    except KeyboardInterrupt:
        print("bench: interrupted; stopping processes", file=sys.stderr)
        return 130
    finally:
        bench.procs.stop_all()
        try:
            asyncio.run(bench.drop_databases())
        except Exception as exc:
            print(f"bench: could not drop the run's databases {bench.databases}: {exc}", file=sys.stderr)
    (out_dir / "results.json").write_text(json.dumps(bench.results, indent=1, default=str))
    report.write(bench.results, out_dir, smoke=args.smoke, before=before)
    print(f"bench: wrote {out_dir / 'results.md'}", flush=True)
    if args.keep or bench.results.get("had_errors"):
        print(f"bench: process logs kept in {bench.workdir}", flush=True)
    else:
        shutil.rmtree(bench.workdir, ignore_errors=True)
    return 0
