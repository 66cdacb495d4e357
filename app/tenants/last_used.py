"""`lastUsedAt` of API keys without a write per request (SPEC §13: it may lag by a minute).

Each successful key check notes the key and the wall clock in this process's map (a dict store); a task of
the serving process flushes the map every `key_last_used_flush_s` in one statement (UPDATE ... FROM VALUES,
chunked at FLUSH_CHUNK keys) and at shutdown. A value is only ever moved forward, so processes flushing in
any order agree. A crash loses at most one interval of "last used" moments, never anything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import or_, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.core.database import RowShape, table_of, transaction, value_rows, value_rows_params, value_rows_size
from app.tenants.models import ApiKey

log = logging.getLogger("vidgate.tenants")

FLUSH_CHUNK = 500
_used: dict[str, float] = {}

_keys = table_of(ApiKey)
_SHAPE: RowShape = (("id", _keys.c.id.type), ("used_at", _keys.c.last_used_at.type))


def note(key_id: str) -> None:
    _used[key_id] = time.time()


def pending() -> int:
    return len(_used)


@functools.cache
def _statement(n: int) -> Any:
    rows = value_rows("used", _SHAPE, n)
    return (
        update(_keys)
        .where(_keys.c.id == rows.c.id, or_(_keys.c.last_used_at.is_(None), _keys.c.last_used_at < rows.c.used_at))
        .values(last_used_at=rows.c.used_at)
    )


async def flush(sessions: async_sessionmaker[AsyncSession]) -> int:
    """Write what was noted since the last flush; what fails to be written is noted again (the newer wins)."""
    global _used
    taken, _used = _used, {}
    if not taken:
        return 0
    rows = [(key_id, datetime.fromtimestamp(at, UTC)) for key_id, at in taken.items()]
    try:
        async with transaction(sessions) as session:
            for start in range(0, len(rows), FLUSH_CHUNK):
                chunk = rows[start : start + FLUSH_CHUNK]
                params = value_rows_params("used", _SHAPE, chunk)
                await session.execute(_statement(value_rows_size(len(chunk))), params)
    except Exception:
        for key_id, at in taken.items():
            _used[key_id] = max(at, _used.get(key_id, 0.0))
        raise
    return len(rows)


async def flush_loop(sessions: async_sessionmaker[AsyncSession], every_s: float, stop: asyncio.Event) -> None:
    """Until `stop` is set, then once more."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)
        try:
            await flush(sessions)
        except Exception as exc:  # an outage: kept for the next round
            log.warning("could not record keys' last use (%s); retrying", type(exc).__name__)
