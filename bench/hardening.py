"""Two cells of issue 24: overload, and slow clients (`python -m bench.hardening [--smoke]`).

Overload: a gateway whose limit is sized from its pool (VIDGATE_DATABASE_POOL_SIZE=4: 16 requests in flight)
under closed-loop submit clients that give up after CLIENT_GIVES_UP_S and retry a refusal after its
Retry-After: at the limit, then at 16 times it; and at 16 times without a limit (before). The
goals: at 16x no admitted request waits until its client gives up, and the admitted p99 stays within 3x
its value at the limit.

Slow clients: each candidate server in front of the same app, with nothing in front of it: how much of a
200 MiB header it takes in and what that costs its memory; whether a silent connection and a trickled
head are closed (and after how long); what 2,000 slow connections held open do to another client's
latency; and what the protocol costs a plain request (GET /healthz at 32 concurrent).

Writes bench/hardening.md and bench/hardening.json (bench/smoke/ with --smoke). SQLite, one process, on
loopback; bounded loops only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from bench.ports import free_port
from bench.procs import Proc, Processes, proc_status_kb
from bench.stats import percentile

BENCH_DIR = Path(__file__).resolve().parent
ADMIN = "bench-admin-token-0123456789abcdef0123"
CLIENT_GIVES_UP_S = 10.0
MiB = 1024 * 1024


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


class Run:
    def __init__(self, smoke: bool, out_dir: Path) -> None:
        self.smoke = smoke
        self.out_dir = out_dir
        self.workdir = Path(tempfile.mkdtemp(prefix="vidgate-bench-hardening-"))
        self.procs = Processes(self.workdir)
        self.results: dict[str, Any] = {"smoke": smoke}

    def checkpoint(self) -> None:
        """The report so far: a run cut short keeps the cells it measured."""
        write_report(self.results, self.out_dir)

    def env(self, sim_url: str, db: Path, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("VIDGATE_")}
        env.update(
            VIDGATE_DATABASE_URL=f"sqlite:///{db}",
            VIDGATE_UPSTREAM_BASE_URL=sim_url,
            VIDGATE_UPSTREAM_API_KEY="bench-vendor-key",
            VIDGATE_ADMIN_TOKEN=ADMIN,
            VIDGATE_RUN_WORKER="false",
            VIDGATE_REHOST_OUTPUTS="false",
            VIDGATE_LOG_LEVEL="WARNING",
        )
        env.update(extra)
        return env

    async def wait_up(self, proc: Proc, url: str) -> None:
        async with aiohttp.ClientSession() as http:
            for _ in range(300):  # bounded: 30 s
                if not proc.alive():
                    raise RuntimeError(f"{proc.name} exited:\n{proc.log_tail()}")
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with http.get(url + "/healthz") as answer:
                        if answer.status == 200:
                            return
                await asyncio.sleep(0.1)
        raise RuntimeError(f"{proc.name} did not come up")

    @contextlib.asynccontextmanager
    async def simulator(self) -> AsyncIterator[str]:
        port = free_port()
        proc = self.procs.start(
            "simulator",
            [_bin("vidgate"), "simulator", "--port", str(port), "--completion-s", "3600"],
            self.env("", self.workdir / "unused.db"),
            self.workdir,
        )
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            await asyncio.sleep(0.1)
        try:
            yield url
        finally:
            self.procs.stop(proc)

    async def database(self, sim_url: str, name: str) -> Path:
        db = self.workdir / f"{name}.db"
        migrate = self.procs.start(f"migrate-{name}", [_bin("vidgate"), "migrate"], self.env(sim_url, db), self.workdir)
        await asyncio.to_thread(migrate.popen.wait, 60)
        return db

    @contextlib.asynccontextmanager
    async def server(self, name: str, argv: list[str], env: dict[str, str], port: int) -> AsyncIterator[Proc]:
        proc = self.procs.start(name, argv, env, self.workdir)
        try:
            await self.wait_up(proc, f"http://127.0.0.1:{port}")
            yield proc
        finally:
            self.procs.stop(proc)

    # ------------------------------------------------------------ overload

    async def tenant_key(self, base: str) -> str:
        headers = {"Authorization": f"Bearer {ADMIN}"}
        async with aiohttp.ClientSession(headers=headers) as http:
            async with http.post(base + "/admin/v1/tenants", json={"name": "bench"}) as answer:
                tenant = await answer.json()
            async with http.post(base + f"/admin/v1/tenants/{tenant['id']}/keys", json={}) as answer:
                return str((await answer.json())["key"])

    async def closed_loop(self, base: str, key: str, clients: int, duration_s: float) -> dict[str, Any]:
        body = {"image": "https://example.com/a.png", "prompt": "bench", "resolution": "480p", "duration": 5}
        latencies: list[float] = []
        counts: dict[str, int] = {}
        deadline = time.monotonic() + duration_s
        timeout = aiohttp.ClientTimeout(total=CLIENT_GIVES_UP_S)
        connector = aiohttp.TCPConnector(limit=clients)
        async with aiohttp.ClientSession(
            timeout=timeout, connector=connector, headers={"Authorization": f"Bearer {key}"}
        ) as http:

            async def client() -> None:
                while time.monotonic() < deadline:
                    began = time.perf_counter()
                    try:
                        async with http.post(base + "/api/v1/models/ltx-2-19b/generate", json=body) as answer:
                            await answer.read()
                            outcome = str(answer.status)
                    except TimeoutError:
                        outcome = "gave up"
                    except aiohttp.ClientError as exc:
                        outcome = type(exc).__name__
                    counts[outcome] = counts.get(outcome, 0) + 1
                    if outcome == "200":
                        latencies.append(time.perf_counter() - began)
                    elif outcome == "503":
                        await asyncio.sleep(1.0)  # Retry-After: 1, as the gateway asks (and vidgate-client does)

            await asyncio.gather(*(client() for _ in range(clients)))
        latencies.sort()
        return {
            "clients": clients,
            "outcomes": counts,
            "admitted_per_s": round(len(latencies) / duration_s, 1),
            "p50_ms": round(percentile(latencies, 50) * 1000, 1) if latencies else None,
            "p99_ms": round(percentile(latencies, 99) * 1000, 1) if latencies else None,
            "max_ms": round(latencies[-1] * 1000, 1) if latencies else None,
        }

    async def overload(self, sim_url: str) -> None:
        duration = 3.0 if self.smoke else 20.0
        cells: dict[str, Any] = {}
        for label, limit_env in (("limit 16 (from a pool of 4)", None), ("no limit (before)", "100000")):
            db = await self.database(sim_url, "overload" + ("-nolimit" if limit_env else ""))
            port = free_port()
            extra = {"VIDGATE_DATABASE_POOL_SIZE": "4"}
            if limit_env:
                extra["VIDGATE_MAX_INFLIGHT_REQUESTS"] = limit_env
            argv = [_bin("vidgate"), "serve", "--port", str(port)]
            async with self.server("serve-overload", argv, self.env(sim_url, db, **extra), port):
                base = f"http://127.0.0.1:{port}"
                key = await self.tenant_key(base)
                runs = {}
                for clients in (16, 256):
                    if limit_env and clients == 16:
                        continue
                    runs[f"{clients} clients"] = await self.closed_loop(base, key, clients, duration)
                cells[label] = runs
        limited = cells["limit 16 (from a pool of 4)"]
        at, over = limited["16 clients"], limited["256 clients"]
        cells["goals"] = {
            "no admitted request waited until its client gave up (16x)": over["outcomes"].get("gave up", 0) == 0,
            "admitted p99 at 16x / at the limit": round(over["p99_ms"] / at["p99_ms"], 2)
            if over["p99_ms"] and at["p99_ms"]
            else None,
        }
        self.results["overload"] = cells
        self.checkpoint()

    # ------------------------------------------------------------ slow clients

    @staticmethod
    def huge_header(port: int, total: int) -> dict[str, Any]:
        sent = 0
        answer = b""
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: bench\r\nX-Huge: ")
            chunk = b"a" * (256 * 1024)
            with contextlib.suppress(OSError):
                while sent < total:
                    sock.sendall(chunk)
                    sent += len(chunk)
                sock.sendall(b"\r\n\r\n")
            with contextlib.suppress(OSError):
                answer = sock.recv(64)
        return {"accepted_mib": round(sent / MiB, 1), "answer": answer.split(b"\r\n", 1)[0].decode(errors="replace")}

    @staticmethod
    async def closed_after(port: int, send: bytes, trickle: bool, cap_s: float) -> float | None:
        """Seconds until the server closes a connection that sent `send` (one byte each 0.5 s if `trickle`)."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        began = time.monotonic()
        try:

            async def feed() -> None:
                for byte in send if trickle else [send]:
                    writer.write(bytes([byte]) if isinstance(byte, int) else byte)
                    with contextlib.suppress(OSError):
                        await writer.drain()
                    if trickle:
                        await asyncio.sleep(0.5)

            feeder = asyncio.ensure_future(feed())
            try:
                await asyncio.wait_for(reader.read(), cap_s)
            except TimeoutError:
                return None
            finally:
                feeder.cancel()
            return round(time.monotonic() - began, 1)
        finally:
            writer.close()

    @staticmethod
    async def latency(port: int, clients: int, requests: int) -> dict[str, float]:
        latencies: list[float] = []
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as http:

            async def client() -> None:
                for _ in range(requests):
                    began = time.perf_counter()
                    async with http.get(f"http://127.0.0.1:{port}/healthz") as answer:
                        await answer.read()
                    latencies.append(time.perf_counter() - began)

            began = time.perf_counter()
            await asyncio.gather(*(client() for _ in range(clients)))
            elapsed = time.perf_counter() - began
        latencies.sort()
        return {
            "per_s": round(len(latencies) / elapsed),
            "p50_ms": round(percentile(latencies, 50) * 1000, 2),
            "p99_ms": round(percentile(latencies, 99) * 1000, 2),
        }

    async def slow_clients(self, sim_url: str) -> None:
        db = await self.database(sim_url, "slow")
        header_mib = 20 if self.smoke else 200
        slow_connections = 200 if self.smoke else 2000
        cap_s = 3.0 if self.smoke else 40.0
        # The smoke run only checks the cells work: the gateway's head timeout is cut to fit its cap.
        timeouts = {"VIDGATE_CLIENT_HEADER_TIMEOUT_S": "2"} if self.smoke else {}
        requests = 50 if self.smoke else 300
        candidates: dict[str, list[str]] = {
            "uvicorn httptools (before)": [_bin("uvicorn"), "--factory", "app.main:app_from_environment", "--http", "httptools"],
            "uvicorn h11, 32 KiB events": [
                _bin("uvicorn"), "--factory", "app.main:app_from_environment", "--http", "h11",
                "--h11-max-incomplete-event-size", str(32 * 1024),
            ],
            "vidgate serve (guarded httptools)": [_bin("vidgate"), "serve"],
        }  # fmt: skip
        if shutil.which(_bin("granian")) or Path(_bin("granian")).exists():
            candidates["granian"] = [
                _bin("granian"), "--interface", "asgi", "--factory", "app.main:app_from_environment", "--log-level", "warning",
            ]  # fmt: skip
        cells: dict[str, Any] = {}
        for label, argv in candidates.items():
            port = free_port()
            full = [*argv, "--port", str(port), "--host", "127.0.0.1"]
            async with self.server("serve-slow", full, self.env(sim_url, db, **timeouts), port) as proc:
                cell: dict[str, Any] = {}
                cell["healthz at 32 concurrent"] = await self.latency(port, 32, requests)
                before_kb = proc_status_kb(proc.pid, "VmRSS") or 0
                cell["200 MiB header"] = await asyncio.to_thread(self.huge_header, port, header_mib * MiB)
                after_kb = proc_status_kb(proc.pid, "VmRSS") or 0
                cell["200 MiB header"]["rss_growth_mib"] = round((after_kb - before_kb) / 1024, 1)
                silent, trickled = await asyncio.gather(
                    self.closed_after(port, b"", False, cap_s),
                    self.closed_after(
                        port, b"GET /healthz HTTP/1.1\r\nHost: bench\r\nX-Slow: " + b"a" * 200, True, cap_s
                    ),
                )
                cell["silent connection closed after s"] = silent
                cell["trickled head closed after s"] = trickled
                held: list[asyncio.StreamWriter] = []
                try:
                    for number in range(slow_connections):
                        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
                        if number % 2:
                            writer.write(b"GET /healthz HTTP/1.1\r\nHost: ben")
                        held.append(writer)
                    cell[f"healthz at 32 concurrent, {slow_connections} slow connections open"] = await self.latency(
                        port, 32, requests
                    )
                finally:
                    for writer in held:
                        writer.close()
                cells[label] = cell
                self.results["slow_clients"] = cells
                self.checkpoint()


