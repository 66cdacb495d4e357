"""The key check from memory (app/tenants/cache.py): a revoke, delete or tenant change is seen at once,
by this process through its commit and by every PostgreSQL process through NOTIFY; the TTL is only
the backstop. The TTL is set far beyond any test here, so only the invalidation can make them pass."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest
from sqlalchemy import update
from sqlalchemy.engine import make_url

from app.core.database import transaction
from app.runtime import Runtime
from app.tenants import cache as key_cache
from app.tenants import service as tenants_service
from app.tenants.models import ApiKey
from tests.conftest import TEST_DB, Api
from tests.procs import Procs, fresh_database, gateway_env, until

# Fixtures: pytest finds them in this module's namespace (`x as x` marks them as used on purpose).
from tests.procs import module_procs_fixture as module_procs_fixture
from tests.procs import proc_cwd_fixture as proc_cwd_fixture
from tests.procs import procs_fixture as procs_fixture
from tests.procs import sim_fixture as sim_fixture
from tests.procs import simulator_proc_fixture as simulator_proc_fixture

LONG_TTL_S = 3600.0
pg_only = pytest.mark.skipif(TEST_DB != "postgresql", reason="LISTEN/NOTIFY is PostgreSQL's")


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"key_cache_ttl_s": LONG_TTL_S, "balance_ttl_s": LONG_TTL_S}


async def test_revoke_and_delete_are_refused_at_once_though_the_key_is_cached(api: Api) -> None:
    tenant = await api.tenant(budgetCents=100)
    submitted = await tenant.submit()
    assert submitted.status_code == 200, submitted.text
    path = f"/api/v1/predictions/{submitted.json()['id']}"
    assert (await tenant.get(path)).status_code == 200
    assert key_cache.CACHE.get(tenants_service.hash_key(tenant.key)) is not None  # the cache answers now

    key_id = (await api.admin("GET", f"/admin/v1/tenants/{tenant.id}/keys")).json()["data"][0]["id"]
    assert (await api.admin("DELETE", f"/admin/v1/tenants/{tenant.id}/keys/{key_id}")).status_code == 200
    for answer in (await tenant.get(path), await tenant.submit()):
        assert answer.status_code == 401 and answer.json()["code"] == "invalid_api_key"

    other = await api.tenant(name="other")
    assert (await other.submit()).status_code == 200
    assert (await api.admin("DELETE", f"/admin/v1/tenants/{other.id}")).status_code == 204
    assert (await other.submit()).status_code == 401


async def test_a_budget_change_shows_in_the_next_answer(api: Api) -> None:
    tenant = await api.tenant(budgetCents=100, budgetPeriod="day")
    assert (await tenant.submit()).headers["x-budget-remaining-cents"] == "91"
    patched = await api.admin("PATCH", f"/admin/v1/tenants/{tenant.id}", json={"budgetCents": 50})
    assert patched.status_code == 200, patched.text
    assert (await tenant.submit()).headers["x-budget-remaining-cents"] == "32"


async def test_a_change_rolled_back_keeps_the_entry_and_one_committed_drops_it(runtime: Runtime, api: Api) -> None:
    tenant = await api.tenant()
    assert (await tenant.submit()).status_code == 200
    digest = tenants_service.hash_key(tenant.key)
    with pytest.raises(RuntimeError):
        async with transaction(runtime.sessions) as session:
            await key_cache.note_tenant_changed(session, tenant.id)
            raise RuntimeError("rolled back")
    assert key_cache.CACHE.get(digest) is not None
    async with transaction(runtime.sessions) as session:
        await key_cache.note_tenant_changed(session, tenant.id)
    assert key_cache.CACHE.get(digest) is None


async def test_a_change_behind_the_caches_back_is_seen_after_the_ttl(
    runtime: Runtime, api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the CLI does to a SQLite file from another process: only the TTL bounds it."""
    tenant = await api.tenant()
    assert (await tenant.submit()).status_code == 200
    async with transaction(runtime.sessions) as session:
        await session.execute(update(ApiKey).where(ApiKey.tenant_id == tenant.id).values(revoked_at=ApiKey.created_at))
    assert (await tenant.submit()).status_code == 200  # cached: the silent change is not seen yet
    now = key_cache.time.monotonic()
    monkeypatch.setattr(key_cache.time, "monotonic", lambda: now + LONG_TTL_S + 1)
    assert (await tenant.submit()).status_code == 401


