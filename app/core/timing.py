"""`Server-Timing` on every answer: how long the request spent in the database, upstream and in the app.

A request's middleware opens a slot; every SQL statement (an engine event) and every upstream call (timed by the
upstream client) run on the request's behalf add their duration to it. Outside a request (the poller,
the dispatcher) there is no slot and nothing is counted. Two clock reads per statement: cheap enough to
stay on in production, and it lets a user of the gateway see where their latency goes.
"""

from __future__ import annotations

import time
from contextvars import ContextVar
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine

from app.core import metrics


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


_STATEMENTS = metrics.DB_STATEMENTS


@event.listens_for(Engine, "before_cursor_execute")
def _before(conn: Any, _cursor: Any, _statement: Any, _params: Any, _context: Any, _many: bool) -> None:
    if _spent.get() is not None:
        conn.info["vidgate_started"] = time.perf_counter()


@event.listens_for(Engine, "after_cursor_execute")
def _after(conn: Any, _cursor: Any, _statement: Any, _params: Any, _context: Any, _many: bool) -> None:
    _STATEMENTS.inc()
    spent = _spent.get()
    started = conn.info.pop("vidgate_started", None)
    if spent is not None and started is not None:
        spent.db_s += time.perf_counter() - started


def add_db(seconds: float) -> None:
    """Database time spent on the request's behalf elsewhere: the ledger writer's batch its write was in
    (app/core/batching.py), which runs outside any request."""
    spent = _spent.get()
    if spent is not None and seconds:
        spent.db_s += seconds


def add_upstream(seconds: float) -> None:
    """An upstream call made on the request's behalf took `seconds` (timed by the caller, app/upstream/client.py:
    an aiohttp TraceConfig would build and await eight signal objects per call, for two clock reads)."""
    spent = _spent.get()
    if spent is not None:
        spent.upstream_s += seconds
