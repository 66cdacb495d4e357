"""Assembles the ASGI app: routers, error handlers, middleware and the process lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web
from fastapi import FastAPI
from fastapi.routing import APIRoute
from sqlalchemy import make_url
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from app.admin.deps import require_admin
from app.admin.router import router as admin_router
from app.budgets import deps as budgets_deps
from app.budgets.headers import BALANCE_SLOT
from app.budgets.router import router as usage_router
from app.core import lifecycle
from app.core.database import create_engine, create_sessionmaker
from app.core.errors import install_error_handlers
from app.core.lifecycle import Admission
from app.core.logging import configure_logging
from app.core.middleware import RequestMiddleware
from app.core.migrate import upgrade_to_head
from app.core.settings import Settings, get_settings
from app.dashboard.router import router as dashboard_router
from app.ops import router as ops_router
from app.outputs.router import router as outputs_router
from app.predictions import hot
from app.predictions.router import router as predictions_router
from app.providers import config as providers_config
from app.providers import sandbox as providers_sandbox
from app.providers import stats as provider_stats
from app.providers.router import build_router as build_providers_router
from app.runtime import Runtime, build_runtime
from app.selfservice.router import router as selfservice_router
from app.tenants import cache as key_cache
from app.tenants import last_used
from app.upstream import sandbox
from app.webhooks.router import router as webhooks_router
from app.worker import Worker

log = logging.getLogger("vidgate")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    if getattr(app.state, "runtime", None) is not None:
        yield  # tests hand in a ready runtime
        return
    settings: Settings = app.state.settings
    refusal = settings.startup_refusal("serve") or providers_config.startup_refusal(settings)
    if refusal is not None:
        raise SystemExit(refusal)
    engine = create_engine(
        settings.database_url, pool_size=settings.database_pool_size, pooled=settings.database_pooled
    )
    sessions = create_sessionmaker(engine)
    # The sandbox's simulator writes output links before any request says where callers reach us:
    # the address `serve` listens on stands in for it.
    sandbox_base_url = settings.public_base_url or app.state.listen_url or "http://127.0.0.1:8000"
    simulators: list[web.AppRunner] = []
    registry = None
    if settings.sandbox:
        await upgrade_to_head(engine)
        settings = sandbox.with_own_outputs(settings, sandbox_base_url)
        simulators, registry = await providers_sandbox.start(settings, sandbox_base_url)
    runtime = build_runtime(settings, engine, sessions, registry=registry)
    app.state.runtime = runtime
    # Every process hears of key revokes and tenant changes at once (app/tenants/cache.py): NOTIFY on
    # PostgreSQL, a marker file beside the database on SQLite.
    listener_stop = asyncio.Event()
    listener = (
        # LISTEN needs a session of its own: past a transaction pooler, the direct URL.
        asyncio.create_task(key_cache.listen(make_url(settings.database_session_url), listener_stop))
        if engine.dialect.name == "postgresql"
        else None
    )
    key_cache.CACHE.watch(engine.url)  # SQLite: the marker other processes (the CLI) append to
    # Each process adds its upstream call tallies to the providers' daily rows (the dashboard's figures).
    stats_stop = asyncio.Event()
    stats_task = asyncio.create_task(provider_stats.flush_loop(sessions, stats_stop))
    # Keys' lastUsedAt, noted in memory by each key check, written every few seconds in one statement.
    last_used_task = asyncio.create_task(last_used.flush_loop(sessions, settings.key_last_used_flush_s, listener_stop))
    worker_task = None
    worker = Worker(runtime)
    if settings.run_worker:
        worker_task = asyncio.create_task(worker.run())
    if settings.sandbox:
        await sandbox.create_demo_key(sessions, settings, sandbox_base_url)
    lifecycle.ready_heap()
    try:
        # SIGTERM: out of the balancer while still serving, the worker handing its leases back meanwhile.
        with lifecycle.drain_on_sigterm(settings.shutdown_drain_s, [worker.stop] if worker_task else []):
            yield
    finally:
        worker.stop()
        listener_stop.set()
        if listener is not None:
            with contextlib.suppress(Exception):
                await listener
        with contextlib.suppress(Exception):
            await last_used_task
        if worker_task is not None:
            with contextlib.suppress(Exception):
                await worker_task
        stats_stop.set()
        with contextlib.suppress(Exception):
            await stats_task
        await runtime.close()
        for simulator in simulators:
            await simulator.cleanup()
        await engine.dispose()
        app.state.runtime = None


class HotRoutes:
    """Hands the two hot routes (submit, GET of a prediction) to their bare handlers (app/predictions/hot.py),
    past FastAPI's routing and dependency solving; every other request goes to FastAPI unchanged.

    It sits inside RequestMiddleware, so those answers get the request id, the guard, admission,
    Server-Timing, the budget headers and the access log as any other. Only an exact match is taken:
    the method and a path the FastAPI route's pattern (`[^/]+` for the parameter) would match, so a 405
    with its Allow, a trailing slash's redirect or an unknown path are answered by FastAPI as before. A
    request under a root_path is left to FastAPI too (its own path rules; the same code serves it)."""

    def __init__(self, app: ASGIApp, *, fastapi: FastAPI) -> None:
        self.app = app
        self.fastapi = fastapi
        self._routes: tuple[BaseRoute, BaseRoute] | None = None

    def _route(self, index: int) -> BaseRoute:
        # The FastAPI routes themselves go in the scope: metrics and the access log name their template.
        if self._routes is None:
            found = {
                (route.path, method): route
                for route in predictions_router.routes
                if isinstance(route, APIRoute)
                for method in route.methods or ()
            }
            self._routes = (found[hot.SUBMIT_PATH, "POST"], found[hot.GET_PATH, "GET"])
        return self._routes[index]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope.get("root_path"):
            path: str = scope["path"]
            method = scope["method"]
            if method == "POST" and path.startswith(_SUBMIT_HEAD) and path.endswith(_SUBMIT_TAIL):
                model_id = path[len(_SUBMIT_HEAD) : -len(_SUBMIT_TAIL)]
                if model_id and "/" not in model_id:
                    scope["route"] = self._route(0)
                    await hot.generate(scope, receive, send, self.fastapi.state.runtime, model_id)
                    return
            elif method == "GET" and path.startswith(_GET_HEAD):
                prediction_id = path[len(_GET_HEAD) :]
                if prediction_id and "/" not in prediction_id:
                    scope["route"] = self._route(1)
                    await hot.get_prediction(scope, receive, send, self.fastapi.state.runtime, prediction_id)
                    return
        await self.app(scope, receive, send)


_SUBMIT_HEAD, _SUBMIT_TAIL = hot.SUBMIT_PATH.split("{modelId}")
_GET_HEAD = hot.GET_PATH.removesuffix("{predictionId}")


def create_app(
    settings: Settings | None = None, runtime: Runtime | None = None, *, listen_url: str | None = None
) -> FastAPI:
    settings = settings or (runtime.settings if runtime else get_settings())
    app = FastAPI(
        title="vidgate",
        version="0.1.0",
        summary="A gateway in front of the VibeDream video-generation API: budgets, signed webhooks.",
        lifespan=lifespan,
        # No OpenTelemetry here (metrics are Prometheus): FastAPI's native telemetry would otherwise look
        # up the global providers on every request.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.settings = settings
    app.state.runtime = runtime
    app.state.listen_url = listen_url
    install_error_handlers(app)
    # One layer: request id, guard, the balance headers, Server-Timing and metrics (app/core/middleware.py).
    app.state.admission = Admission(settings.inflight_limit)
    # Added first, so it runs inside RequestMiddleware (Starlette wraps the last added outermost).
    app.add_middleware(HotRoutes, fastapi=app)
    app.add_middleware(
        RequestMiddleware,
        sandbox=settings.sandbox,
        header_slots=(BALANCE_SLOT,),
        unnoted=budgets_deps.unnoted_headers,
        admission=app.state.admission,
    )
    routers = (predictions_router, usage_router, webhooks_router, selfservice_router, admin_router, outputs_router)
    for router in (*routers, ops_router, dashboard_router):
        app.include_router(router)
    app.include_router(build_providers_router(require_admin))  # /admin/v1/providers
    return app


def app_from_environment(settings: Settings | None = None, listen_url: str | None = None) -> FastAPI:
    """The factory `vidgate serve` hands to uvicorn (`factory=True`): settings are read when the server
    starts, never when this module is imported. `serve` passes its own (with --sandbox applied) and the
    address it listens on."""
    settings = settings or get_settings()
    configure_logging(settings.log_level, settings.log_json)
    return create_app(settings, listen_url=listen_url)


_from_environment: FastAPI | None = None


def __getattr__(name: str) -> FastAPI:
    # `app.main:app` (SPEC §6) for ASGI servers run by hand: built on first access, not at import.
    global _from_environment
    if name != "app":
        raise AttributeError(name)
    if _from_environment is None:
        _from_environment = app_from_environment()
    return _from_environment
