"""The key check from memory: key hash -> (tenant, key), and each tenant's balance snapshot.

Why: the key check runs on every request, and a round trip for it cost as much as the rest of a GET.
What keeps it honest:
- A key revoke, tenant update or delete calls `note_tenant_changed()` inside its transaction. On
  PostgreSQL that sends `NOTIFY vidgate_tenants` (delivered at commit, and only if it commits); every
  process's `listen()` drops that tenant's entries when it arrives. In every process, the commit itself
  drops the entries of the process that made the change (SQLite has no NOTIFY: one process per file).
- Each entry also expires after `key_cache_ttl_s`: the backstop for a lost notification and, on SQLite,
  for a change made by another process (the CLI). The listener flushes everything when it (re)connects,
  since notifications sent while it was away are gone.
- Money never trusts the cached tenant: the hold's conditional UPDATE reads the budget from the tenant
  row in the same statement, so a stale entry can refuse a submit but never overspend.

The balance snapshot serves `X-Budget-Remaining-Cents` on a submit's answer without a read of its own.
It is at most `balance_ttl_s` old; this process's own charges change it at once (the request's
`note_charge` mutates the very object the snapshot holds), other processes' charges and refunds show
up when it is read again. Reads (the list routes, GET) read the balance fresh with their data, and
refresh the snapshot; a GET answered from memory (a final prediction, app/predictions/cache.py) shows
the snapshot, as a submit does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import asyncpg
from sqlalchemy import event, func, select
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from app.budgets.headers import Balance
from app.core import clock
from app.tenants.models import ApiKey, Tenant

log = logging.getLogger("vidgate.tenants")

CHANNEL = "vidgate_tenants"
_CHANGED = "vidgate_tenants_changed"  # session.info: tenants this transaction changed
MAX_KEYS = 10_000
LISTENER_PING_S = 5.0  # how often the listener checks its connection is still there


@dataclass
class _Entry:
    tenant: Tenant
    key: ApiKey
    expires: float


class KeyCache:
    def __init__(self, max_keys: int = MAX_KEYS) -> None:
        self._keys: OrderedDict[str, _Entry] = OrderedDict()
        self._balances: dict[str, tuple[Balance, float]] = {}
        self._max_keys = max_keys

    def get(self, digest: str) -> tuple[Tenant, ApiKey] | None:
        entry = self._keys.get(digest)
        if entry is None:
            return None
        if entry.expires <= time.monotonic():
            del self._keys[digest]
            return None
        self._keys.move_to_end(digest)
        return entry.tenant, entry.key

    def put(self, digest: str, tenant: Tenant, key: ApiKey, ttl_s: float) -> None:
        if ttl_s <= 0:
            return
        self._keys[digest] = _Entry(tenant, key, time.monotonic() + ttl_s)
        self._keys.move_to_end(digest)
        while len(self._keys) > self._max_keys:
            self._keys.popitem(last=False)

    def balance(self, tenant_id: str) -> Balance | None:
        held = self._balances.get(tenant_id)
        if held is None:
            return None
        balance, expires = held
        if expires <= time.monotonic() or (balance.resets_at is not None and balance.resets_at <= clock.now()):
            del self._balances[tenant_id]
            return None
        return balance

    def put_balance(self, tenant_id: str, balance: Balance, ttl_s: float) -> None:
        if ttl_s <= 0:
            return
        if len(self._balances) >= self._max_keys and tenant_id not in self._balances:
            self._balances.clear()
        self._balances[tenant_id] = (balance, time.monotonic() + ttl_s)

    def invalidate(self, tenant_id: str) -> None:
        for digest in [d for d, entry in self._keys.items() if entry.tenant.id == tenant_id]:
            del self._keys[digest]
        self._balances.pop(tenant_id, None)

    def clear(self) -> None:
        self._keys.clear()
        self._balances.clear()

    def __len__(self) -> int:
        return len(self._keys)


# One per process, like the connection pool: every app in the process sees the same database changes.
CACHE = KeyCache()


async def note_tenant_changed(session: AsyncSession, tenant_id: str) -> None:
    """Call inside the transaction that changes a tenant or revokes its keys."""
    session.info.setdefault(_CHANGED, set()).add(tenant_id)
    bind = session.get_bind()
    if bind.dialect.name == "postgresql":
        await session.execute(select(func.pg_notify(CHANNEL, tenant_id)))


@event.listens_for(Session, "after_commit")
def _invalidate_after_commit(session: Session) -> None:
    for tenant_id in session.info.pop(_CHANGED, ()):
        CACHE.invalidate(tenant_id)


@event.listens_for(Session, "after_rollback")
def _forget_after_rollback(session: Session) -> None:
    session.info.pop(_CHANGED, None)


def _on_notify(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
    CACHE.invalidate(payload)


async def listen(url: URL, stop: asyncio.Event) -> None:
    """Keep a LISTEN connection open until `stop` is set; reconnect (and flush) when it is lost."""
    dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
    while not stop.is_set():
        conn = None
        try:
            conn = await asyncpg.connect(dsn, timeout=5)
            await conn.add_listener(CHANNEL, _on_notify)
            CACHE.clear()  # whatever was sent while nobody listened is lost
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), LISTENER_PING_S)
                if not stop.is_set():
                    await conn.execute("SELECT 1", timeout=5)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("key cache listener lost its connection (%s); reconnecting", type(exc).__name__)
            CACHE.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close(timeout=2)
