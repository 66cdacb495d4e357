"""A/B of the read path and per-request CPU: two versions of vidgate, interleaved, on one PostgreSQL.

    .venv/bin/python bench/experiments/readpath/ab.py --base <commit> [--rounds 3] [--duration 5]

A is `--base` (exported with `git archive` to a temporary directory and put first on PYTHONPATH), B is
this checkout. Each round starts a fresh `vidgate serve` of each version in turn (the order alternates
from round to round) against the same database and simulator, and measures with bench/aioload.py:
submit and GET of processing predictions at 8 and 32 concurrent, and GET of final (terminal)
predictions at 32. The machine is shared, so the figure that counts is B/A within a round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

ROOT = Path(__file__).resolve().parents[3]
PG = "postgresql://postgres@127.0.0.1:5432"
DB = "vidgate_ab_readpath"
ADMIN = "ab-admin-token-0123456789abcdef0123"
VENDOR_KEY = "bench-vendor-key"
BODY = '{"image":"https://example.com/cat.png","prompt":"a cat waves at the camera","resolution":"480p","duration":5}'
CELLS = [("submit", 8), ("submit", 32), ("get", 8), ("get", 32), ("get-final", 32)]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env(code: Path, sim_url: str, workdir: Path) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("VIDGATE_")}
    return base | {
        "PYTHONPATH": str(code),
        "PYTHONUNBUFFERED": "1",
        "VIDGATE_DATABASE_URL": f"postgresql+asyncpg://postgres@127.0.0.1:5432/{DB}",
        "VIDGATE_UPSTREAM_BASE_URL": sim_url,
        "VIDGATE_UPSTREAM_API_KEY": VENDOR_KEY,
        "VIDGATE_ADMIN_TOKEN": ADMIN,
        "VIDGATE_WEBHOOK_ALLOW_PRIVATE": "true",
        "VIDGATE_OUTPUT_HOSTS": sim_url.removeprefix("http://"),
        "VIDGATE_OUTPUTS_STORE": str(workdir / "outputs"),
        "VIDGATE_RUN_WORKER": "false",
    }


def start(code: Path, args: list[str], environ: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-c", "import sys; from app.cli import main; sys.argv[0] = 'vidgate'; main()", *args]
    return subprocess.Popen(cmd, env=environ, cwd=code, stdout=log.open("ab"), stderr=subprocess.STDOUT)


async def wait_up(url: str, proc: subprocess.Popen[bytes], path: str = "/healthz") -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(300):
            if proc.poll() is not None:
                raise RuntimeError(f"{url} exited with {proc.returncode}")
            try:
                async with http.get(url + path) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


async def fresh_db() -> None:
    conn = await asyncpg.connect(PG + "/postgres")
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{DB}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{DB}"')
    finally:
        await conn.close()


async def drop_db() -> None:
    conn = await asyncpg.connect(PG + "/postgres")
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{DB}" WITH (FORCE)')
    finally:
        await conn.close()


async def setup_tenant(base: str) -> tuple[str, list[str], list[str]]:
    """A tenant with a far-away budget, 64 processing predictions and 64 final ones."""
    admin = {"Authorization": f"Bearer {ADMIN}"}
    async with aiohttp.ClientSession() as http:
        body = {"name": "ab", "budgetCents": 10**9, "budgetPeriod": "month"}
        async with http.post(base + "/admin/v1/tenants", json=body, headers=admin) as r:
            tenant = (await r.json())["id"]
        async with http.post(base + f"/admin/v1/tenants/{tenant}/keys", json={}, headers=admin) as r:
            key = (await r.json())["key"]
        auth = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        ids = []
        for _ in range(128):
            async with http.post(base + "/api/v1/models/ltx-2-19b/generate", data=BODY, headers=auth) as r:
                assert r.status == 200, await r.text()
                ids.append((await r.json())["id"])
    processing, final = ids[:64], ids[64:]
    # Made terminal behind the gateway's back, as the poller would (vendor outputs, not rehosted).
    conn = await asyncpg.connect(f"{PG}/{DB}")
    try:
        await conn.execute(
            "UPDATE predictions SET status='completed', completed_at=now(), next_poll_at=NULL,"
            " outputs='[\"https://cdn.example.com/v.mp4\"]' WHERE id = ANY($1::text[])",
            final,
        )
    finally:
        await conn.close()
    return f"Bearer {key}", processing, final


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(
    base: str, method: str, paths: list[str], auth: str, conc: int, duration: float, pid: int
) -> dict[str, Any]:
    spec = {
        "base_url": base,
        "method": method,
        "paths": paths,
        "auths": [auth],
        "body": BODY if method == "POST" else None,
    }
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    cpu_before = cpu_s(pid)
    try:
        out = subprocess.run(
            [sys.executable, "-m", "bench.aioload", f.name, str(conc), str(duration), "10"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    finally:
        os.unlink(f.name)
    cpu = cpu_s(pid) - cpu_before
    line = next(x for x in out.splitlines() if x.startswith("BENCHJSON "))
    r = json.loads(line.removeprefix("BENCHJSON "))
    ok = r["requests"] - r["status"] - r["timeout"] - r["connect"] - r["read"]
    return {
        "rps": ok / (r["duration_us"] / 1e6),
        "p50_ms": r["p50"] / 1000,
        "p99_ms": r["p99"] / 1000,
        "errors": r["requests"] - ok,
        # The gateway's own CPU per answered request: the figure least moved by a busy machine.
        "cpu_ms": cpu * 1000 / max(ok, 1),
    }


async def one(code: Path, name: str, sim_url: str, workdir: Path, duration: float) -> dict[str, Any]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start(code, ["serve", "--port", str(port)], env(code, sim_url, workdir), workdir / f"{name}.log")
    try:
        await wait_up(base, proc)
        auth, processing, final = await setup_tenant(base)
        submit_path = ["/api/v1/models/ltx-2-19b/generate"]
        result = {}
        for cell, conc in CELLS:
            if cell == "submit":
                method, paths = "POST", submit_path
            else:
                method = "GET"
                paths = [f"/api/v1/predictions/{i}" for i in (final if cell == "get-final" else processing)]
            measure(base, method, paths, auth, conc, 1.0, proc.pid)  # warm-up, thrown away
            result[f"{cell} c={conc}"] = measure(base, method, paths, auth, conc, duration, proc.pid)
        return result
    finally:
        stop(proc)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--out", default=str(Path(__file__).with_name("results.json")))
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="vidgate-ab-"))
    base_code = workdir / "a"
    base_code.mkdir()
    archive = subprocess.run(["git", "archive", args.base], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(base_code)], input=archive, check=True)
    await fresh_db()
    migrate = start(ROOT, ["migrate"], env(ROOT, "http://127.0.0.1:9", workdir), workdir / "migrate.log")
    assert migrate.wait(120) == 0
    sim_port = free_port()
    sim_url = f"http://127.0.0.1:{sim_port}"
    sim = start(
        ROOT,
        ["simulator", "--port", str(sim_port), "--completion-s", "3600"],
        env(ROOT, sim_url, workdir),
        workdir / "sim.log",
    )
    rounds: list[dict[str, Any]] = []
    try:
        await wait_up(sim_url, sim, "/")
        for i in range(args.rounds):
            order = [("A", base_code), ("B", ROOT)] if i % 2 == 0 else [("B", ROOT), ("A", base_code)]
            this: dict[str, Any] = {}
            for name, code in order:
                began = time.time()
                this[name] = await one(code, name, sim_url, workdir, args.duration)
                print(f"round {i + 1} {name}: {json.dumps(this[name])} ({time.time() - began:.0f} s)", flush=True)
            rounds.append(this)
    finally:
        stop(sim)
        await drop_db()
        shutil.rmtree(workdir, ignore_errors=True)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    Path(args.out).write_text(json.dumps({"base": args.base, "head": head.strip(), "rounds": rounds}, indent=1))
    print(
        "| cell | A req/s | B req/s | B/A req/s | A p50 ms | B p50 ms | A p99 ms | B p99 ms | B/A p99 "
        "| A CPU ms/req | B CPU ms/req | B/A CPU |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for cell, conc in CELLS:
        key = f"{cell} c={conc}"
        a = [r["A"][key] for r in rounds]
        b = [r["B"][key] for r in rounds]
        ratio = statistics.median(y["rps"] / x["rps"] for x, y in zip(a, b, strict=True))
        p99 = statistics.median(y["p99_ms"] / x["p99_ms"] for x, y in zip(a, b, strict=True))
        cpu = statistics.median(y["cpu_ms"] / x["cpu_ms"] for x, y in zip(a, b, strict=True))
        med = lambda cells, k: statistics.median(c[k] for c in cells)  # noqa: E731
        print(
            f"| {key} | {med(a, 'rps'):.0f} | {med(b, 'rps'):.0f} | {ratio:.2f} | {med(a, 'p50_ms'):.1f} | "
            f"{med(b, 'p50_ms'):.1f} | {med(a, 'p99_ms'):.1f} | {med(b, 'p99_ms'):.1f} | {p99:.2f} | "
            f"{med(a, 'cpu_ms'):.2f} | {med(b, 'cpu_ms'):.2f} | {cpu:.2f} |"
        )


if __name__ == "__main__":
    asyncio.run(main())
