"""The `vidgate` command. Operator commands talk to the database directly, so they work without a
running server, from any working directory, with the same VIDGATE_* settings."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Annotated, Any, Literal

import typer

from app.cli_common import JsonOpt, as_operator
from app.cli_common import emit as _emit
from app.cli_operators import register_operator_commands
from app.core.settings import Settings, get_settings
from app.webhooks.models import DeliveryStatus

cli = typer.Typer(help="vidgate: a gateway in front of the VibeDream video API.", no_args_is_help=True)
tenants_cli = typer.Typer(help="Create and inspect tenants.", no_args_is_help=True)
keys_cli = typer.Typer(help="Create and revoke tenant API keys.", no_args_is_help=True)
ledger_cli = typer.Typer(help="Check the money.", no_args_is_help=True)
deliveries_cli = typer.Typer(help="Inspect and redeliver webhooks.", no_args_is_help=True)
providers_cli = typer.Typer(help="See the providers and switch them off and on.", no_args_is_help=True)
cli.add_typer(tenants_cli, name="tenants")
cli.add_typer(keys_cli, name="keys")
cli.add_typer(ledger_cli, name="ledger")
cli.add_typer(deliveries_cli, name="deliveries")
cli.add_typer(providers_cli, name="providers")


# ---------------------------------------------------------------- running


@cli.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    workers: Annotated[int, typer.Option(help="Server processes (PostgreSQL only).")] = 1,
    sandbox: Annotated[
        bool,
        typer.Option(
            "--sandbox",
            help="Answer from a built-in simulator of the vendor API, with a demo tenant: no vendor account "
            "needed, nothing billed (also VIDGATE_SANDBOX=true).",
        ),
    ] = False,
) -> None:
    """Run the API (and, unless VIDGATE_RUN_WORKER=false, the poller and webhook dispatcher)."""
    settings = get_settings()
    if sandbox:
        settings = settings.model_copy(update={"sandbox": True})
    _refuse_to_start(settings, "serve")
    if workers > 1 and settings.is_sqlite:
        typer.echo("error: several server processes need PostgreSQL (VIDGATE_DATABASE_URL).", err=True)
        raise typer.Exit(2)
    if workers > 1 and settings.sandbox:
        typer.echo("error: sandbox mode runs one server process (the simulator lives in it); drop --workers.", err=True)
        raise typer.Exit(2)
    # The worker runs in a child process of its own (bench/experiments/worker-process): as tasks in the
    # serving process, each poll burst held the event loop and the CPU that requests wait for. The
    # sandbox keeps it in-process: its simulator lives in the serving process, on a port chosen at start.
    child_worker = settings.run_worker and settings.worker_process and not settings.sandbox
    with _die_by_signal_after_cleanup(), contextlib.ExitStack() as stack:
        if workers > 1 or child_worker:
            # Set before prometheus_client is imported here and before any process starts (they inherit
            # it): each process writes its metrics there and the one answering a scrape reads all of them
            # (app/core/metrics.py). Fresh: a previous run's files would add its counts to ours.
            directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="vidgate-metrics-"))
            os.environ[PROMETHEUS_MULTIPROC_DIR] = directory
        from app.core import lifecycle
        from app.core.logging import configure_logging
        from app.main import app_from_environment

        configure_logging(settings.log_level, settings.log_json)
        if child_worker:
            child = stack.enter_context(WorkerChild(dict(os.environ), settings.worker_nice))
            lifecycle.at_drain(child.begin_stop)  # its leases go back while requests are still served
            # The serving processes run no worker of their own (several re-read the environment).
            os.environ["VIDGATE_RUN_WORKER"] = "false"
            settings = settings.model_copy(update={"run_worker": False})
        # One process gets these settings as they are (with --sandbox); several re-read the environment.
        app: Any = "app.main:app_from_environment"
        if workers == 1:
            app = functools.partial(app_from_environment, settings, _listen_url(host, port))
        from app.core import server

        server.run(
            app,
            host=host,
            port=port,
            workers=workers,
            drain_s=settings.shutdown_drain_s,
            grace_s=settings.shutdown_grace_s,
        )


class _Stopped(BaseException):
    def __init__(self, number: int) -> None:
        super().__init__(number)
        self.number = number


@contextlib.contextmanager
def _die_by_signal_after_cleanup() -> Iterator[None]:
    """A uvicorn server stopped by SIGTERM or SIGINT raises that signal again on its way out, to die by
    it. Here that second delivery (or one that comes before the server runs) unwinds `serve` instead,
    so its worker child is stopped and its metrics directory removed; then the process dies by it."""

    def stopped(number: int, _frame: object) -> None:
        raise _Stopped(number)

    previous = {sig: signal.signal(sig, stopped) for sig in SERVE_SIGNALS}
    try:
        yield
    except _Stopped as caught:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        signal.raise_signal(caught.number)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# prometheus_client's own variable; app/core/metrics.py reads it too (not imported here: importing
# prometheus_client fixes the process's metrics mode, so the variable must be set first).
PROMETHEUS_MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"
SERVE_SIGNALS = (signal.SIGTERM, signal.SIGINT)
WORKER_RESTART_S = (1.0, 2.0, 5.0, 10.0, 30.0)  # a child that keeps dying is restarted ever more slowly
WORKER_HEALTHY_S = 60.0  # a child that ran this long starts the backoff from the beginning again
WORKER_STOP_S = 20.0  # its own drain takes at most app.worker.SHUTDOWN_GRACE_S (10 s)


class WorkerChild:
    """`vidgate worker` as a child of `serve`, at a lower CPU priority, so the kernel hands the cores to
    request handling first and the poller's bursts never hold a request's event loop.

    It lives as long as `serve`: stopped (SIGTERM, then SIGKILL) when serve's server returns, and
    restarted, with a growing delay, if it dies on its own (its work is leased rows, so a restart loses
    nothing). If `serve` itself is killed, the child sees the end of a pipe only `serve` holds open and
    stops, so no orphan keeps polling."""

    def __init__(self, env: dict[str, str], nice: int) -> None:
        import logging

        self.env = env
        self.nice = nice
        self.log = logging.getLogger("vidgate.serve")
        self.stopping = threading.Event()
        self.lock = threading.Lock()  # a restart and the stop never cross: no child starts after the stop
        self.process: subprocess.Popen[bytes] | None = None
        # Both ends stay open in serve (the write end is not inherited by any child): every child, first
        # or restarted, gets the read end and sees EOF only when serve is gone.
        self.parent_r, self.parent_w = os.pipe()
        self.watcher = threading.Thread(target=self._watch, name="vidgate-worker-child", daemon=True)

    def __enter__(self) -> WorkerChild:
        self.process = self._spawn()
        self.watcher.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def _spawn(self) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "app.cli", "worker", "--parent-fd", str(self.parent_r), "--nice", str(self.nice)]
        process = subprocess.Popen(argv, env=self.env, pass_fds=(self.parent_r,), stdin=subprocess.DEVNULL)  # noqa: S603
        self.log.info("worker process started", extra={"pid": process.pid, "nice": self.nice})
        return process

    def _watch(self) -> None:
        import time

        failures = 0
        while not self.stopping.is_set():
            assert self.process is not None
            began = time.monotonic()
            code = self.process.wait()
            if self.stopping.is_set():
                return
            if time.monotonic() - began >= WORKER_HEALTHY_S:
                failures = 0
            delay = WORKER_RESTART_S[min(failures, len(WORKER_RESTART_S) - 1)]
            failures += 1
            self.log.error(
                "worker process exited; restarting it",
                extra={"pid": self.process.pid, "returncode": code, "restart_in_s": delay, "failures": failures},
            )
            if self.stopping.wait(delay):
                return
            with self.lock:
                if self.stopping.is_set():
                    return
                self.process = self._spawn()

    def begin_stop(self) -> None:
        """Ask the child to stop now (SIGTERM: it drains and hands its leases back); stop() waits for it."""
        self.stopping.set()
        process = self.process
        if process is not None and process.poll() is None:
            process.terminate()

    def stop(self) -> None:
        with self.lock:
            self.stopping.set()
            process = self.process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(WORKER_STOP_S)
            except subprocess.TimeoutExpired:
                self.log.error("worker process did not stop; killing it", extra={"pid": process.pid})
                process.kill()
                process.wait()
        self.watcher.join(5)
        os.close(self.parent_r)
        os.close(self.parent_w)


def _refuse_to_start(settings: Settings, role: Literal["serve", "worker"]) -> None:
    from app.providers import config as providers_config

    refusal = settings.startup_refusal(role) or providers_config.startup_refusal(settings)
    if refusal is not None:
        typer.echo(f"error: {refusal}", err=True)
        raise typer.Exit(2)


def _listen_url(host: str, port: int) -> str:
    """Where a local client reaches `serve` (a wildcard address is reachable on loopback)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)  # noqa: S104
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@cli.command()
def worker(
    parent_fd: Annotated[
        int | None, typer.Option(hidden=True, help="Stop when this pipe closes (serve's child).")
    ] = None,
    nice: Annotated[int, typer.Option(hidden=True, help="Lower this process's CPU priority by this much.")] = 0,
) -> None:
    """Run only the poller and the webhook dispatcher (no HTTP API)."""
    from app.core.database import create_engine, create_sessionmaker
    from app.core.logging import configure_logging
    from app.runtime import build_runtime
    from app.worker import Worker

    settings = get_settings()
    _refuse_to_start(settings, "worker")
    if settings.sandbox and "upstream_base_url" not in settings.model_fields_set:
        typer.echo(
            "error: in sandbox mode `vidgate serve` runs the worker itself; a separate worker needs "
            "VIDGATE_UPSTREAM_BASE_URL (a simulator's address).",
            err=True,
        )
        raise typer.Exit(2)
    configure_logging(settings.log_level, settings.log_json)
    if nice:
        os.nice(nice)

    async def run() -> None:
        engine = create_engine(
            settings.database_url, pool_size=settings.database_pool_size, pooled=settings.database_pooled
        )
        runtime = build_runtime(settings, engine, create_sessionmaker(engine))
        process = Worker(runtime)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, process.stop)
        if parent_fd is not None:
            _stop_when_closed(loop, parent_fd, process.stop)
        try:
            await process.run()
        finally:
            await runtime.close()
            await engine.dispose()

    run_loop(run())


