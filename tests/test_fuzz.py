"""Schemathesis against the gateway's own /openapi.json, on the database under test (SPEC §2: no input
answers 5xx). Tenant routes go with a tenant key, operator routes with the admin token; the checks are
`not_a_server_error`, `ignored_auth` and `negative_data_rejection`; every operation is fuzzed with valid
and invalid data, then the stateful phase follows the links schemathesis infers from the schema
and the links the routes declare (tenant create -> key create -> revoke, get, patch, delete; submit -> get).

Seeded and derandomized, with a bounded number of examples, so a failure reproduces and the run stays
within a minute or so per database. Every stateful example starts from an emptied database: which rule
hypothesis may pick next depends on the answers so far, so they must not depend on earlier examples. Each failure it found is a plain regression test in test_edges.py.

The gateway runs behind a real uvicorn on loopback in a thread with its own event loop, database and
upstream simulator: schemathesis' client is synchronous, and the test's own loop must not be blocked.
"""

from __future__ import annotations

import asyncio
import copy
import os
import re
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import hypothesis
import hypothesis.errors
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, Phase
from schemathesis import GenerationMode
from sqlalchemy.ext.asyncio import AsyncEngine

from app.admin.throttle import FailureThrottle
from app.core.database import create_engine, create_sessionmaker
from app.core.migrate import upgrade_to_head
from app.main import create_app
from app.runtime import build_runtime
from app.upstream.simulator import SimConfig, start_simulator
from tests.conftest import (
    ADMIN_TOKEN,
    TEST_DB,
    _drop_postgres,
    _fresh_postgres,
    _worker_id,
    empty_tables,
    make_settings,
)

SEED = 20261129
MAX_EXAMPLES = 30  # per operation and generation mode
VIEWER_EXAMPLES = 10  # the viewer's pass over the operator routes
STATEFUL_EXAMPLES = 80
STATEFUL_STEPS = 10
CHECKS = ("not_a_server_error", "ignored_auth", "negative_data_rejection")

CONFIG = {
    "seed": SEED,
    "generation": {
        "mode": "all",
        "max-examples": MAX_EXAMPLES,
        "deterministic": True,
        "allow-x00": True,  # NUL in every string parameter: what PostgreSQL refused with a 500
        "database": "none",
    },
    "checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}},
}


@dataclass
class Gateway:
    base_url: str
    tenant_key: str = ""
    viewer_token: str = ""  # an operator token with the viewer role (made once; a reset keeps it working)
    # Set by the server thread once its engine exists: `reset` runs on that loop, with that engine.
    loop: asyncio.AbstractEventLoop | None = None
    engine: AsyncEngine | None = None

    def reset(self) -> None:
        """Empty every table, then a fresh tenant: each stateful example starts from the same database.

        Lists such as GET /admin/v1/tenants feed links; if they still held the tenants of earlier examples,
        a replayed example would draw from a different answer (hypothesis' FlakyStrategyDefinition)."""
        assert self.loop is not None and self.engine is not None
        asyncio.run_coroutine_threadsafe(empty_tables(self.engine), self.loop).result(timeout=60)
        self.new_tenant()

    def new_tenant(self) -> None:
        """A tenant and key of its own for the tenant routes (the fuzzer may delete or revoke any other)."""
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        with httpx.Client(base_url=self.base_url, timeout=60) as http:
            tenant = http.post("/admin/v1/tenants", json={"name": "fuzz"}, headers=admin)
            assert tenant.status_code == 201, tenant.text
            # A key with every scope: the self-service routes (SPEC §13) are fuzzed as well as the rest.
            scopes = {"scopes": ["generate", "read", "manage"]}
            key = http.post(f"/admin/v1/tenants/{tenant.json()['id']}/keys", json=scopes, headers=admin)
            assert key.status_code == 201, key.text
            if not self.viewer_token:
                viewer = http.post(
                    "/admin/v1/operator-tokens", json={"name": "fuzz-viewer", "role": "viewer"}, headers=admin
                )
                assert viewer.status_code == 201, viewer.text
                self.viewer_token = viewer.json()["token"]
        self.tenant_key = key.json()["key"]


