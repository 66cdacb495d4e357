"""Webhook receivers for the benchmark, in one process: healthy endpoints that answer 200 at once and
record what arrived, and optionally a black hole that accepts connections and never answers.

    python -m bench.receiver --ports 9301,9302 --blackhole-port 9309

GET /_stats on any healthy port returns every port's counts, first/last arrival times and the
notification lags (arrival minus the prediction's upstream `completedAt`); POST /_reset clears them.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass, field
from datetime import datetime

import orjson
from aiohttp import web


@dataclass
class PortStats:
    count: int = 0
    duplicates: int = 0
    first: float | None = None
    last: float | None = None
    ids: set[str] = field(default_factory=set)
    lags: list[float] = field(default_factory=list)
    types: dict[str, int] = field(default_factory=dict)


STATS: dict[int, PortStats] = {}


async def _hook(request: web.Request) -> web.StreamResponse:
    now = time.time()
    body = await request.read()
    port = request.transport.get_extra_info("sockname")[1] if request.transport else 0
    stats = STATS.setdefault(port, PortStats())
    webhook_id = request.headers.get("webhook-id", "")
    if webhook_id in stats.ids:
        stats.duplicates += 1
    else:
        stats.ids.add(webhook_id)
        stats.count += 1
        stats.first = now if stats.first is None else stats.first
        stats.last = now
        try:
            event = orjson.loads(body)
            kind = str(event.get("type"))
            stats.types[kind] = stats.types.get(kind, 0) + 1
            completed = (event.get("data") or {}).get("completedAt")
            if completed and kind.startswith("prediction."):
                stats.lags.append(now - datetime.fromisoformat(completed.replace("Z", "+00:00")).timestamp())
        except (ValueError, AttributeError):
            pass
    return web.Response(status=200)


async def _stats(request: web.Request) -> web.StreamResponse:
    with_lags = request.query.get("lags", "1") != "0"
    return web.Response(
        body=orjson.dumps(
            {
                str(port): {
                    "count": s.count,
                    "duplicates": s.duplicates,
                    "first": s.first,
                    "last": s.last,
                    "lags": s.lags if with_lags else [],
                    "types": s.types,
                }
                for port, s in STATS.items()
            }
        ),
        content_type="application/json",
    )


async def _reset(_request: web.Request) -> web.StreamResponse:
    STATS.clear()
    return web.json_response({"ok": True})


async def _black_hole(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Accept, never read, never answer: the sender waits for its own timeout."""
    try:
        await asyncio.sleep(3600)
    finally:
        writer.close()


async def serve(ports: list[int], black_hole_port: int | None) -> None:
    app = web.Application(client_max_size=1 << 20)
    app.router.add_get("/_stats", _stats)
    app.router.add_post("/_reset", _reset)
    app.router.add_post("/{tail:.*}", _hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    for port in ports:
        STATS.setdefault(port, PortStats())
        await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    hole = None
    if black_hole_port:
        hole = await asyncio.start_server(_black_hole, "127.0.0.1", black_hole_port, backlog=1024)
    try:
        await asyncio.Event().wait()
    finally:
        if hole is not None:
            hole.close()
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ports", required=True, help="comma-separated healthy ports")
    parser.add_argument("--blackhole-port", type=int, default=0)
    args = parser.parse_args()
    asyncio.run(serve([int(p) for p in args.ports.split(",") if p], args.blackhole_port or None))


if __name__ == "__main__":
    main()
