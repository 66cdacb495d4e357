"""Reading and switching the providers' shared state (the provider_states table).

The read API for operator-facing code (admin routes, CLI, dashboard; all in the caller's session):
- `live_states(session, registry, now)` -> `list[LiveState]`, one per configured provider in the
  registry's order: `disabled`, `disabled_at`, `disabled_by`, `cooldown_until` (None when not cooling
  down), `cooldown_reason`, `circuit` ("closed" | "open" | "half_open"), `circuit_until`, `failures`
  (errors in a row), `in_flight` (counted across replicas; meaningful while it has a max_concurrent),
  `max_concurrent`, `last_error`, `last_error_at`. `LiveState.present()` is the camelCase JSON form.
- `set_disabled(session, name, disabled=..., actor=...)` -> the state before and after (for the audit
  log); only flushes. Every replica's routing sees it within `STATE_TTL_S` (app/providers/health.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.core import clock
from app.core.database import insert_ignore
from app.providers.config import Registry
from app.providers.models import ProviderState

Circuit = Literal["closed", "open", "half_open"]


@dataclass(frozen=True)
class LiveState:
    name: str
    disabled: bool
    disabled_at: datetime | None
    disabled_by: str | None
    cooldown_until: datetime | None
    cooldown_reason: str | None
    circuit: Circuit
    circuit_until: datetime | None
    failures: int
    in_flight: int
    max_concurrent: int | None
    last_error: str | None
    last_error_at: datetime | None

    def present(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "disabled": self.disabled,
            "disabledAt": clock.iso(self.disabled_at),
            "disabledBy": self.disabled_by,
            "coolingDownUntil": clock.iso(self.cooldown_until),
            "coolingDownReason": self.cooldown_reason,
            "circuit": self.circuit,
            "circuitUntil": clock.iso(self.circuit_until),
            "failuresInARow": self.failures,
            "inFlight": self.in_flight,
            "maxConcurrent": self.max_concurrent,
            "lastError": self.last_error,
            "lastErrorAt": clock.iso(self.last_error_at),
        }


def circuit_of(row: ProviderState | None, now: datetime) -> Circuit:
    if row is None or row.circuit_until is None:
        return "closed"
    return "open" if row.circuit_until > now else "half_open"


async def ensure_rows(session: AsyncSession, names: list[str]) -> None:
    """Every configured provider has its row (idempotent; races between replicas are ignored)."""
    now = clock.now()
    rows = [dict(name=name, disabled=False, in_flight=0, failures=0, updated_at=now) for name in sorted(set(names))]
    if rows:
        await insert_ignore(session, ProviderState, rows)


async def live_states(session: AsyncSession, registry: Registry, now: datetime | None = None) -> list[LiveState]:
    now = now or clock.now()
    rows = {
        row.name: row
        for row in await session.scalars(select(ProviderState).where(ProviderState.name.in_(registry.names)))
    }
    states = []
    for provider in registry.providers:
        row = rows.get(provider.name)
        cooling = row is not None and row.cooldown_until is not None and row.cooldown_until > now
        states.append(
            LiveState(
                name=provider.name,
                disabled=bool(row and row.disabled),
                disabled_at=row.disabled_at if row else None,
                disabled_by=row.disabled_by if row else None,
                cooldown_until=row.cooldown_until if row and cooling else None,
                cooldown_reason=row.cooldown_reason if row and cooling else None,
                circuit=circuit_of(row, now),
                circuit_until=row.circuit_until if row else None,
                failures=row.failures if row else 0,
                in_flight=row.in_flight if row else 0,
                max_concurrent=provider.max_concurrent,
                last_error=row.last_error if row else None,
                last_error_at=row.last_error_at if row else None,
            )
        )
    return states


async def set_disabled(
    session: AsyncSession, name: str, *, disabled: bool, actor: str | None = None
) -> tuple[bool, bool]:
    """The operator's switch: (disabled before, disabled after). What is in flight there goes on."""
    await ensure_rows(session, [name])
    before = await session.scalar(select(ProviderState.disabled).where(ProviderState.name == name).with_for_update())
    now = clock.now()
    await session.execute(
        update(ProviderState)
        .where(ProviderState.name == name)
        .values(
            disabled=disabled,
            disabled_at=now if disabled else None,
            disabled_by=actor if disabled else None,
            updated_at=now,
        )
    )
    return bool(before), disabled
