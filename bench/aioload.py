"""Stand-in for wrk when it is not installed: a bounded closed-loop load generator on aiohttp, in a
process of its own, printing the same BENCHJSON line as the wrk Lua script. It is slower than wrk, so
results made with it say so (the `tool` column)."""

from __future__ import annotations

import asyncio
import json
import sys
import time

import aiohttp

from bench.stats import percentile


async def run(spec: dict, concurrency: int, duration_s: float, timeout_s: float) -> dict:
    base = spec["base_url"].rstrip("/")
    body = spec["body"].encode() if spec["body"] is not None else None
    paths, auths = spec["paths"], spec["auths"]
    latencies: list[float] = []
    counters = {"requests": 0, "status": 0, "connect": 0, "read": 0, "timeout": 0}
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    start = time.perf_counter()
    end = start + duration_s
    i = 0
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:

        async def worker() -> None:
            nonlocal i
            while time.perf_counter() < end:
                i += 1
                headers = {"Authorization": auths[i % len(auths)]}
                if body is not None:
                    headers["Content-Type"] = "application/json"
                began = time.perf_counter()
                try:
                    async with session.request(
                        spec["method"], base + paths[i % len(paths)], data=body, headers=headers
                    ) as r:
                        await r.read()
                        if r.status > 399:
                            counters["status"] += 1
                except TimeoutError:
                    counters["timeout"] += 1
                except aiohttp.ClientConnectorError:
                    counters["connect"] += 1
                except aiohttp.ClientError:
                    counters["read"] += 1
                latencies.append(time.perf_counter() - began)
                counters["requests"] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    lat = sorted(latencies)
    us = lambda p: int(percentile(lat, p) * 1e6) if lat else 0  # noqa: E731
    return {
        **counters,
        "write": 0,
        "duration_us": int(elapsed * 1e6),
        "p50": us(50),
        "p75": us(75),
        "p90": us(90),
        "p99": us(99),
        "p999": us(99.9),
        "max": int(lat[-1] * 1e6) if lat else 0,
        "mean": (sum(lat) / len(lat) * 1e6) if lat else 0.0,
    }


def main() -> None:
    with open(sys.argv[1]) as handle:
        spec = json.load(handle)
    result = asyncio.run(run(spec, int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])))
    print("BENCHJSON " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
