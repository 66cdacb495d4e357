"""The floor: a minimal pass-through proxy in front of the simulator. aiohttp server, no database, no
validation, no JSON parsing: read the body, forward it with the vendor key, return the vendor's bytes.
Whatever a Python gateway does on top of this costs throughput; this is the physical limit here.

    python -m bench.floor --port 9200 --upstream http://127.0.0.1:9100 --client aiohttp [--server uvicorn]

`--server uvicorn` serves the same pass-through as a bare ASGI app on uvicorn with uvloop and httptools:
the server stack vidgate itself runs on, so the floor differs from the gateway only in what the
gateway does, not in how it is served (issue 13's fair floor).
"""

from __future__ import annotations

import argparse
from typing import Any

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


class AsgiFloor:
    """The same pass-through as `create()`, as a bare ASGI app (no framework)."""

    def __init__(self, upstream: str, client_name: str, concurrency: int) -> None:
        self.upstream = upstream.rstrip("/")
        self.client_name = client_name
        self.concurrency = concurrency
        self.client: Client | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self.client = make(self.client_name, self.concurrency)
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    if self.client is not None:
                        await self.client.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if scope["path"] == "/_ping":
            status, data = 200, b"ok"
        else:
            assert self.client is not None
            method = scope["method"]
            status, data = await self.client.request(
                method, self.upstream + scope["path"], body if method == "POST" else None, HEADERS
            )
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--client", default="aiohttp")
    parser.add_argument("--concurrency", type=int, default=64, help="upstream connection pool size (vidgate: 64)")
    parser.add_argument("--server", choices=("aiohttp", "uvicorn"), default="aiohttp")
    args = parser.parse_args()
    if args.server == "uvicorn":
        import uvicorn

        floor = AsgiFloor(args.upstream, args.client, args.concurrency)
        uvicorn.run(floor, host=args.host, port=args.port, loop="uvloop", http="httptools", log_level="warning")
        return
    web.run_app(
        create(args.upstream, args.client, args.concurrency),
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
    )


if __name__ == "__main__":
    main()
