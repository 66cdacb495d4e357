"""Which providers a submit may go to, in which order (SPEC §11).

- `served`: the providers that serve the request at all (model, resolution, duration); none answers
  422 `not_served` naming the field, before anything is held.
- `plan`: of those, the candidates now (enabled, not cooling down, circuit not open, under their caps as
  this process last read them), ordered by the policy: `priority` (lower first, then name); `cheapest`
  (this request's price, then priority); `weighted` (first pick weighted-random, then priority).
- `no_provider_available`: the one place a submit is refused because providers exist but none can
  take it now (the fair queue of SPEC §12 hooks in here).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from app.core import clock
from app.core.errors import AppError
from app.core.retry_after import retry_after_value
from app.providers.adapters import Providers
from app.providers.config import ProviderConfig, Registry


class NotServed(AppError):
    status = 422
    code = "not_served"
    title = "No provider serves this request"


class NoProviderAvailable(AppError):
    status = 503
    code = "no_provider_available"
    title = "No provider can take this request now"


@dataclass(frozen=True)
class Candidate:
    provider: ProviderConfig
    # cents_per_second x duration, when the file prices it (always for kinds whose answers carry no cost).
    price_cents: int | None
    # Its circuit is half-open: it may only be tried by the request that claims the probe.
    probe: bool = False


@dataclass(frozen=True)
class Plan:
    candidates: list[Candidate]
    # Why the others were left out (provider name -> reason), for the refusal's detail.
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def prices(self) -> list[int]:
        return [c.price_cents for c in self.candidates if c.price_cents is not None]

    @property
    def answer_priced(self) -> bool:
        """Whether a candidate's charge is the cost its answer reports (held at the gateway's estimate)."""
        return any(c.price_cents is None for c in self.candidates)


def served(registry: Registry, model_id: str, resolution: str, duration_s: int) -> list[ProviderConfig]:
    """The providers that serve this request at all, or NotServed naming the first field none serves."""
    # Without a providers file the one provider serves whatever VIDGATE_ALLOWED_MODELS allows now
    # (checked before: model_not_found), as before providers.
    by_model = [p for p in registry.providers if registry.source is None or model_id in p.serves]
    if not by_model:
        raise NotServed(f"No configured provider serves model {model_id!r}.", field="modelId")
    by_resolution = [p for p in by_model if resolution in p.resolutions]
    if not by_resolution:
        offered = sorted({r for p in by_model for r in p.resolutions})
        raise NotServed(
            f"No configured provider serves {model_id!r} at {resolution}. Served: {', '.join(offered)}.",
            field="resolution",
        )
    by_duration = [p for p in by_resolution if duration_s <= p.max_duration]
    if not by_duration:
        longest = max(p.max_duration for p in by_resolution)
        raise NotServed(
            f"No configured provider serves {model_id!r} at {resolution} for {duration_s} s; the longest served "
            f"is {longest} s.",
            field="duration",
            maxDuration=longest,
        )
    return by_duration


def order(policy: str, candidates: list[Candidate], rng: random.Random | None = None) -> list[Candidate]:
    by_priority = sorted(candidates, key=lambda c: (c.provider.priority, c.provider.name))
    if policy == "cheapest":
        return sorted(
            by_priority,
            key=lambda c: (math.inf if c.price_cents is None else c.price_cents, c.provider.priority, c.provider.name),
        )
    if policy == "weighted" and by_priority:
        weights = [c.provider.weight for c in by_priority]
        if sum(weights) <= 0:
            return by_priority
        first = (rng or random).choices(by_priority, weights=weights)[0]
        return [first, *(c for c in by_priority if c is not first)]
    return by_priority


async def plan(providers: Providers, model_id: str, resolution: str, duration_s: int) -> Plan:
    """The candidates for one submit, in the order to try them (raises NotServed)."""
    registry = providers.registry
    serving = served(registry, model_id, resolution, duration_s)
    states = await providers.health.refresh()
    now = clock.now()
    candidates: list[Candidate] = []
    skipped: dict[str, str] = {}
    for provider in serving:
        state = states.get(provider.name)
        if state is not None:
            if state.disabled:
                skipped[provider.name] = "disabled by the operator"
                continue
            if state.cooling(now):
                skipped[provider.name] = "cooling down"
                continue
            if state.circuit_open(now):
                skipped[provider.name] = "circuit open"
                continue
            if state.half_open(now) and state.probing(now):
                skipped[provider.name] = "circuit half-open, being probed"
                continue
            if provider.max_concurrent is not None and state.in_flight >= provider.max_concurrent:
                skipped[provider.name] = "at its max_concurrent"
                continue
        probe = state is not None and state.half_open(now)
        candidates.append(Candidate(provider, provider.file_price_cents(resolution, duration_s), probe))
    return Plan(order(registry.routing, candidates), skipped)


def no_provider_available(skipped: dict[str, str], retry_after_s: float | None = None) -> NoProviderAvailable:
    """Providers serve the request, but none can take it now (each at a cap, cooling down, disabled or
    failing). The one place this is decided: the fair queue (SPEC §12) will take the submit here."""
    why = "; ".join(f"{name}: {reason}" for name, reason in sorted(skipped.items())) or "none answered"
    wait = max(1, math.ceil(retry_after_s or 5))
    return NoProviderAvailable(
        f"No provider can take this prediction now ({why}). Nothing was charged; retry later.",
        headers={"Retry-After": retry_after_value(wait)},
        retryAfter=wait,
    )
