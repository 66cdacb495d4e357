"""One adapter per wire format behind one small interface, and the process's providers.

An adapter submits (the gateway's §1 body, mapped onto its format), polls (reading the result when
its format keeps it apart, as fal's response_url) and pings. The formats live in app/upstream
(client.py: vibedream, wavespeed.py, fal.py); ADAPTERS is the only place a kind picks its code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import aiohttp
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.core.settings import Settings
from app.providers.config import ProviderConfig, Registry
from app.providers.health import Health
from app.upstream.client import UpstreamClient
from app.upstream.fal import FalClient
from app.upstream.schemas import UpstreamPrediction, UpstreamSubmitted
from app.upstream.wavespeed import WaveSpeedClient


class Adapter(Protocol):
    async def submit(self, model_id: str, body: dict[str, object]) -> UpstreamSubmitted:
        """Raises UpstreamRefused (4xx but 429) or UpstreamUnavailable (with its cause)."""
        ...

    async def get_prediction(self, upstream_id: str, ref: dict[str, Any] | None = None) -> UpstreamPrediction: ...

    async def ping(self) -> bool: ...


ADAPTERS: dict[str, Callable[[aiohttp.ClientSession, str, str, str, str], Adapter]] = {
    "vibedream": UpstreamClient,
    "wavespeed": WaveSpeedClient,
    "fal": FalClient,
}


def build_adapter(provider: ProviderConfig, session: aiohttp.ClientSession, *, sandbox: bool) -> Adapter:
    # In sandbox mode a simulator answers: no key, if one is set, is ever sent to it.
    key = provider.api_key.get_secret_value() if provider.api_key and not sandbox else "sandbox"
    return ADAPTERS[provider.kind](session, provider.base_url, key, provider.model, provider.name)


class UnknownProvider(Exception):
    """A prediction names a provider the registry no longer has (removed from the file)."""


class Providers:
    """The registry, each provider's adapter and the shared health, for one process."""

    def __init__(
        self,
        registry: Registry,
        settings: Settings,
        session: aiohttp.ClientSession,
        sessions: async_sessionmaker[AsyncSession],
    ) -> None:
        self.registry = registry
        self._settings = settings
        self.adapters = {p.name: build_adapter(p, session, sandbox=settings.sandbox) for p in registry.providers}
        # A half-open probe's claim lasts as long as its call can.
        self.health = Health(registry, sessions, probe_s=settings.upstream_timeout_s + 5)

    @property
    def first(self) -> ProviderConfig:
        return self.registry.providers[0]

    def config(self, name: str | None) -> ProviderConfig:
        provider = self.registry.get(name or self.first.name)
        if provider is None:
            raise UnknownProvider(f"provider {name!r} is not configured (VIDGATE_PROVIDERS_FILE)")
        return provider

    def adapter(self, name: str | None) -> Adapter:
        """The adapter of the provider that accepted a prediction (polls never move)."""
        return self.adapters[self.config(name).name]

    def output_hosts(self, name: str | None) -> list[str]:
        """Where that provider's outputs may be fetched from; nowhere for a provider no longer configured.
        Without a providers file, VIDGATE_OUTPUT_HOSTS as the settings say now."""
        if self.registry.source is None:
            return self._settings.output_hosts
        try:
            return self.config(name).output_hosts
        except UnknownProvider:
            return []
