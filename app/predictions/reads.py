"""GET of a prediction, read in batches on PostgreSQL (issue 25).

Measured: with the key check and the balance snapshot from memory, most of a GET's CPU is the round trip
to PostgreSQL (a pool checkout, a socket send and a wake-up per statement, about 0.2 ms here), not the
statement. Callers poll many predictions at once, so the reads that arrive while one is running are
made one statement (`unnest` of the asked (id, tenant, counter) keys, one result row per key and stored
file), on one connection: the round trip is shared by the batch.

What stays: each caller's answer is what the one-row read (`predictions_service.read_with_balance`)
gives, and it is read after the request arrived (a batch begins only after its items are queued: a
caller sees its own submit); a tenant only ever reads its own predictions (the key names the tenant);
errors reach every caller of the batch (an outage is a 503 for each), and each caller's Server-Timing
gets its batch's database time (app/core/batching.py). SQLite, and a sessionmaker bound to one
connection (the tests' outer transaction), read one by one as before.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from datetime import datetime
from typing import Any

from sqlalchemy import DateTime, String, and_, bindparam, func, or_, select
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app.budgets.models import BudgetCounter
from app.core import prebuilt
from app.core.batching import Batcher
from app.core.database import read_connection, table_of
from app.core.settings import Settings
from app.outputs import service as outputs_service
from app.predictions import service as predictions_service
from app.predictions.models import PUBLIC_STATUSES, TERMINAL_STATUSES, Prediction

_predictions = table_of(Prediction)
_counters = table_of(BudgetCounter).c
_keys = (
    func.unnest(
        bindparam("b_ids", type_=ARRAY(String)),
        bindparam("b_tenant_ids", type_=ARRAY(String)),
        bindparam("b_scopes", type_=ARRAY(String)),
        bindparam("b_period_starts", type_=ARRAY(DateTime(timezone=True))),
    )
    .table_valued("id", "tenant_id", "scope", "period_start", with_ordinality="ord")
    .render_derived(name="k")
)
# The one-row read's columns and conditions (app/predictions/service.py), for many keys at once.
_READ_MANY = select(
    _keys.c.ord,
    *predictions_service._PUBLIC_COLUMNS,
    _predictions.c.next_poll_at,
    _counters.spent_cents,
    _counters.reserved_cents,
    *outputs_service.LINK_COLUMNS,
).select_from(
    outputs_service.join_links(
        _keys.join(
            _predictions,
            and_(
                _predictions.c.id == _keys.c.id,
                _predictions.c.tenant_id == _keys.c.tenant_id,
                or_(*(_predictions.c.status == status for status in PUBLIC_STATUSES)),
            ),
        ).outerjoin(
            table_of(BudgetCounter),
            and_(_counters.scope == _keys.c.scope, _counters.period_start == _keys.c.period_start),
        ),
        _predictions.c.id,
    )
)

Key = tuple[str, str, str, datetime]  # prediction id, tenant id, counter scope, period start


def _reads_of(settings: Settings, rows: list[Any], count: int) -> list[predictions_service.Read | None]:
    by_key: dict[int, list[Any]] = defaultdict(list)
    for row in rows:
        by_key[row.ord].append(row)
    reads: list[predictions_service.Read | None] = []
    for ordinal in range(1, count + 1):
        mine = by_key.get(ordinal)
        if not mine:
            reads.append(None)
            continue
        row = mine[0]
        body = predictions_service.present(row)
        rehosted = outputs_service.show_joined_links(settings, body, mine)
        final = row.status in TERMINAL_STATUSES and not rehosted
        reads.append(predictions_service.Read(body, row.next_poll_at, row.spent_cents, row.reserved_cents, final))
    return reads


class _Reader:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], settings: Settings) -> None:
        self.sessions = sessions
        self.settings = settings
        self.largest_batch = 0  # for the tests: reads did share a statement
        self.batcher: Batcher[Key, predictions_service.Read | None] = Batcher(self._apply, observe=self._observe)

    def _observe(self, size: int) -> None:
        self.largest_batch = max(self.largest_batch, size)

    async def _apply(self, keys: list[Key]) -> list[predictions_service.Read | BaseException | None]:
        params = {
            "b_ids": [k[0] for k in keys],
            "b_tenant_ids": [k[1] for k in keys],
            "b_scopes": [k[2] for k in keys],
            "b_period_starts": [k[3] for k in keys],
        }
        async with read_connection(self.sessions) as connection:
            rows = await prebuilt.fetch(connection, _READ_MANY, params)
        return list(_reads_of(self.settings, rows, len(keys)))


# One reader per sessionmaker (a process has one; tests make several), dropped with it.
_readers: weakref.WeakKeyDictionary[async_sessionmaker[AsyncSession], _Reader | None] = weakref.WeakKeyDictionary()


def batched(sessions: async_sessionmaker[AsyncSession], settings: Settings) -> _Reader | None:
    """The batching reader for these sessions; None where reads go one by one (SQLite, one bound connection)."""
    if sessions in _readers:
        return _readers[sessions]
    bind = sessions.kw.get("bind")
    postgresql = isinstance(bind, AsyncEngine) and bind.dialect.name == "postgresql"
    reader = _readers[sessions] = _Reader(sessions, settings) if postgresql else None
    return reader


async def read_with_balance(reader: _Reader, key: Key) -> predictions_service.Read | None:
    """predictions_service.read_with_balance for `key`, in the batch of the reads that arrive meanwhile."""
    return await reader.batcher.submit(key)