def write_report(results: dict[str, Any], out_dir: Path) -> None:
    lines = ["# Issue 24 cells: overload and slow clients", "", "`python -m bench.hardening` (SQLite, loopback).", ""]
    overload = results.get("overload")
    if overload:
        lines += [
            "## Overload (closed-loop submits; a client gives up after 10 s and waits the Retry-After of a 503)",
            "",
        ]
        lines += [
            "| gateway | clients | admitted/s | p50 ms | p99 ms | max ms | outcomes |",
            "|---|---|---|---|---|---|---|",
        ]
        for label, runs in overload.items():
            if label == "goals":
                continue
            for run in runs.values():
                lines.append(
                    f"| {label} | {run['clients']} | {run['admitted_per_s']} | {run['p50_ms']} | {run['p99_ms']} | "
                    f"{run['max_ms']} | {json.dumps(run['outcomes'])} |"
                )
        lines += ["", "Goals: " + json.dumps(overload["goals"]), ""]
    slow = results.get("slow_clients")
    if slow:
        lines += ["## Slow and hostile clients, nothing in front", ""]
        for label, cell in slow.items():
            lines += [f"### {label}", ""]
            for name, value in cell.items():
                lines.append(f"- {name}: {json.dumps(value)}")
            lines.append("")
    (out_dir / "hardening.md").write_text("\n".join(lines) + "\n")
    (out_dir / "hardening.json").write_text(json.dumps(results, indent=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hardening", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a short run that only checks the cells still work")
    parser.add_argument("--only", default="overload,slow", help="overload, slow or both")
    args = parser.parse_args(argv)
    out_dir = BENCH_DIR / "smoke" if args.smoke else BENCH_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    run = Run(args.smoke, out_dir)

    async def measure() -> None:
        async with run.simulator() as sim_url:
            if "overload" in args.only:
                await run.overload(sim_url)
            if "slow" in args.only:
                await run.slow_clients(sim_url)

    try:
        asyncio.run(measure())
    finally:
        run.procs.stop_all()
    write_report(run.results, out_dir)
    print(f"bench: wrote {out_dir / 'hardening.md'}", flush=True)
    shutil.rmtree(run.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
