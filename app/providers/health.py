"""Providers' health and caps, shared by every replica through the provider_states table (SPEC §11).

- A 429 cools a provider down for its Retry-After (default 5 s); a 401/403 for its cooldown_s (the
  gateway's credentials there are wrong: logged as an error naming the provider).
- `failure_threshold` errors in a row (5xx, refused, timeouts) open its circuit for `cooldown_s`; then
  one request (the one that claims `probe_until`) probes it: a success closes the circuit, an error
  opens it again. An open circuit is never a candidate.
- `max_concurrent` is a conditional UPDATE of `in_flight`, `rate_per_minute` a GCRA row in rate_limits
  (app/budgets/limits.py), both in the caller's transaction, so they hold across replicas.

Each process reads the rows at most every STATE_TTL_S (one SELECT of all providers): a disable by the
operator or another replica's cooldown reaches it within that; its own findings apply at once.
Health writes are best effort (their own short transaction): a database outage loses a cooldown, never
money.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from sqlalchemy import Integer, bindparam, case, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.budgets import limits as budget_limits
from app.core import clock
from app.core.database import table_of, transaction
from app.core.errors import DatabaseUnavailable
from app.providers import service as providers_service
from app.providers.config import ProviderConfig, Registry
from app.providers.models import ProviderState

log = logging.getLogger("vidgate.providers")

STATE_TTL_S = 1.0
DEFAULT_RETRY_AFTER_S = 5.0


@dataclass(frozen=True)
class State:
    """What routing needs of one provider's row."""

    disabled: bool = False
    cooldown_until: datetime | None = None
    failures: int = 0
    circuit_until: datetime | None = None
    probe_until: datetime | None = None
    in_flight: int = 0

    def cooling(self, now: datetime) -> bool:
        return self.cooldown_until is not None and self.cooldown_until > now

    def circuit_open(self, now: datetime) -> bool:
        return self.circuit_until is not None and self.circuit_until > now

    def half_open(self, now: datetime) -> bool:
        return self.circuit_until is not None and self.circuit_until <= now

    def probing(self, now: datetime) -> bool:
        return self.probe_until is not None and self.probe_until > now


_states = table_of(ProviderState).c
_TAKE_SLOT = (
    update(table_of(ProviderState))
    .where(_states.name == bindparam("b_name"), _states.in_flight < bindparam("b_cap", type_=Integer))
    .values(in_flight=_states.in_flight + 1)
    .returning(_states.in_flight)
)
_GIVE_SLOTS = (
    update(table_of(ProviderState))
    .where(_states.name == bindparam("b_name"), _states.in_flight >= bindparam("b_n", type_=Integer))
    .values(in_flight=_states.in_flight - bindparam("b_n", type_=Integer))
)
_CLAIM_PROBE = (
    update(table_of(ProviderState))
    .where(
        _states.name == bindparam("b_name"),
        _states.circuit_until <= bindparam("b_now"),
        (_states.probe_until.is_(None)) | (_states.probe_until <= bindparam("b_now")),
    )
    .values(probe_until=bindparam("b_probe_until"))
    .returning(_states.name)
)


def rate_scope(name: str) -> str:
    return f"provider:{name}"


