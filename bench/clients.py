"""Client comparison: one Python async HTTP client, N concurrent submits against the simulator, in a
process of its own. Prints one JSON line. Run by `python -m bench`; usable alone:

    python -m bench.clients --client httpx --url http://127.0.0.1:9100 --concurrency 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

from bench.httpclients import make
from bench.stats import percentile

BODY = b'{"image":"https://example.com/cat.png","prompt":"a cat waves at the camera","resolution":"480p","duration":5}'


async def run(client_name: str, base_url: str, concurrency: int, warmup_s: float, duration_s: float, reps: int) -> dict:
    client = make(client_name, concurrency)
    url = base_url.rstrip("/") + "/api/v1/models/ltx-2-19b/generate"
    headers = {"Authorization": "Bearer bench-vendor-key", "Content-Type": "application/json"}
    start = time.perf_counter()
    end = start + warmup_s + reps * duration_s
    done: list[tuple[float, float, bool]] = []  # (finished_at, latency, ok)

    async def worker() -> None:
        while True:
            began = time.perf_counter()
            if began >= end:
                return
            try:
                status, _ = await client.request("POST", url, BODY, headers)
                ok = status == 200
            except Exception:
                ok = False
            finished = time.perf_counter()
            done.append((finished, finished - began, ok))

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await client.close()
    windows = []
    for rep in range(reps):
        lo = start + warmup_s + rep * duration_s
        hi = lo + duration_s
        inside = [(lat, ok) for at, lat, ok in done if lo <= at < hi]
        lats = sorted(lat for lat, ok in inside if ok)
        windows.append(
            {
                "rps": len(lats) / duration_s,
                "p50_ms": percentile(lats, 50) * 1000 if lats else None,
                "p99_ms": percentile(lats, 99) * 1000 if lats else None,
                "ok": len(lats),
                "errors": sum(1 for _, ok in inside if not ok),
            }
        )
    return {"client": client_name, "concurrency": concurrency, "reps": windows}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--client", required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    result = asyncio.run(run(args.client, args.url, args.concurrency, args.warmup, args.duration, args.reps))
    print(json.dumps(result), flush=True)
    # Some clients' native runtimes (pyreqwest's tokio threads) crash in interpreter finalization; the
    # result is printed, so leave without it.
    os._exit(0)


if __name__ == "__main__":
    main()
