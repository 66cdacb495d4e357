"""One small adapter per Python async HTTP client, so the client comparison and the floor proxy run the
very same code. aiohttp and httpx are always measured (both are project dependencies); the others are
measured when they are importable (`pip install aiosonic httpx-aiohttp pyreqwest`)."""

from __future__ import annotations

import importlib.util
from typing import Protocol

REQUIRED = ("aiohttp", "httpx")
OPTIONAL = ("httpx-aiohttp", "aiosonic", "pyreqwest")
_MODULES = {
    "aiohttp": "aiohttp",
    "httpx": "httpx",
    "httpx-aiohttp": "httpx_aiohttp",
    "aiosonic": "aiosonic",
    "pyreqwest": "pyreqwest",
}
DESCRIPTIONS = {
    "aiohttp": "aiohttp ClientSession, TCPConnector(limit=concurrency)",
    "httpx": "httpx.AsyncClient with its own transport (httpcore), Limits(max_connections=concurrency)",
    "httpx-aiohttp": "httpx.AsyncClient on httpx_aiohttp.AiohttpTransport",
    "aiosonic": "aiosonic.HTTPClient, pool size = concurrency",
    "pyreqwest": "pyreqwest Client (Rust reqwest/hyper), max_connections=concurrency",
}


def available() -> list[str]:
    names = list(REQUIRED)
    names += [n for n in OPTIONAL if importlib.util.find_spec(_MODULES[n]) is not None]
    return names


def version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as v

    try:
        return v(name)
    except PackageNotFoundError:
        return "?"


class Client(Protocol):
    async def request(
        self, method: str, url: str, body: bytes | None, headers: dict[str, str]
    ) -> tuple[int, bytes]: ...

    async def close(self) -> None: ...


class _Aiohttp:
    def __init__(self, concurrency: int) -> None:
        import aiohttp

        connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency, keepalive_timeout=30)
        self.session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30))

    async def request(self, method: str, url: str, body: bytes | None, headers: dict[str, str]) -> tuple[int, bytes]:
        async with self.session.request(method, url, data=body, headers=headers) as response:
            return response.status, await response.read()

    async def close(self) -> None:
        await self.session.close()


class _Httpx:
    def __init__(self, concurrency: int, *, aiohttp_transport: bool = False) -> None:
        import httpx

        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        if aiohttp_transport:
            from httpx_aiohttp import AiohttpTransport

            self.client = httpx.AsyncClient(transport=AiohttpTransport(limits=limits), timeout=30)
        else:
            self.client = httpx.AsyncClient(limits=limits, timeout=30)

    async def request(self, method: str, url: str, body: bytes | None, headers: dict[str, str]) -> tuple[int, bytes]:
        response = await self.client.request(method, url, content=body, headers=headers)
        return response.status_code, response.content

    async def close(self) -> None:
        await self.client.aclose()


class _Aiosonic:
    def __init__(self, concurrency: int) -> None:
        import aiosonic
        from aiosonic.pools import PoolConfig

        pools = {":default": PoolConfig(size=concurrency, max_conn_requests=None)}
        self.client = aiosonic.HTTPClient(connector=aiosonic.TCPConnector(pool_configs=pools))

    async def request(self, method: str, url: str, body: bytes | None, headers: dict[str, str]) -> tuple[int, bytes]:
        response = await self.client.request(url, method=method, data=body, headers=headers)
        return response.status_code, await response.content()

    async def close(self) -> None:
        await self.client.connector.cleanup()


class _Pyreqwest:
    def __init__(self, concurrency: int) -> None:
        from pyreqwest.client import ClientBuilder

        self.client = ClientBuilder().max_connections(concurrency).pool_max_idle_per_host(concurrency).build()

    async def request(self, method: str, url: str, body: bytes | None, headers: dict[str, str]) -> tuple[int, bytes]:
        builder = self.client.request(method, url).headers(headers)
        if body is not None:
            builder = builder.body_bytes(body)
        response = await builder.build().send()
        return response.status, bytes(await response.bytes())

    async def close(self) -> None:
        await self.client.close()


def make(name: str, concurrency: int) -> Client:
    if name == "aiohttp":
        return _Aiohttp(concurrency)
    if name == "httpx":
        return _Httpx(concurrency)
    if name == "httpx-aiohttp":
        return _Httpx(concurrency, aiohttp_transport=True)
    if name == "aiosonic":
        return _Aiosonic(concurrency)
    if name == "pyreqwest":
        return _Pyreqwest(concurrency)
    raise ValueError(f"unknown client {name!r}")
