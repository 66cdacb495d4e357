"""What a running process shares: settings, the database, the HTTP clients. Built once per process."""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker

from app.core.batching import Batcher
from app.core.database import OwnConnection
from app.core.http import upstream_session, webhook_session
from app.core.settings import Settings
from app.providers.adapters import Adapter, Providers
from app.providers.config import Registry, load_registry


def new_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class QueueHook(Protocol):
    """The fair queue (app/queue, SPEC §12) as the submit and read paths of app/predictions see it;
    given to the runtime by build_runtime, so that predictions need not import the queue (which
    builds on predictions)."""

    async def waiting(self, runtime: Runtime, model_id: str) -> bool:
        """Whether predictions wait for this model (a new submit for it then queues too)."""
        ...

    async def enqueue(
        self,
        runtime: Runtime,
        tenant: Any,
        key: Any,
        prediction: Any,
        *,
        reason: str,
        idempotency_key: str | None,
        status_url_base: str,
    ) -> Any:
        """A held prediction stored as queued; its submit answer (a SubmitResult)."""
        ...

    async def position(self, connection: AsyncConnection, tenant_id: str, prediction_id: str) -> int | None:
        """1-based among the tenant's own queued predictions; None when it is not queued."""
        ...


@dataclass
class Runtime:
    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    # The first provider's adapter (the only one without a providers file): the readiness ping's target.
    upstream: Adapter
    upstream_http: aiohttp.ClientSession
    webhook_http: aiohttp.ClientSession
    providers: Providers = field(repr=False)
    worker_id: str = field(default_factory=new_worker_id)
    # The process's ledger writer (app/predictions/writer.py), made on first use. Not copied by
    # dataclasses.replace: a writer applies its batches with the runtime that made it.
    writers: dict[str, Batcher[Any, Any]] = field(default_factory=dict, init=False, repr=False)
    # Where submits no provider can take now wait (None: refused with 503 as before the queue).
    queue: QueueHook | None = field(default=None, repr=False)
    # The ledger writer's own connection (app/predictions/writer.py), made on first use.
    ledger_connection: OwnConnection | None = field(default=None, init=False, repr=False)

    async def close(self) -> None:
        if self.ledger_connection is not None:
            await self.ledger_connection.close()
        await self.upstream_http.close()
        await self.webhook_http.close()


def build_runtime(
    settings: Settings,
    engine: AsyncEngine,
    sessions: async_sessionmaker[AsyncSession],
    upstream_base_url: str | None = None,
    registry: Registry | None = None,
) -> Runtime:
    """`upstream_base_url`: where the implicit provider is (the sandbox's simulator); `registry`: the
    providers to route to (default: VIDGATE_PROVIDERS_FILE, or today's settings as one provider)."""
    upstream_http = upstream_session(
        concurrency=max(settings.worker_concurrency, 32), timeout_s=settings.upstream_timeout_s
    )
    webhook_http = webhook_session(
        concurrency=settings.webhook_concurrency,
        timeout_s=settings.webhook_timeout_s,
        allow_private=settings.webhook_allow_private,
    )
    if registry is None:
        registry = load_registry(
            settings.model_copy(update={"upstream_base_url": upstream_base_url}) if upstream_base_url else settings
        )
    providers = Providers(registry, settings, upstream_http, sessions)
    upstream = providers.adapter(None)
    from app.queue.service import Hook  # here: app.queue builds on the modules that import this one

    return Runtime(settings, engine, sessions, upstream, upstream_http, webhook_http, providers, queue=Hook())