class Health:
    """One process's view of the providers' shared state, and the writes that change it."""

    def __init__(self, registry: Registry, sessions: async_sessionmaker[AsyncSession], probe_s: float) -> None:
        self.registry = registry
        self.sessions = sessions
        self.probe_s = probe_s
        self._states: dict[str, State] = {}
        self._read_at: float | None = None
        self._rows_made = False
        self._refreshing: asyncio.Lock | None = None

    def state(self, name: str) -> State:
        return self._states.get(name, State())

    async def refresh(self, *, force: bool = False) -> dict[str, State]:
        """The states, read again when older than STATE_TTL_S (or on `force`). An outage keeps the last read."""
        loop = asyncio.get_running_loop()
        if not force and self._read_at is not None and loop.time() - self._read_at < STATE_TTL_S:
            return self._states
        if self._refreshing is None:
            self._refreshing = asyncio.Lock()
        async with self._refreshing:
            if not force and self._read_at is not None and loop.time() - self._read_at < STATE_TTL_S:
                return self._states  # another request read them meanwhile
            try:
                async with transaction(self.sessions, readonly=True) as session:
                    rows = await session.execute(
                        select(
                            _states.name,
                            _states.disabled,
                            _states.cooldown_until,
                            _states.failures,
                            _states.circuit_until,
                            _states.probe_until,
                            _states.in_flight,
                        ).where(_states.name.in_(self.registry.names))
                    )
                    self._states = {row.name: State(*row[1:]) for row in rows}
            except DatabaseUnavailable:
                log.warning("provider states could not be read; routing on the last ones read")
            self._read_at = loop.time()
        return self._states

    async def _write(self, name: str, **values: object) -> None:
        """Best effort: an outage loses this health note (logged), never money."""
        try:
            async with transaction(self.sessions) as session:
                if not self._rows_made:
                    await providers_service.ensure_rows(session, self.registry.names)
                await session.execute(
                    update(ProviderState)
                    .where(ProviderState.name == name)
                    .values(updated_at=clock.now(), **values)
                    .execution_options(synchronize_session=False)
                )
            self._rows_made = True
        except DatabaseUnavailable:
            log.warning("provider health not recorded (database unavailable)", extra={"provider": name})

    # ------------------------------------------------------------ findings

    async def rate_limited(self, provider: ProviderConfig, retry_after_s: float | None) -> None:
        until = clock.now() + timedelta(seconds=retry_after_s if retry_after_s is not None else DEFAULT_RETRY_AFTER_S)
        self._states[provider.name] = replace(self.state(provider.name), cooldown_until=until)
        await self._write(provider.name, cooldown_until=until, cooldown_reason="429 Too Many Requests")

    async def bad_credentials(self, provider: ProviderConfig, status: int) -> None:
        log.error(
            "provider refused the gateway's credentials: cooling it down; check its key",
            extra={"provider": provider.name, "upstream_status": status, "api_key_env": provider.api_key_env},
        )
        now = clock.now()
        until = now + timedelta(seconds=provider.cooldown_s)
        self._states[provider.name] = replace(self.state(provider.name), cooldown_until=until)
        await self._write(
            provider.name,
            cooldown_until=until,
            cooldown_reason=f"{status}: the gateway's credentials were refused",
            last_error=f"answered {status} to the gateway's key",
            last_error_at=now,
        )

    async def failed(self, provider: ProviderConfig, reason: str) -> None:
        """An error that counts toward the circuit (5xx, no connection, a timeout)."""
        now = clock.now()
        state = self.state(provider.name)
        failures = state.failures + 1
        threshold = provider.failure_threshold
        opens = threshold is not None and (failures >= threshold or state.half_open(now))
        open_until = now + timedelta(seconds=provider.cooldown_s)
        self._states[provider.name] = replace(
            state, failures=failures, circuit_until=open_until if opens else state.circuit_until, probe_until=None
        )
        if opens:
            log.warning(
                "provider circuit opened", extra={"provider": provider.name, "failures": failures, "reason": reason}
            )
        values: dict[str, object] = dict(
            failures=_states.failures + 1, probe_until=None, last_error=reason[:500], last_error_at=now
        )
        if threshold is not None:
            # In SQL, so that errors counted by other replicas meanwhile count too; a failed probe reopens.
            values["circuit_until"] = case(
                (
                    (_states.failures + 1 >= threshold) | (_states.circuit_until <= now),
                    open_until,
                ),
                else_=_states.circuit_until,
            )
        await self._write(provider.name, **values)

    async def succeeded(self, provider: ProviderConfig) -> None:
        """Closes the circuit; written only when there was something to clear (the common case costs nothing)."""
        state = self.state(provider.name)
        if not state.failures and state.circuit_until is None and state.probe_until is None:
            return
        self._states[provider.name] = replace(state, failures=0, circuit_until=None, probe_until=None)
        await self._write(provider.name, failures=0, circuit_until=None, probe_until=None)

    async def claim_probe(self, provider: ProviderConfig) -> bool:
        """The one request that probes a half-open circuit (across replicas)."""
        now = clock.now()
        try:
            async with transaction(self.sessions) as session:
                claimed = await session.scalar(
                    _CLAIM_PROBE,
                    {"b_name": provider.name, "b_now": now, "b_probe_until": now + timedelta(seconds=self.probe_s)},
                )
        except DatabaseUnavailable:
            return False
        if claimed is not None:
            self._states[provider.name] = replace(
                self.state(provider.name), probe_until=now + timedelta(seconds=self.probe_s)
            )
        return claimed is not None

    # ------------------------------------------------------------ caps, in the caller's transaction


async def take_capacity(session: AsyncSession, provider: ProviderConfig, now: datetime) -> bool:
    """One submit's room at `provider`: a unit of its rate, then a slot under max_concurrent.
    False (nothing taken) when either is full."""
    if provider.rate_per_minute is not None and not await budget_limits.take_scope_rate(
        session, rate_scope(provider.name), provider.rate_per_minute, now
    ):
        return False
    if provider.max_concurrent is None:
        return True
    params = {"b_name": provider.name, "b_cap": provider.max_concurrent}
    if (await session.execute(_TAKE_SLOT, params)).first() is not None:
        return True
    if await session.scalar(select(_states.name).where(_states.name == provider.name)) is None:
        await providers_service.ensure_rows(session, [provider.name])  # its first submit anywhere
        if (await session.execute(_TAKE_SLOT, params)).first() is not None:
            return True
    if provider.rate_per_minute is not None:
        await budget_limits.give_scope_rate(session, rate_scope(provider.name), provider.rate_per_minute)
    return False


async def give_slots(session: AsyncSession, slots: dict[str, int]) -> None:
    """Slots back (provider name -> n; one UPDATE, executemany, in name order)."""
    params = [{"b_name": name, "b_n": n} for name, n in sorted(slots.items()) if n]
    if params:
        await session.execute(_GIVE_SLOTS, params)
