"""The one HTTP client module: aiohttp sessions for the upstream, webhook deliveries and output copies.

aiohttp was chosen by measurement (see bench/): on this machine httpx's own transport served about a
tenth of aiohttp's requests per second at 8-32 concurrent requests.
"""

from __future__ import annotations

import aiohttp

from app.core.ssrf import GuardedResolver


def upstream_session(*, concurrency: int, timeout_s: float) -> aiohttp.ClientSession:
    # One keep-alive pool shared by submit forwarding and the poller.
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency, keepalive_timeout=30)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=timeout_s, connect=min(timeout_s, 5.0)),
        raise_for_status=False,
    )


def webhook_session(*, concurrency: int, timeout_s: float, allow_private: bool) -> aiohttp.ClientSession:
    # The guarded resolver checks the very addresses the connector dials: no DNS-rebinding window.
    connector = aiohttp.TCPConnector(
        limit=concurrency, resolver=GuardedResolver(allow_private=allow_private), keepalive_timeout=15
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=timeout_s),
        raise_for_status=False,
        auto_decompress=False,
    )


def outputs_session(*, concurrency: int, read_timeout_s: float, allow_private: bool) -> aiohttp.ClientSession:
    # Copies of vendor outputs: no total timeout (a large file takes as long as it takes), but a
    # connection that stops sending is a stall. The guarded resolver checks every address dialled.
    connector = aiohttp.TCPConnector(
        limit=concurrency, resolver=GuardedResolver(allow_private=allow_private), keepalive_timeout=15
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None, connect=10.0, sock_connect=10.0, sock_read=read_timeout_s),
        raise_for_status=False,
        auto_decompress=False,
    )