async def _serve(
    listener: socket.socket, database: str | Path, server_box: list[uvicorn.Server], gateway: Gateway
) -> None:
    sim_runner, sim_url = await start_simulator(config=SimConfig(completion_s=0.3, estimated_time="0-1s"))
    if isinstance(database, Path):
        url = f"sqlite+aiosqlite:///{database}"
    else:
        url = await _fresh_postgres(database)
    engine = create_engine(url, pool_size=10)
    try:
        await upgrade_to_head(engine)
        gateway.loop, gateway.engine = asyncio.get_running_loop(), engine
        runtime = build_runtime(make_settings(url, sim_url), engine, create_sessionmaker(engine))
        app = create_app(runtime.settings, runtime)
        # `ignored_auth` sends wrong tokens on purpose, from one address: not a guesser to slow down.
        app.state.operator_failures = FailureThrottle(burst=1_000_000)
        server = uvicorn.Server(uvicorn.Config(app, http="httptools", lifespan="on", log_level="warning"))
        server_box.append(server)
        try:
            await server.serve(sockets=[listener])
        finally:
            await runtime.close()
    finally:
        await engine.dispose()
        await sim_runner.cleanup()
        if not isinstance(database, Path):
            await _drop_postgres(database)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()  # connections queue until uvicorn accepts them: no wait for start-up
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID", str(os.getpid()))[:12]
    database: str | Path = (
        f"vidgate_fuzz_{run}_{_worker_id()}"
        if TEST_DB == "postgresql"
        else tmp_path_factory.mktemp("fuzz") / "vidgate.db"
    )
    servers: list[uvicorn.Server] = []
    failure: list[BaseException] = []
    gateway = Gateway(f"http://127.0.0.1:{listener.getsockname()[1]}")

    def main() -> None:
        try:
            asyncio.run(_serve(listener, database, servers, gateway))
        except BaseException as exc:  # reported by the fixture, not lost in the thread
            failure.append(exc)

    thread = threading.Thread(target=main, name="fuzz-gateway", daemon=True)
    thread.start()
    try:
        gateway.new_tenant()
        yield gateway
    finally:
        if servers:
            servers[0].should_exit = True
        thread.join(60)
        listener.close()
    assert not failure, failure


def load_schema(gateway: Gateway, mode: str, *, operator: str = "admin") -> Any:
    config = {**CONFIG, "generation": {**CONFIG["generation"], "mode": mode}}
    schema = schemathesis.openapi.from_url(
        gateway.base_url + "/openapi.json", config=schemathesis.Config.from_dict(config)
    )

    # One provider for both kinds of caller: refresh_interval=None, so no token is cached across them.
    @schema.auth(refresh_interval=None)
    class _Bearer:
        def get(self, case: Any, _ctx: Any) -> str:
            if case.path.startswith("/admin/"):
                return gateway.viewer_token if operator == "viewer" else ADMIN_TOKEN
            return gateway.tenant_key

        def set(self, case: Any, data: str, _ctx: Any) -> None:
            case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}

    return schema


@pytest.fixture(scope="module")
def api_schema(gateway: Gateway) -> Any:
    return load_schema(gateway, "all")


SETTINGS = hypothesis.settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    phases=[Phase.explicit, Phase.generate, Phase.shrink],
)


def test_every_operation(api_schema: Any) -> None:
    # One test over all operations rather than schemathesis' pytest parametrization, whose lazy fixture
    # mode does not run on pytest 9; every operation runs, and all failures are reported together.
    failures: list[str] = []
    for result in api_schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            strategy = operation.as_strategy(mode, auth_storage=api_schema.auth)

            @hypothesis.settings(SETTINGS, max_examples=MAX_EXAMPLES)
            @hypothesis.given(case=strategy)
            def fuzz(case: Any) -> None:
                case.call_and_validate()

            try:
                fuzz()
            except hypothesis.errors.Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE  # an operation without parameters has no invalid input
            except (Exception, schemathesis.errors.FailureGroup) as exc:  # FailureGroup: a BaseExceptionGroup
                failures.append(f"{operation.label} ({mode.value}): {exc}")
    assert not failures, "\n\n".join(failures)


def test_operator_routes_as_a_viewer(gateway: Gateway) -> None:
    """A viewer's token on every operator route (SPEC §13): reads answer, writes are refused, nothing is 5xx."""
    schema = load_schema(gateway, "all", operator="viewer")
    failures: list[str] = []
    statuses: Counter[tuple[str, int]] = Counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        if not operation.path.startswith("/admin/"):
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            strategy = operation.as_strategy(mode, auth_storage=schema.auth)

            @hypothesis.settings(SETTINGS, max_examples=VIEWER_EXAMPLES)
            @hypothesis.given(case=strategy)
            def fuzz(case: Any) -> None:
                response = case.call_and_validate()
                statuses[(case.method, response.status_code)] += 1
                # Never a success: 403 once the token is read; a body that is not JSON at all is refused (400,
                # 422) while it is read, before any dependency runs.
                if case.method not in ("GET", "HEAD") and response.status_code < 400:
                    raise AssertionError(f"a viewer's {case.method} {case.path} answered {response.status_code}")

            try:
                fuzz()
            except hypothesis.errors.Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE
            except (Exception, schemathesis.errors.FailureGroup) as exc:
                failures.append(f"{operation.label} ({mode.value}): {exc}")
    assert not failures, "\n\n".join(failures)
    assert statuses[("GET", 200)] and statuses[("POST", 403)] and statuses[("DELETE", 403)], statuses