def _stop_when_closed(loop: asyncio.AbstractEventLoop, fd: int, stop: Callable[[], None]) -> None:
    """`serve` holds the only write end of this pipe: it reads as closed the moment serve is gone, even
    killed with SIGKILL, and the worker then drains and stops instead of polling on as an orphan."""
    import logging

    def closed() -> None:
        if os.read(fd, 1):
            return  # nothing is ever written; only the end of the pipe counts
        loop.remove_reader(fd)
        logging.getLogger("vidgate.worker").warning("serve went away; stopping")
        stop()

    os.set_blocking(fd, False)
    loop.add_reader(fd, closed)


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """uvloop where available (as uvicorn picks for the API), asyncio otherwise."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)


@cli.command()
def migrate() -> None:
    """Apply the Alembic migrations to VIDGATE_DATABASE_URL."""
    from app.core.database import create_engine
    from app.core.migrate import upgrade_to_head

    async def run() -> None:
        # DDL and Alembic's version bookkeeping want a session of their own: past a pooler, the direct URL.
        engine = create_engine(get_settings().database_session_url, pool_size=1)
        try:
            await upgrade_to_head(engine)
        finally:
            await engine.dispose()

    asyncio.run(run())
    typer.echo("database is at the latest migration")


@cli.command()
def simulator(
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 9100,
    completion_s: Annotated[float, typer.Option(help="Seconds until a prediction is done.")] = 6.0,
    failure_ratio: Annotated[float, typer.Option(help="Share of predictions that fail.")] = 0.0,
    estimated_time: Annotated[str, typer.Option(help="estimatedTime the simulator announces.")] = "5-20s",
) -> None:
    """Run the VibeDream API simulator on its own (for tests, benchmarks and demos)."""
    from app.upstream.simulator import SimConfig, run_simulator

    run_simulator(host, port, SimConfig(completion_s, failure_ratio, estimated_time))


# ---------------------------------------------------------------- tenants and keys


def _tenant_dict(tenant: Any) -> dict[str, Any]:
    from app.tenants.schemas import TenantOut

    return TenantOut.model_validate(tenant).model_dump(by_alias=True)


def _tenant_text(t: dict[str, Any]) -> str:
    budget = "unlimited" if t["budgetCents"] is None else f"{t['budgetCents']} cents a {t['budgetPeriod']}"
    return (
        f"{t['id']}  {t['name']}\n  budget: {budget}\n  max concurrent: {t['maxConcurrent'] or '-'}"
        f"  rate/min: {t['ratePerMinute'] or '-'}\n  queue: weight {t['queueWeight']}, at most {t['maxQueued']} waiting"
        f"\n  webhook: {t['webhookUrl'] or '-'}"
    )


@tenants_cli.command("create")
def tenants_create(
    name: Annotated[str, typer.Argument()],
    budget_cents: Annotated[int | None, typer.Option(help="Budget in cents (none = unlimited).")] = None,
    budget_period: Annotated[str, typer.Option(help="day, week, month or total.")] = "month",
    max_concurrent: Annotated[int | None, typer.Option()] = None,
    rate_per_minute: Annotated[int | None, typer.Option()] = None,
    webhook_url: Annotated[str | None, typer.Option()] = None,
    output_retention_days: Annotated[
        int | None, typer.Option(help="Days stored outputs are kept (default VIDGATE_OUTPUT_RETENTION_DAYS).")
    ] = None,
    queue_weight: Annotated[int, typer.Option(help="Share of the fair queue's dispatches (weighted round robin).")] = 1,
    max_queued: Annotated[int, typer.Option(help="Predictions that may wait in the fair queue at once.")] = 1000,
    as_json: JsonOpt = False,
) -> None:
    """Create a tenant; prints its webhook secret once."""
    from pydantic import ValidationError

    from app.admin import service as admin_service
    from app.tenants.schemas import TenantCreate

    try:
        data = TenantCreate(
            name=name,
            budget_cents=budget_cents,
            budget_period=budget_period,
            max_concurrent=max_concurrent,
            rate_per_minute=rate_per_minute,
            webhook_url=webhook_url,
            output_retention_days=output_retention_days,
            queue_weight=queue_weight,
            max_queued=max_queued,
        )
    except ValidationError as exc:
        typer.echo(f"error: {exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']}", err=True)
        raise typer.Exit(2) from None

    async def work(session: Any, op: Any) -> dict[str, Any]:
        tenant = await admin_service.create_tenant(session, get_settings(), data, op.actor)
        return {**_tenant_dict(tenant), "webhookSecret": tenant.webhook_secret}

    created = as_operator(work, writes=True)
    _emit(created, as_json, lambda t: _tenant_text(t) + f"\n  webhook secret (shown once): {t['webhookSecret']}")


@tenants_cli.command("update")
def tenants_update(
    tenant_id: str,
    name: Annotated[str | None, typer.Option()] = None,
    budget_cents: Annotated[int | None, typer.Option(help="New budget in cents.")] = None,
    unlimited: Annotated[bool, typer.Option("--unlimited", help="Remove the budget.")] = False,
    budget_period: Annotated[str | None, typer.Option(help="day, week, month or total.")] = None,
    max_concurrent: Annotated[int | None, typer.Option()] = None,
    rate_per_minute: Annotated[int | None, typer.Option()] = None,
    webhook_url: Annotated[str | None, typer.Option()] = None,
    output_retention_days: Annotated[int | None, typer.Option(help="Days stored outputs are kept.")] = None,
    queue_weight: Annotated[int | None, typer.Option(help="Share of the fair queue's dispatches.")] = None,
    max_queued: Annotated[int | None, typer.Option(help="Predictions that may wait in the fair queue.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Change a tenant's name, budget, limits or webhook URL (only the options given)."""
    from pydantic import ValidationError

    from app.admin import service as admin_service
    from app.tenants.schemas import TenantUpdate

    given: dict[str, Any] = {
        k: v
        for k, v in dict(
            name=name,
            budget_cents=budget_cents,
            budget_period=budget_period,
            max_concurrent=max_concurrent,
            rate_per_minute=rate_per_minute,
            webhook_url=webhook_url,
            output_retention_days=output_retention_days,
            queue_weight=queue_weight,
            max_queued=max_queued,
        ).items()
        if v is not None
    }
    if unlimited:
        given["budget_cents"] = None
    try:
        data = TenantUpdate(**given)
    except ValidationError as exc:
        typer.echo(f"error: {exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']}", err=True)
        raise typer.Exit(2) from None

    async def work(session: Any, op: Any) -> dict[str, Any]:
        return _tenant_dict(await admin_service.update_tenant(session, tenant_id, data, get_settings(), op.actor))

    _emit(as_operator(work, writes=True), as_json, _tenant_text)