def test_the_cache_is_bounded_and_drops_the_least_recently_used() -> None:
    cache = key_cache.KeyCache(max_keys=2)
    tenant: Any = type("T", (), {"id": "ten_1"})()
    cache.put("a", tenant, tenant, 60)
    cache.put("b", tenant, tenant, 60)
    assert cache.get("a") is not None
    cache.put("c", tenant, tenant, 60)
    assert cache.get("b") is None and cache.get("a") is not None and len(cache) == 2
    cache.invalidate("ten_1")
    assert len(cache) == 0


def test_a_change_marked_beside_a_sqlite_file_drops_the_cache(tmp_path: Any) -> None:
    cache = key_cache.KeyCache()
    url = make_url(f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}")
    cache.watch(url)
    tenant: Any = type("T", (), {"id": "ten_1"})()
    cache.put("a", tenant, tenant, LONG_TTL_S)
    assert cache.get("a") is not None
    marker = key_cache.marker_path(url)
    assert marker is not None and marker.endswith("gateway.db.tenants-changed")
    with open(marker, "ab") as file:  # what another process's commit does
        file.write(b".")
    assert cache.get("a") is None
    cache.put("a", tenant, tenant, LONG_TTL_S)
    assert cache.get("a") is not None  # seen once, not again
    assert key_cache.marker_path(make_url("sqlite+aiosqlite:///:memory:")) is None
    assert key_cache.marker_path(make_url("postgresql+asyncpg://u@h/db")) is None


@pg_only
async def test_the_listener_drops_on_notify_and_flushes_on_reconnect(database_url: str) -> None:
    tenant: Any = type("T", (), {"id": "ten_heard"})()
    stop = asyncio.Event()
    listener = asyncio.create_task(key_cache.listen(make_url(database_url), stop))
    conn = await asyncpg.connect(make_url(database_url).set(drivername="postgresql").render_as_string(False))
    try:
        # pg_stat_activity spans the cluster: other tests' gateways listen too, in their own databases.
        ours = "WHERE datname = current_database() AND application_name = $1"

        async def listening() -> bool:
            return bool(await conn.fetchval(f"SELECT count(*) FROM pg_stat_activity {ours}", key_cache.LISTENER_NAME))

        await until(listening, 10, "the listener to LISTEN")
        key_cache.CACHE.put("heard", tenant, tenant, LONG_TTL_S)
        await conn.execute("SELECT pg_notify($1, $2)", key_cache.CHANNEL, tenant.id)
        await until(lambda: key_cache.CACHE.get("heard") is None, 10, "the notification to drop the entry")

        # The listener's connection is cut: whatever was sent meanwhile is lost, so it flushes all.
        pid = await conn.fetchval(f"SELECT pid FROM pg_stat_activity {ours}", key_cache.LISTENER_NAME)
        key_cache.CACHE.put("kept", tenant, tenant, LONG_TTL_S)
        await conn.execute("SELECT pg_terminate_backend($1)", pid)
        await until(lambda: key_cache.CACHE.get("kept") is None, 30, "the listener to flush on reconnect")
        await until(listening, 30, "the listener to LISTEN again")
    finally:
        stop.set()
        await listener
        await conn.close()


@pg_only
@pytest.mark.slow
async def test_a_key_revoked_on_one_server_is_refused_by_the_other(
    procs: Procs, tmp_path_factory: pytest.TempPathFactory, sim: Any
) -> None:
    async with fresh_database(procs, tmp_path_factory, "vidgate_keycache") as db:
        env = gateway_env(db, sim, VIDGATE_KEY_CACHE_TTL_S=f"{LONG_TTL_S:g}", VIDGATE_RUN_WORKER="false")
        gw_a, gw_b = await asyncio.gather(procs.serve(env, "serve-A"), procs.serve(env, "serve-B"))
        async with gw_a.http, gw_b.http:
            tenant, key = await gw_a.tenant()
            submitted = await gw_b.submit(key)
            assert submitted.status_code == 200, submitted.text
            path = f"/api/v1/predictions/{submitted.json()['id']}"
            auth = {"Authorization": f"Bearer {key}"}
            assert (await gw_b.http.get(path, headers=auth)).status_code == 200  # B has the key cached

            keys = await gw_a.admin("GET", f"/admin/v1/tenants/{tenant['id']}/keys")
            key_id = keys.json()["data"][0]["id"]
            assert (await gw_a.admin("DELETE", f"/admin/v1/tenants/{tenant['id']}/keys/{key_id}")).status_code == 200

            async def refused_by_b() -> bool:
                return (await gw_b.http.get(path, headers=auth)).status_code == 401

            await until(refused_by_b, 10, "server B to refuse the revoked key")
            assert (await gw_b.submit(key)).status_code == 401


