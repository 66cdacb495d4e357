"""Sandbox mode (`vidgate serve --sandbox`): a built-in simulator answers instead of the vendor, and on a
database of its own a demo tenant is ready to use."""

from __future__ import annotations

import logging

from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from yarl import URL

from app.core.database import transaction
from app.core.settings import SANDBOX_ADMIN_TOKEN, Settings, secret_given
from app.tenants import service as tenants_service
from app.tenants.schemas import KeyCreate, TenantCreate
from app.upstream.simulator import SimConfig, start_simulator

log = logging.getLogger("vidgate.sandbox")

DEMO_TENANT = "demo"
BANNER = "=" * 72


async def start(settings: Settings, public_base_url: str) -> tuple[web.AppRunner, str]:
    config = SimConfig(
        completion_s=settings.sandbox_completion_s,
        failure_ratio=settings.sandbox_failure_ratio,
        estimated_time=settings.sandbox_estimated_time,
        output_base_url=public_base_url,
    )
    runner, url = await start_simulator(config=config)
    log.warning(
        "SANDBOX MODE (--sandbox / VIDGATE_SANDBOX=true): a built-in simulator of the VibeDream API "
        "answers instead of the vendor. Nothing is billed and the videos are a sample clip.",
        extra={"simulator_url": url},
    )
    return runner, url


def with_own_outputs(settings: Settings, public_base_url: str) -> Settings:
    """The sandbox's clips are served by the gateway itself (/sandbox/outputs/...): the quick start
    rehosts them like the vendor's, so their host:port is one outputs may come from."""
    url = URL(public_base_url)
    return settings.model_copy(update={"output_hosts": [*settings.output_hosts, f"{url.host}:{url.port}"]})


async def create_demo_key(
    sessions: async_sessionmaker[AsyncSession], settings: Settings, public_base_url: str
) -> str | None:
    """A new key for the sandbox's demo tenant (created on first start), printed with a ready curl
    command. A database with tenants of its own gets nothing: the sandbox never adds to real data."""
    admin = "(your VIDGATE_ADMIN_TOKEN)" if secret_given(settings.admin_token) else SANDBOX_ADMIN_TOKEN
    base = public_base_url.rstrip("/")
    async with transaction(sessions) as session:
        if await tenants_service.has_tenants_besides(session, DEMO_TENANT):
            log.warning("sandbox: the database has tenants of its own, so no demo tenant or key was made")
            print(
                f"\n{BANNER}\n vidgate is running in SANDBOX mode at {base}\n"
                " this database has tenants of its own: no demo tenant was made. Create a key with\n"
                f" `vidgate keys create TENANT_ID`.\n operator token: {admin}   API docs: {base}/docs\n{BANNER}\n",
                flush=True,
            )
            return None
        tenant = await tenants_service.find_tenant_by_name(session, DEMO_TENANT)
        if tenant is None:
            tenant = await tenants_service.create_tenant(
                session, TenantCreate(name=DEMO_TENANT, budget_cents=1000, budget_period="day")
            )
        _, raw = await tenants_service.create_key(session, tenant, KeyCreate(name="sandbox start"))
    print(
        f"\n{BANNER}\n vidgate is running in SANDBOX mode at {base}\n"
        f" demo tenant {tenant.id} (budget 1000 cents a day), a new API key:\n\n"
        f"   export VIDGATE_KEY={raw}\n\n"
        " submit a prediction and wait up to 30 s for it:\n\n"
        f"   curl -s {base}/api/v1/models/ltx-2-19b/generate \\\n"
        '     -H "Authorization: Bearer $VIDGATE_KEY" -H "Content-Type: application/json" \\\n'
        '     -H "Prefer: wait=30" \\\n'
        '     -d \'{"image": "https://example.com/cat.png", "prompt": "a cat waves", "resolution": "480p", "duration": 5}\'\n\n'
        f" operator token: {admin}   API docs: {base}/docs\n{BANNER}\n",
        flush=True,
    )
    return raw
