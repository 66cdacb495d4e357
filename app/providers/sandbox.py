"""Sandbox mode with providers: one simulator per configured provider (each speaks every wire format),
so the quick start, and a providers file tried out with --sandbox, run the whole flow without any
vendor account. No key is ever sent to them."""

from __future__ import annotations

from aiohttp import web
from yarl import URL

from app.core.settings import Settings
from app.providers.config import Registry, load_registry
from app.upstream import sandbox


async def start(settings: Settings, public_base_url: str) -> tuple[list[web.AppRunner], Registry]:
    """`settings` with the sandbox's own output host already added (sandbox.with_own_outputs)."""
    registry = load_registry(settings)
    own_host = f"{URL(public_base_url).host}:{URL(public_base_url).port}"
    runners: list[web.AppRunner] = []
    providers = []
    for provider in registry.providers:
        runner, url = await sandbox.start(settings, public_base_url)
        runners.append(runner)
        hosts = provider.output_hosts if own_host in provider.output_hosts else [*provider.output_hosts, own_host]
        providers.append(provider.model_copy(update={"base_url": url, "output_hosts": hosts}))
    return runners, registry.model_copy(update={"providers": providers})