def test_stateful_links(gateway: Gateway) -> None:
    # Valid data only here: the point is to reach deep along the links (invalid data gets the
    # stateless pass above), so that every step answers from real resources.
    # The provider switches, operator tokens, the audit log and a key's self-service stay out of the walk:
    # each operation added to the pool thins the draws that reach the tenant trunk below, and they lead
    # nowhere deeper (their links are walked in
    # test_declared_links; every operation is fuzzed in test_every_operation).
    api_schema = load_schema(gateway, "positive").exclude(
        path_regex="^/admin/v1/(providers|operator-tokens|audit)|^/api/v1/(keys|webhook-endpoint)"
    )
    answered: Counter[tuple[str, str, int]] = Counter()

    class Machine(api_schema.as_state_machine()):  # type: ignore[misc]
        def setup(self) -> None:
            gateway.reset()

        def before_call(self, case: Any) -> None:
            # The Python state machine does not apply the schema's auth provider by itself.
            api_schema.auth.set(case, schemathesis.AuthContext(operation=case.operation, app=None))
            super().before_call(case)

        def after_call(self, response: Any, case: Any) -> None:
            super().after_call(response, case)  # the recorder: stateful checks look up earlier answers
            answered[(case.method, case.path, response.status_code)] += 1

    Machine.run(
        settings=hypothesis.settings(SETTINGS, max_examples=STATEFUL_EXAMPLES, stateful_step_count=STATEFUL_STEPS)
    )
    # The random walk reached deep along the links with real ids (deterministic: every example starts
    # from an empty database). Which leaves it reaches depends on the set of operations it draws from,
    # so only the trunk is required here; test_declared_links walks each declared link on its own.
    for method, path, status in [
        ("POST", "/admin/v1/tenants", 201),
        ("POST", "/admin/v1/tenants/{tenantId}/keys", 201),
        ("GET", "/admin/v1/tenants/{tenantId}", 200),
        ("GET", "/admin/v1/tenants/{tenantId}/keys", 200),
    ]:
        if not answered[(method, path, status)]:
            pytest.fail(f"never {method} {path} -> {status}; answers: {sorted(answered.items())}", pytrace=False)


def _resolve(expression: str, request_path: dict[str, str], body: Any) -> str:
    """A link's runtime expression (the two forms the routes declare) against one request and answer."""
    if expression.startswith("$request.path."):
        return request_path[expression.removeprefix("$request.path.")]
    assert expression.startswith("$response.body#/"), expression
    value = body
    for part in expression.removeprefix("$response.body#/").split("/"):
        value = value[int(part)] if isinstance(value, list) else value[part]
    return str(value)


def test_declared_links(gateway: Gateway) -> None:
    # Every link the admin routes declare, followed once from a real answer: the coverage the random
    # state machine only reaches by chance, here by construction (tenant -> key -> revoke, get, list ...).
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with httpx.Client(base_url=gateway.base_url, headers=admin, timeout=60) as http:
        paths = http.get("/openapi.json").json()["paths"]
        reached: set[tuple[str, str, int]] = set()

        def follow(path: str, method: str, params: dict[str, str], body: Any) -> None:
            response = http.request(method.upper(), path.format(**params), json=body)
            assert response.is_success, (method, path, response.status_code, response.text)
            reached.add((method.upper(), path, response.status_code))
            answer = response.json() if response.content else None
            declared = paths[path][method.lower()]["responses"].get(str(response.status_code), {}).get("links", {})
            # Destructive links last, so every other link still finds its resource.
            for link in sorted(declared.values(), key=lambda link: link["operationRef"].endswith("/delete")):
                target_path, target_method = link["operationRef"].removeprefix("#/paths/").rsplit("/", 1)
                target_path = target_path.replace("~1", "/").replace("~0", "~")
                target_params = {name: _resolve(expr, params, answer) for name, expr in link["parameters"].items()}
                follow(target_path, target_method, target_params, {} if target_method in ("post", "patch") else None)

        follow("/admin/v1/tenants", "post", {}, {"name": "links"})
        follow("/admin/v1/providers", "get", {}, None)
        follow("/admin/v1/providers/{name}/disable", "post", {"name": "vibedream"}, None)  # then its enable
    for method, path, status in [
        ("POST", "/admin/v1/tenants/{tenantId}/keys", 201),
        ("DELETE", "/admin/v1/tenants/{tenantId}/keys/{keyId}", 200),
        ("GET", "/admin/v1/tenants/{tenantId}", 200),
        ("GET", "/admin/v1/tenants/{tenantId}/keys", 200),
        ("DELETE", "/admin/v1/tenants/{tenantId}", 204),
        ("GET", "/admin/v1/providers/{name}", 200),
        ("POST", "/admin/v1/providers/{name}/enable", 200),
    ]:
        assert (method, path, status) in reached, sorted(reached)


