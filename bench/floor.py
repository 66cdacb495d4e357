"""The floor: a minimal pass-through proxy in front of the simulator. aiohttp server, no database, no
validation, no JSON parsing: read the body, forward it with the vendor key, return the vendor's bytes.
Whatever a Python gateway does on top of this costs throughput; this is the physical limit here.

    python -m bench.floor --port 9200 --upstream http://127.0.0.1:9100 --client aiohttp
"""

from __future__ import annotations

import argparse

from aiohttp import web

from bench.httpclients import Client, make

CLIENT = web.AppKey("client", object)
UPSTREAM = web.AppKey("upstream", str)
HEADERS = {"Authorization": "Bearer bench-vendor-key", "Content-Type": "application/json"}


async def _forward(request: web.Request) -> web.StreamResponse:
    client: Client = request.app[CLIENT]  # type: ignore[assignment]
    body = await request.read() if request.method == "POST" else None
    status, data = await client.request(request.method, request.app[UPSTREAM] + request.path, body, HEADERS)
    return web.Response(body=data, status=status, content_type="application/json")


async def _ping(_request: web.Request) -> web.StreamResponse:
    return web.Response(text="ok")


def create(upstream: str, client_name: str, concurrency: int) -> web.Application:
    app = web.Application()
    app[UPSTREAM] = upstream.rstrip("/")

    async def on_startup(app: web.Application) -> None:
        app[CLIENT] = make(client_name, concurrency)

    async def on_cleanup(app: web.Application) -> None:
        await app[CLIENT].close()  # type: ignore[attr-defined]

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_post("/api/v1/models/{model_id}/generate", _forward)
    app.router.add_get("/api/v1/predictions/{prediction_id}", _forward)
    app.router.add_get("/_ping", _ping)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--client", default="aiohttp")
    parser.add_argument("--concurrency", type=int, default=64, help="upstream connection pool size (vidgate: 64)")
    args = parser.parse_args()
    web.run_app(
        create(args.upstream, args.client, args.concurrency),
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
    )


if __name__ == "__main__":
    main()
