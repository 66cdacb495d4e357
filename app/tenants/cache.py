"""The key check from memory: key hash -> (tenant, key).

Why: the key check runs on every request, and a round trip for it cost as much as the rest of a GET.
What keeps it honest:
- A key revoke, tenant update or delete calls `note_tenant_changed()` inside its transaction. On
  PostgreSQL that sends `NOTIFY vidgate_tenants` (delivered at commit, and only if it commits); every
  process's `listen()` drops that tenant's entries when it arrives. In every process, the commit itself
  drops the entries of the process that made the change.
- SQLite has no NOTIFY, and another process (the CLI) may change the file. So there the commit also
  appends a byte to a marker file beside the database (`<file>.tenants-changed`), and every lookup
  first compares the marker's size and inode with what it saw last (one stat(), no I/O): when they moved,
  the whole cache is dropped (tenant changes are rare; which tenant changed does not matter).
- Each entry also expires after `key_cache_ttl_s`: the backstop for a lost notification. The listener
  flushes everything when it (re)connects, since notifications sent while it was away are gone.
- The cached key is the whole row, so every check reads it from here (SPEC §13: scopes, models, expiresAt;
  its own budget is held in the database like the tenant's). An expiry needs no notification: it is
  compared with the clock on every request, cached or not, so it takes effect on every replica at once.
- Money never trusts the cached tenant: the hold's conditional UPDATE reads the budget from the tenant
  row in the same statement, so a stale entry can refuse a submit but never overspend.
- Whatever else a process keeps per tenant (the balance snapshot, app/budgets/balances.py) subscribes
  with `on_invalidate()` and is dropped with the tenant's keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
from sqlalchemy import event, func, select
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from app.tenants.models import ApiKey, Tenant

log = logging.getLogger("vidgate.tenants")

CHANNEL = "vidgate_tenants"
_CHANGED = "vidgate_tenants_changed"  # session.info: tenants this transaction changed
MAX_KEYS = 10_000
LISTENER_NAME = "vidgate-key-cache"  # how an operator (or a test) tells the listener in pg_stat_activity
LISTENER_PING_S = 5.0  # how often the listener checks its connection is still there


@dataclass
class _Entry:
    tenant: Tenant
    key: ApiKey
    expires: float


_MARKER = "vidgate_tenants_marker"  # session.info: the SQLite change marker to append to at commit


def marker_path(url: URL) -> str | None:
    """The change marker beside a SQLite database file; None for other databases and in-memory SQLite."""
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    return os.path.abspath(url.database) + ".tenants-changed"


class _Marker:
    """What the SQLite change marker looked like when this process last looked."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.seen = self._look()

    def _look(self) -> tuple[int, int] | None:
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return None
        return stat.st_ino, stat.st_size

    def moved(self) -> bool:
        now = self._look()
        if now == self.seen:
            return False
        self.seen = now
        return True


class KeyCache:
    def __init__(self, max_keys: int = MAX_KEYS) -> None:
        self._keys: OrderedDict[str, _Entry] = OrderedDict()
        self._max_keys = max_keys
        self._listeners: list[Callable[[str | None], None]] = []
        self._marker: _Marker | None = None

    def watch(self, url: URL) -> None:
        """SQLite: drop everything whenever another process's change shows in the marker (serve calls this)."""
        path = marker_path(url)
        self._marker = _Marker(path) if path is not None else None

    def on_invalidate(self, listener: Callable[[str | None], None]) -> None:
        """Call `listener(tenant_id)` when a tenant's entries are dropped, `listener(None)` when all are."""
        self._listeners.append(listener)

    def get(self, digest: str) -> tuple[Tenant, ApiKey] | None:
        if self._marker is not None and self._marker.moved():
            self.clear()
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

    def invalidate(self, tenant_id: str) -> None:
        for digest in [d for d, entry in self._keys.items() if entry.tenant.id == tenant_id]:
            del self._keys[digest]
        for listener in self._listeners:
            listener(tenant_id)

    def clear(self) -> None:
        self._keys.clear()
        for listener in self._listeners:
            listener(None)

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
    elif (path := marker_path(bind.engine.url)) is not None:
        session.info[_MARKER] = path


@event.listens_for(Session, "after_commit")
def _invalidate_after_commit(session: Session) -> None:
    path = session.info.pop(_MARKER, None)
    if path is not None:
        # Only after the commit, so no process drops its cache and reads the row as it was.
        try:
            with open(path, "ab") as marker:
                marker.write(b".")
        except OSError as exc:
            log.error("could not signal a tenant change to other processes (%s): they see it after the TTL", exc)
    for tenant_id in session.info.pop(_CHANGED, ()):
        CACHE.invalidate(tenant_id)


@event.listens_for(Session, "after_rollback")
def _forget_after_rollback(session: Session) -> None:
    session.info.pop(_CHANGED, None)
    session.info.pop(_MARKER, None)


def _on_notify(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
    CACHE.invalidate(payload)


async def listen(url: URL, stop: asyncio.Event) -> None:
    """Keep a LISTEN connection open until `stop` is set; reconnect (and flush) when it is lost."""
    dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
    while not stop.is_set():
        conn = None
        try:
            conn = await asyncpg.connect(dsn, timeout=5, server_settings={"application_name": LISTENER_NAME})
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