@pg_only
@pytest.mark.slow
async def test_a_key_expiry_takes_effect_on_both_servers_without_a_restart(
    procs: Procs, tmp_path_factory: pytest.TempPathFactory, sim: Any
) -> None:
    """Both servers hold the key in their cache for an hour; its expiry is checked against the clock on
    each request, so it takes effect everywhere at its moment, with no notification and no restart."""
    from datetime import timedelta

    from app.core import clock
    from tests.procs import TENANT_KEYS

    async with fresh_database(procs, tmp_path_factory, "vidgate_keyexpiry") as db:
        env = gateway_env(db, sim, VIDGATE_KEY_CACHE_TTL_S=f"{LONG_TTL_S:g}", VIDGATE_RUN_WORKER="false")
        gw_a, gw_b = await asyncio.gather(procs.serve(env, "serve-A"), procs.serve(env, "serve-B"))
        async with gw_a.http, gw_b.http:
            tenant, _key = await gw_a.tenant()
            expires = clock.now() + timedelta(seconds=4)
            made = await gw_a.admin(
                "POST", f"/admin/v1/tenants/{tenant['id']}/keys", json={"expiresAt": clock.iso(expires)}
            )
            assert made.status_code == 201, made.text
            key = made.json()["key"]
            TENANT_KEYS.add(key)
            for gw in (gw_a, gw_b):  # each fills its key cache
                assert (await gw.submit(key)).status_code == 200

            async def expired_on(gw: Any) -> bool:
                answer = await gw.submit(key)
                if answer.status_code == 200:
                    return False
                assert answer.status_code == 401 and answer.json()["code"] == "api_key_expired", answer.text
                return True

            await until(lambda: expired_on(gw_a), 30, "server A to refuse the expired key")
            await until(lambda: expired_on(gw_b), 30, "server B to refuse the expired key")
            assert clock.now() >= expires


@pytest.mark.slow
async def test_a_key_revoked_from_the_cli_is_refused_at_once(
    procs: Procs, tmp_path_factory: pytest.TempPathFactory, sim: Any
) -> None:
    """Issue 24 B5: `vidgate keys revoke` is a process of its own; the serving process must hear of it as
    of an API revoke (NOTIFY on PostgreSQL, the change marker beside the SQLite file), not after its
    cache's TTL (set far beyond this test here)."""
    async with fresh_database(procs, tmp_path_factory, "vidgate_clirevoke") as db:
        env = gateway_env(db, sim, VIDGATE_KEY_CACHE_TTL_S=f"{LONG_TTL_S:g}", VIDGATE_RUN_WORKER="false")
        gw = await procs.serve(env)
        async with gw.http:
            tenant, key = await gw.tenant()
            auth = {"Authorization": f"Bearer {key}"}
            # The submit route takes the key check from the cache (the read routes ask the database).
            assert (await gw.submit(key)).status_code == 200  # now cached
            keys = await gw.admin("GET", f"/admin/v1/tenants/{tenant['id']}/keys")
            key_id = keys.json()["data"][0]["id"]
            revoked = await procs.run("keys", "revoke", tenant["id"], key_id, env=env)
            assert revoked.returncode == 0, revoked.tail()
            if TEST_DB == "postgresql":
                # NOTIFY reaches the server's listener on a connection of its own: an order, not a race
                # the test can close, so it waits for the event (bounded; the TTL is an hour).
                async def refused() -> bool:
                    return (await gw.submit(key)).status_code == 401

                await until(refused, 10, "the server to refuse the key revoked from the CLI")
            answer = await gw.submit(key)
            assert answer.status_code == 401 and answer.json()["code"] == "invalid_api_key"
            assert (await gw.http.get("/api/v1/usage", headers=auth)).status_code == 401
