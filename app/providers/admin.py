"""What operators see of the providers and the one switch they have (SPEC §11): shared by the operator
API (app/providers/router.py), the CLI and the dashboard, each in its caller's session.

Settings come from the registry this process routes by (never the key), live state from the
provider_states table every replica writes (app/providers/service.py), today's calls from
provider_days (app/providers/stats.py) and today's spend from the ledger.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, time
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from app.audit import service as audit_service
from app.budgets import service as budgets_service
from app.core import clock
from app.core.errors import NotFound
from app.providers import service as providers_service
from app.providers import stats
from app.providers.config import ProviderConfig, Registry


class ProviderNotFound(NotFound):
    code = "provider_not_found"
    title = "No such provider"


def actor_of(operator: object) -> str:
    """Who switches: the operator's `actor` where the caller's authentication names one, else `admin`
    (the admin token's actor, SPEC §13)."""
    return str(getattr(operator, "actor", None) or "admin")


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def settings_of(provider: ProviderConfig) -> dict[str, Any]:
    """The provider's settings as the file has them, camelCased, without its key (only the variable's name)."""
    return {_camel(field): value for field, value in provider.public().items()}


@dataclass(frozen=True)
class Today:
    """A provider's UTC day so far: calls from every process's tallies, spend from the ledger."""

    submits: int = 0
    accepted: int = 0
    throttled: int = 0
    errors: int = 0
    mean_submit_ms: float | None = None
    polls: int = 0
    spent_cents: int = 0
    predictions: int = 0

    def present(self) -> dict[str, Any]:
        return {
            "submits": self.submits,
            "accepted": self.accepted,
            "throttled": self.throttled,
            "errors": self.errors,
            "meanSubmitMs": None if self.mean_submit_ms is None else round(self.mean_submit_ms, 1),
            "polls": self.polls,
            "spentCents": self.spent_cents,
            "predictions": self.predictions,
        }


async def today(session: AsyncSession) -> dict[str, Today]:
    now = clock.now()
    calls = await stats.today(session)
    start = datetime.combine(now.date(), time(), UTC)
    spend = {row["provider"]: row for row in await budgets_service.usage_report(session, start, None, "provider")}
    out: dict[str, Today] = {}
    for name in set(calls) | set(spend):
        day = calls.get(name)
        money = spend.get(name, {})
        out[name] = Today(
            submits=day.submits if day else 0,
            accepted=day.accepted if day else 0,
            throttled=day.throttled if day else 0,
            errors=day.errors if day else 0,
            mean_submit_ms=day.submit_ms / day.submits if day and day.submits else None,
            polls=day.polls if day else 0,
            spent_cents=int(money.get("spentCents", 0)),
            predictions=int(money.get("predictions", 0)),
        )
    return out


def _state(live: providers_service.LiveState) -> dict[str, Any]:
    shown = live.present()
    shown.pop("name", None)
    shown.pop("maxConcurrent", None)  # a setting, shown with the others
    return {"enabled": not live.disabled, **shown}


async def list_providers(session: AsyncSession, registry: Registry) -> dict[str, Any]:
    """Every configured provider in the file's order: settings, live state and today's figures."""
    states = {s.name: s for s in await providers_service.live_states(session, registry)}
    days = await today(session)
    data = [
        {
            **settings_of(provider),
            "state": _state(states[provider.name]),
            "today": days.get(provider.name, Today()).present(),
        }
        for provider in registry.providers
    ]
    return {"routing": registry.routing, "data": data}


async def get_provider(session: AsyncSession, registry: Registry, name: str) -> dict[str, Any]:
    provider = _known(registry, name)
    (live,) = await providers_service.live_states(session, _only(registry, provider))
    days = await today(session)
    return {**settings_of(provider), "state": _state(live), "today": days.get(name, Today()).present()}


async def set_enabled(
    session: AsyncSession, registry: Registry, name: str, *, enabled: bool, actor: str = "admin"
) -> dict[str, Any]:
    """The operator's switch, stored in the database: every replica stops (or starts again) routing new
    submits there within app/providers' state refresh; predictions in flight there go on."""
    _known(registry, name)
    before = await get_provider(session, registry, name)
    await providers_service.set_disabled(session, name, disabled=not enabled, actor=actor)
    await session.flush()
    after = await get_provider(session, registry, name)
    action = "provider.enable" if enabled else "provider.disable"
    await audit_service.record(
        session,
        actor,
        action,
        audit_service.target("provider", name),
        {"state": before["state"]},
        {"state": after["state"]},
    )
    return after


def _known(registry: Registry, name: str) -> ProviderConfig:
    provider = registry.get(name)
    if provider is None:
        known = ", ".join(registry.names)
        raise ProviderNotFound(f"There is no provider {name!r}; the configured providers are: {known}.")
    return provider


def _only(registry: Registry, provider: ProviderConfig) -> Registry:
    return registry.model_copy(update={"providers": [provider]})
