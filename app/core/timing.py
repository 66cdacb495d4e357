"""`Server-Timing` on every answer: how long the request spent in the database, upstream and in the app.

A request's middleware opens a slot; every SQL statement (an engine event) and every upstream call (an
aiohttp trace) run on the request's behalf add their duration to it. Outside a request (the poller,
the dispatcher) there is no slot and nothing is counted. Two clock reads per statement: cheap enough to
stay on in production, and it lets a user of the gateway see where their latency goes.
"""

from __future__ import annotations

import time
from contextvars import ContextVar
from types import SimpleNamespace
from typing import Any

import aiohttp
from sqlalchemy import event
from sqlalchemy.engine import Engine


class Spent:
    __slots__ = ("db_s", "upstream_s")

    def __init__(self) -> None:
        self.db_s = 0.0
        self.upstream_s = 0.0


# One mutable object per request: a dependency or greenlet running in a copied context adds to the
# same object the middleware reads.
_spent: ContextVar[Spent | None] = ContextVar("server_timing", default=None)


def start() -> tuple[Spent, Any]:
    spent = Spent()
    return spent, _spent.set(spent)


def stop(token: Any) -> None:
    _spent.reset(token)


def header(spent: Spent, total_s: float) -> bytes:
    app_s = max(total_s - spent.db_s - spent.upstream_s, 0.0)
    return (
        f"db;dur={spent.db_s * 1000:.1f}, upstream;dur={spent.upstream_s * 1000:.1f}, app;dur={app_s * 1000:.1f}"
    ).encode()


@event.listens_for(Engine, "before_cursor_execute")
def _before(conn: Any, _cursor: Any, _statement: Any, _params: Any, _context: Any, _many: bool) -> None:
    if _spent.get() is not None:
        conn.info["vidgate_started"] = time.perf_counter()


@event.listens_for(Engine, "after_cursor_execute")
def _after(conn: Any, _cursor: Any, _statement: Any, _params: Any, _context: Any, _many: bool) -> None:
    spent = _spent.get()
    started = conn.info.pop("vidgate_started", None)
    if spent is not None and started is not None:
        spent.db_s += time.perf_counter() - started


async def _request_start(_session: Any, ctx: SimpleNamespace, _params: Any) -> None:
    ctx.vidgate_started = time.perf_counter()


async def _request_done(_session: Any, ctx: SimpleNamespace, _params: Any) -> None:
    spent = _spent.get()
    started = getattr(ctx, "vidgate_started", None)
    if spent is not None and started is not None:
        spent.upstream_s += time.perf_counter() - started


def upstream_trace() -> aiohttp.TraceConfig:
    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(_request_start)
    trace.on_request_end.append(_request_done)
    trace.on_request_exception.append(_request_done)
    return trace