@tenants_cli.command("list")
def tenants_list(as_json: JsonOpt = False) -> None:
    from app.tenants import service

    async def work(session: Any, _op: Any) -> list[dict[str, Any]]:
        return [_tenant_dict(t) for t in await service.list_tenants(session)]

    _emit(
        as_operator(work, writes=False), as_json, lambda rows: "\n".join(_tenant_text(t) for t in rows) or "no tenants"
    )


@tenants_cli.command("show")
def tenants_show(tenant_id: str, as_json: JsonOpt = False) -> None:
    from app.budgets import service as budgets_service
    from app.tenants import service

    async def work(session: Any, _op: Any) -> dict[str, Any]:
        tenant = await service.get_tenant(session, tenant_id)
        usage = await budgets_service.tenant_usage(session, tenant)
        return {
            **_tenant_dict(tenant),
            "usage": usage.present(),
        }

    _emit(
        as_operator(work, writes=False),
        as_json,
        lambda t: (
            _tenant_text(t) + f"\n  this period: {t['usage']['spentCents']} spent, {t['usage']['reservedCents']} held"
        ),
    )


# ---------------------------------------------------------------- money and webhooks


@cli.command()
def usage(
    from_: Annotated[str | None, typer.Option("--from", help="Start date, e.g. 2026-11-01.")] = None,
    to: Annotated[str | None, typer.Option(help="End date, inclusive.")] = None,
    group_by: Annotated[str, typer.Option(help="tenant, model, provider or day.")] = "tenant",
    as_json: JsonOpt = False,
) -> None:
    """Spending from the ledger."""
    from app.admin import service as admin_service
    from app.core.types import moment_bound

    if group_by not in ("tenant", "model", "provider", "day"):
        typer.echo("error: --group-by must be tenant, model, provider or day", err=True)
        raise typer.Exit(2)

    async def work(session: Any, _op: Any) -> list[dict[str, Any]]:
        start = moment_bound(from_, "from", end=False)
        end = moment_bound(to, "to", end=True)
        return await admin_service.usage_rows(session, start, end, group_by)

    _emit(
        as_operator(work, writes=False),
        as_json,
        lambda rows: (
            "\n".join(f"{r[group_by]:<40} {r['spentCents']:>10} cents {r['predictions']:>8} predictions" for r in rows)
            or "no spending"
        ),
    )


