"""The caller's balance for the budget headers (app/budgets/headers.py): read by the query that checks
the key, or taken from this process's snapshot.

The snapshot serves `X-Budget-Remaining-Cents` on a submit's answer without a read of its own. It is at
most `balance_ttl_s` old; this process's own charges change it at once (the request's `note_charge`
mutates the very object the snapshot holds), other processes' charges and refunds show up when it is
read again. It is dropped with the tenant's cached keys (app/tenants/cache.py: a tenant changed here or,
through NOTIFY, anywhere). Reads (the list routes, GET) read the balance fresh with their data, and
refresh the snapshot; a GET answered from memory (a final prediction, app/predictions/cache.py) shows
the snapshot, as a submit does.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from sqlalchemy import and_, bindparam, case, select

from app.budgets.headers import Balance
from app.budgets.models import BudgetCounter
from app.budgets.scopes import tenant_scope, tenant_scope_of
from app.budgets.service import period_of
from app.core import clock
from app.core.database import Reads, table_of
from app.tenants import service as tenants_service
from app.tenants.cache import CACHE, MAX_KEYS
from app.tenants.models import ApiKey, Tenant


class BalanceCache:
    def __init__(self, max_tenants: int = MAX_KEYS) -> None:
        self._balances: dict[str, tuple[Balance, float]] = {}
        self._max_tenants = max_tenants

    def get(self, tenant_id: str) -> Balance | None:
        held = self._balances.get(tenant_id)
        if held is None:
            return None
        balance, expires = held
        if expires <= time.monotonic() or (balance.resets_at is not None and balance.resets_at <= clock.now()):
            del self._balances[tenant_id]
            return None
        return balance

    def put(self, tenant_id: str, balance: Balance, ttl_s: float) -> None:
        if ttl_s <= 0:
            return
        if len(self._balances) >= self._max_tenants and tenant_id not in self._balances:
            self._balances.clear()
        self._balances[tenant_id] = (balance, time.monotonic() + ttl_s)

    def drop(self, tenant_id: str | None) -> None:
        """One tenant's snapshot (None: every one)."""
        if tenant_id is None:
            self._balances.clear()
        else:
            self._balances.pop(tenant_id, None)


# One per process, next to the key cache, and dropped with its entries.
BALANCES = BalanceCache()
CACHE.on_invalidate(BALANCES.drop)


def counter_scope(tenant: Tenant) -> str:
    return tenant_scope(tenant.id)


def balance_of(tenant: Tenant, spent: int | None, reserved: int | None, now: datetime) -> Balance:
    """The balance from the tenant's counter row of the current period (None: no row yet)."""
    period = period_of(tenant.budget_period, now)
    return Balance(tenant.budget_cents, spent or 0, reserved or 0, period.end)


# The key check's query plus the tenant's counter row of its current period (a primary-key probe in the
# same round trip), for the budget headers every tenant answer carries.
_tenants = table_of(Tenant).c
_counters = table_of(BudgetCounter).c
_PERIOD_KINDS = ("day", "week", "month", "total")
_current_period_start = case(
    *(
        (_tenants.budget_period == kind, bindparam(f"p_{kind}", type_=_counters.period_start.type))
        for kind in _PERIOD_KINDS[:3]
    ),
    else_=bindparam("p_total", type_=_counters.period_start.type),
)
_AUTHENTICATE_WITH_BALANCE = tenants_service.KEY_LOOKUP.add_columns(
    _counters.spent_cents, _counters.reserved_cents
).outerjoin(
    table_of(BudgetCounter),
    and_(_counters.scope == tenant_scope_of(_tenants.id), _counters.period_start == _current_period_start),
)


async def authenticate_with_balance(
    session: Reads, raw_key: str, *, cache_ttl_s: float = 0.0
) -> tuple[Tenant, ApiKey, Balance]:
    """tenants_service.authenticate(), plus the tenant's balance this period, read by the same query.
    With `cache_ttl_s`, a valid key is kept in the cache that long."""
    digest = tenants_service.key_digest(raw_key)
    now = clock.now()
    params: dict[str, Any] = {"digest": digest}
    params.update({f"p_{kind}": period_of(kind, now).start for kind in _PERIOD_KINDS})
    row = (await session.execute(_AUTHENTICATE_WITH_BALANCE, params)).first()
    tenant, key = tenants_service.caller_of(row, digest, cache_ttl_s=cache_ttl_s)
    assert row is not None
    spent, reserved = row[-2:]
    return tenant, key, balance_of(tenant, spent, reserved, now)


_BALANCE = select(_counters.spent_cents, _counters.reserved_cents).where(
    _counters.scope == bindparam("b_scope"), _counters.period_start == bindparam("b_period_start")
)


async def read_balance(session: Reads, tenant: Tenant) -> Balance:
    """The tenant's balance now (one primary-key probe), for answers that read nothing else."""
    now = clock.now()
    start = period_of(tenant.budget_period, now).start
    row = (await session.execute(_BALANCE, {"b_scope": counter_scope(tenant), "b_period_start": start})).first()
    spent, reserved = row if row is not None else (0, 0)
    return balance_of(tenant, spent, reserved, now)