# ---------------------------------------------------------------- the dashboard (issue 24 B4)


def dashboard_spec() -> dict[str, Any]:
    """The dashboard's routes as an OpenAPI document (they are left out of /openapi.json: pages, not API),
    each POST with the url-encoded form it reads (a CSRF token and the fields of the page's forms)."""
    from fastapi.openapi.utils import get_openapi

    from app.dashboard.router import router as dashboard_router

    routes = []
    for route in dashboard_router.routes:
        shown = copy.copy(route)
        shown.include_in_schema = True  # type: ignore[attr-defined]
        routes.append(shown)
    spec = get_openapi(title="vidgate dashboard", version="0", routes=routes)
    form = {
        "type": "object",
        "properties": {
            name: {"type": "string"}
            for name in (
                *("csrf", "name", "budgetCents", "budgetPeriod", "maxConcurrent", "ratePerMinute", "webhookUrl"),
                *("tenant", "status"),
            )
        },
        "required": ["csrf"],
    }
    for path, methods in spec["paths"].items():
        if "post" in methods and path != "/dashboard/login":
            methods["post"]["requestBody"] = {
                "required": True,
                "content": {"application/x-www-form-urlencoded": {"schema": form}},
            }
    return spec


def dashboard_session(gateway: Gateway) -> tuple[str, str]:
    """A logged-in session cookie and its CSRF token, through the login form."""
    pattern = re.compile(r'name="csrf" value="([^"]+)"')
    with httpx.Client(base_url=gateway.base_url, timeout=60) as http:
        page = http.get("/dashboard/login")
        match = pattern.search(page.text)
        assert match, page.text[:500]
        done = http.post("/dashboard/login", data={"csrf": match.group(1), "token": ADMIN_TOKEN})
        assert done.status_code == 303, done.text
        cookie = http.cookies["vidgate_session"]
        overview = http.get("/dashboard")
        found = pattern.search(overview.text)
        assert found, overview.text[:500]
        return cookie, found.group(1)


def test_every_dashboard_route(gateway: Gateway) -> None:
    cookie, csrf = dashboard_session(gateway)
    schema = schemathesis.openapi.from_dict(
        dashboard_spec(), config=schemathesis.Config.from_dict({**CONFIG, "checks": {"enabled": False}})
    )
    schema.config.base_url = gateway.base_url
    failures: list[str] = []
    seen: Counter[int] = Counter()
    with httpx.Client(base_url=gateway.base_url, timeout=60, follow_redirects=False) as http:
        for result in schema.get_all_operations():
            operation = result.ok()
            if operation.path == "/dashboard/logout":
                continue  # it would end the session every other operation runs in (test_dashboard.py tests it)
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

                @hypothesis.settings(SETTINGS, max_examples=MAX_EXAMPLES)
                @hypothesis.given(case=operation.as_strategy(mode))
                def fuzz(case: Any) -> None:
                    if isinstance(case.body, dict) and case.method == "POST":
                        case.body = {**case.body, "csrf": csrf}  # the session's own token: the form is read
                    kwargs = case.as_transport_kwargs(base_url=gateway.base_url)
                    kwargs.pop("cookies", None)
                    kwargs["headers"] = {**(kwargs.get("headers") or {}), "Cookie": f"vidgate_session={cookie}"}
                    response = http.request(**kwargs)
                    seen[response.status_code] += 1
                    assert response.status_code < 500, (case.method, case.formatted_path, response.text[:500])

                try:
                    fuzz()
                except hypothesis.errors.Unsatisfiable:
                    assert mode is GenerationMode.NEGATIVE
                except (Exception, schemathesis.errors.FailureGroup) as exc:
                    failures.append(f"{operation.label} ({mode.value}): {exc}")
    assert not failures, "\n\n".join(failures)
    assert seen[200] and seen[422], seen  # it reached the pages, logged in, and past their validation