@ledger_cli.command("verify")
def ledger_verify(as_json: JsonOpt = False) -> None:
    """Recompute every balance from the ledger; exits 1 on any mismatch."""
    from app.budgets import service as budgets_service

    mismatches = as_operator(lambda session, _op: budgets_service.verify_ledger(session), writes=False)
    _emit(
        {"ok": not mismatches, "mismatches": [m.__dict__ for m in mismatches]},
        as_json,
        lambda r: "ledger and balances agree" if r["ok"] else "\n".join(f"MISMATCH {m}" for m in r["mismatches"]),
    )
    if mismatches:
        raise typer.Exit(1)


@deliveries_cli.command("list")
def deliveries_list(
    status: Annotated[DeliveryStatus | None, typer.Option()] = None,
    tenant: Annotated[str | None, typer.Option()] = None,
    limit: Annotated[int, typer.Option()] = 50,
    as_json: JsonOpt = False,
) -> None:
    from app.webhooks import service as webhooks_service

    async def work(session: Any, _op: Any) -> list[dict[str, Any]]:
        rows, _ = await webhooks_service.list_deliveries(
            session, tenant_id=tenant, status=status, limit=limit, cursor=None
        )
        return [webhooks_service.present(d) for d in rows]

    _emit(
        as_operator(work, writes=False),
        as_json,
        lambda rows: (
            "\n".join(
                f"{d['id']}  {d['status']:<9} {d['eventType']:<22} attempts={d['attempts']} {d['url']}" for d in rows
            )
            or "no deliveries"
        ),
    )


