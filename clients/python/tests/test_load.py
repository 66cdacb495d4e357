"""1,000 concurrent generates through one AsyncVidgate: all complete, inside one bounded pool.

Measured by counts (file descriptors, pooled connections, live objects), never by time.
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys

import httpx
import pytest
from conftest import BODY, Gateway

from vidgate_client import AsyncVidgate

CONCURRENT = 1000
POOL = 100
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts /proc/self/fd")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def live(kind: type) -> int:
    return sum(1 for obj in gc.get_objects() if isinstance(obj, kind))


async def test_a_thousand_concurrent_generates_stay_inside_the_pool(sim_defaults: Gateway) -> None:
    _, key = sim_defaults.tenant()
    async with AsyncVidgate(key, sim_defaults.url) as warm:  # one-time allocations (imports, schemas)
        await warm.generate("ltx-2-19b", **BODY)
    gc.collect()
    fds_before, objects_before = open_fds(), len(gc.get_objects())
    peaks = {"fds": 0, "connections": 0}

    async with AsyncVidgate(key, sim_defaults.url, max_connections=POOL) as client:
        pool = client._http._transport._pool  # type: ignore[attr-defined]
        done = asyncio.Event()

        async def sample() -> None:
            while not done.is_set():
                peaks["fds"] = max(peaks["fds"], open_fds())
                peaks["connections"] = max(peaks["connections"], len(pool.connections))
                await asyncio.sleep(0.02)

        sampler = asyncio.create_task(sample())
        results = await asyncio.gather(
            *(client.generate("ltx-2-19b", **BODY, deadline_s=600) for _ in range(CONCURRENT))
        )
        done.set()
        await sampler
        assert [p.status for p in results].count("completed") == CONCURRENT
        assert len({p.id for p in results}) == CONCURRENT  # one prediction per call, none lost or doubled
        assert (await client.usage()).spent_cents == (CONCURRENT + 1) * 9
        del results
    assert 0 < peaks["connections"] <= POOL
    assert peaks["fds"] - fds_before <= POOL + 5  # sockets: at most one per pooled connection
    gc.collect()
    assert open_fds() <= fds_before + 1  # closing the client closed every socket
    assert live(httpx.Response) == 0
    # Nothing per call outlives the calls: far fewer objects left than calls made.
    assert len(gc.get_objects()) - objects_before < CONCURRENT // 4