# Keys, tenant deletion, secret rotation, redelivery, operator tokens and the audit log: app/cli_operators.py.
register_operator_commands(cli, tenants_cli, keys_cli, deliveries_cli)


# ---------------------------------------------------------------- providers


def _registry() -> Any:
    from app.providers.config import ProvidersFileError, load_registry

    try:
        return load_registry(get_settings())
    except ProvidersFileError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def _provider_text(p: dict[str, Any]) -> str:
    state, today = p["state"], p["today"]
    flags = ["enabled" if state["enabled"] else f"DISABLED since {state['disabledAt']}"]
    if state["coolingDownUntil"]:
        flags.append(f"cooling down until {state['coolingDownUntil']} ({state['coolingDownReason'] or '-'})")
    if state["circuit"] != "closed":
        flags.append(
            f"circuit {state['circuit']}" + (f" until {state['circuitUntil']}" if state["circuit"] == "open" else "")
        )
    cap = p["maxConcurrent"] if p["maxConcurrent"] is not None else "no cap"
    latency = "-" if today["meanSubmitMs"] is None else f"{today['meanSubmitMs']:.0f} ms"
    return (
        f"{p['name']}  ({p['kind']}, priority {p['priority']}, weight {p['weight']:g})  {'; '.join(flags)}\n"
        f"  {p['baseUrl']}  model {p['model']}  serves {', '.join(p['serves'])}\n"
        f"  in flight {state['inFlight']} / {cap}  rate/min {p['ratePerMinute'] or '-'}\n"
        f"  today: {today['submits']} submits, {today['throttled']} 429s, {today['errors']} errors, "
        f"mean submit {latency}, {today['spentCents']} cents spent"
    )


@providers_cli.command("list")
def providers_list(as_json: JsonOpt = False) -> None:
    """Every configured provider: settings (never a key), live state and today's figures."""
    from app.providers import admin as providers_admin

    registry = _registry()

    async def work(session: Any, _op: Any) -> dict[str, Any]:
        return await providers_admin.list_providers(session, registry)

    _emit(
        as_operator(work, writes=False),
        as_json,
        lambda r: f"routing: {r['routing']}\n" + "\n".join(_provider_text(p) for p in r["data"]),
    )


@providers_cli.command("show")
def providers_show(name: str, as_json: JsonOpt = False) -> None:
    """One provider: settings, live state and today's figures."""
    from app.providers import admin as providers_admin

    registry = _registry()

    async def work(session: Any, _op: Any) -> dict[str, Any]:
        return await providers_admin.get_provider(session, registry, name)

    _emit(as_operator(work, writes=False), as_json, _provider_text)


def _switch(name: str, enabled: bool, as_json: bool) -> None:
    from app.providers import admin as providers_admin

    registry = _registry()

    async def work(session: Any, op: Any) -> dict[str, Any]:
        return await providers_admin.set_enabled(session, registry, name, enabled=enabled, actor=op.actor)

    done = as_operator(work, writes=True)
    _emit(done, as_json, lambda p: f"{p['name']} {'enabled' if enabled else 'disabled'}")


@providers_cli.command("disable")
def providers_disable(name: str, as_json: JsonOpt = False) -> None:
    """Route no new submit to this provider (every replica, within seconds); what is in flight goes on."""
    _switch(name, False, as_json)


@providers_cli.command("enable")
def providers_enable(name: str, as_json: JsonOpt = False) -> None:
    """Route new submits to this provider again."""
    _switch(name, True, as_json)


def main() -> None:
    from pydantic import ValidationError

    try:
        Settings()
    except ValidationError as exc:
        # One line per bad setting, named as it is set: VIDGATE_<FIELD>.
        for error in exc.errors():
            name = "".join(f"VIDGATE_{str(part).upper()}" for part in error["loc"][:1])
            message = str(error["msg"]).removeprefix("Value error, ")
            typer.echo(f"error: invalid settings: {name + ': ' if name else ''}{message}", err=True)
        sys.exit(2)
    cli()


if __name__ == "__main__":
    main()
