"""Through PgBouncer in transaction pooling mode (SPEC §6): Debian's PgBouncer 1.18, which has no prepared
statement support in that mode, started on a loopback port with a generated configuration. What must hold
through it: the statements run on the driver (app/core/prebuilt.py, the tests of tests/test_prebuilt.py
run here again on a pooled engine), the API under concurrency, the budget edge (exact, 0 cents over), the
core flow of real processes, and a key revoked on one replica refused by the other at once (LISTEN goes
to VIDGATE_DATABASE_DIRECT_URL).

A small pool (4 server connections) for many clients, so that consecutive transactions of one client
really land on different server connections."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from app.core.database import create_engine
from app.core.migrate import upgrade_to_head
from bench.ports import free_port
from tests.conftest import TEST_DB, Api, valid_body
from tests.procs import COST, Procs, Simulator, fresh_database, gateway_env, until, verify

# Fixtures: pytest finds them in this module's namespace (`x as x` marks them as used on purpose).
from tests.procs import module_procs_fixture as module_procs_fixture
from tests.procs import proc_cwd_fixture as proc_cwd_fixture
from tests.procs import procs_fixture as procs_fixture
from tests.procs import simulator_proc_fixture as simulator_proc_fixture

# The statements on the driver, run again here through the pooler (they take this module's `engine`).
from tests.test_prebuilt import test_a_failing_statement_raises_sqlalchemys_error_and_the_pool_goes_on as _t1
from tests.test_prebuilt import test_a_first_statement_belongs_to_the_transaction_that_then_rolls_back as _t2
from tests.test_prebuilt import test_a_task_cancelled_mid_statement_gives_up_its_connection as _t3
from tests.test_prebuilt import test_a_write_on_a_bare_connection_is_committed_by_its_commit as _t4
from tests.test_prebuilt import test_bind_names_that_sqlalchemy_escapes as _t5
from tests.test_prebuilt import test_every_statement_reaches_the_cursor_events as _t6
from tests.test_prebuilt import test_rows_are_sqlalchemys_rows as _t7

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"

pytestmark = [
    pytest.mark.skipif(TEST_DB != "postgresql", reason="PgBouncer stands in front of PostgreSQL"),
    pytest.mark.skipif(not os.path.exists(PGBOUNCER), reason="no pgbouncer (.ci/run installs it)"),
]

test_prebuilt_failing_statement = _t1
test_prebuilt_first_statement = _t2
test_prebuilt_cancelled = _t3
test_prebuilt_bare_connection = _t4
test_prebuilt_bind_names = _t5
test_prebuilt_cursor_events = _t6
test_prebuilt_rows = _t7

SERVER_CONNECTIONS = 4


class Bouncer:
    def __init__(self, port: int, process: Any, directory: str) -> None:
        self.port = port
        self.process = process
        self.directory = directory

    def url(self, direct: str) -> str:
        """`direct` (any form) with the pooler's port instead of PostgreSQL's."""
        parts = urlsplit(direct)
        assert parts.hostname and parts.port, direct
        return direct.replace(f"{parts.hostname}:{parts.port}", f"127.0.0.1:{self.port}", 1)


@pytest.fixture(scope="module")
def bouncer() -> Iterator[Bouncer]:
    import subprocess
    import time

    server = urlsplit(os.environ.get("VIDGATE_TEST_PG", "postgresql://postgres@127.0.0.1:5432"))
    directory = tempfile.mkdtemp(prefix="vidgate-pgbouncer-")
    os.chmod(directory, 0o755)
    port = free_port()
    users = Path(directory, "users.txt")
    users.write_text(f'"{server.username}" ""\n')
    config = Path(directory, "pgbouncer.ini")
    config.write_text(
        f"""[databases]
* = host={server.hostname} port={server.port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {users}
pool_mode = transaction
default_pool_size = {SERVER_CONNECTIONS}
max_client_conn = 1000
max_db_connections = {SERVER_CONNECTIONS * 2}
server_reset_query =
ignore_startup_parameters = extra_float_digits
"""
    )
    for path in (users, config):
        os.chmod(path, 0o644)
    # PgBouncer refuses to run as root: as the database's own user then.
    argv = [PGBOUNCER, str(config)]
    if os.geteuid() == 0:
        argv = [PGBOUNCER, "-u", "postgres", str(config)]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    import socket

    for _ in range(200):  # bounded: until it listens, or it exited
        assert process.poll() is None, process.stdout.read().decode() if process.stdout else "pgbouncer exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    yield Bouncer(port, process, directory)
    process.terminate()
    process.wait(10)
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
async def engine(database_url: str, bouncer: Bouncer) -> AsyncIterator[AsyncEngine]:
    """This module's engine goes through the pooler (migrations go directly, as `vidgate migrate` does)."""
    direct = create_engine(database_url, pool_size=1)
    await upgrade_to_head(direct)
    await direct.dispose()
    pooled = create_engine(bouncer.url(database_url), pool_size=20, pooled=True)
    yield pooled
    await pooled.dispose()


@pytest.fixture
def settings_overrides(database_url: str) -> dict[str, Any]:
    return {"database_direct_url": database_url}


async def test_the_api_under_concurrency_through_the_pooler(live_api: Api) -> None:
    tenant = await live_api.tenant()
    answers = await asyncio.gather(*(tenant.submit() for _ in range(30)))
    assert [a.status_code for a in answers] == [200] * 30, [a.text for a in answers if a.status_code != 200][:3]
    reads = await asyncio.gather(*(tenant.get(f"/api/v1/predictions/{a.json()['id']}") for a in answers))
    assert [r.status_code for r in reads] == [200] * 30
    listed = await tenant.get("/api/v1/predictions?limit=100")
    assert len(listed.json()["data"]) == 30
    usage = (await tenant.get("/api/v1/usage")).json()
    assert usage["spentCents"] == 30 * COST


async def test_the_budget_edge_is_exact_through_the_pooler(live_api: Api) -> None:
    fits = 5
    tenant = await live_api.tenant(budgetCents=fits * COST, budgetPeriod="total")
    answers = await asyncio.gather(*(tenant.submit() for _ in range(4 * fits)))
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [200] * fits + [402] * (3 * fits), statuses
    usage = (await tenant.get("/api/v1/usage")).json()
    assert usage["spentCents"] + usage["reservedCents"] == fits * COST  # all of it, and 0 cents over
    assert usage["remainingCents"] == 0


@pytest.mark.slow
async def test_serve_through_the_pooler_flows_and_a_revoked_key_is_refused_by_the_other_replica(
    procs: Procs,
    tmp_path_factory: pytest.TempPathFactory,
    simulator_proc: Simulator,
    bouncer: Bouncer,
    receiver_factory: Any,
) -> None:
    sim = simulator_proc
    await sim.configure(completion_s=1, estimated_time="0-1s", failure_ratio=0)
    receiver = await receiver_factory()
    async with fresh_database(procs, tmp_path_factory, "vidgate_bouncer") as direct:
        env = gateway_env(
            direct,
            sim,
            VIDGATE_DATABASE_URL=bouncer.url(direct),
            VIDGATE_DATABASE_DIRECT_URL=direct,
            VIDGATE_KEY_CACHE_TTL_S="600",  # a revoke reaches the other replica by NOTIFY, not by expiry
        )
        migrated = await procs.run("migrate", env=env)  # through the direct URL
        assert migrated.returncode == 0, migrated.tail()
        gw_a, gw_b = await asyncio.gather(procs.serve(env, "serve-A"), procs.serve(env, "serve-B"))
        async with gw_a.http, gw_b.http:
            assert (await gw_a.http.get("/readyz")).status_code == 200
            tenant, key = await gw_a.tenant(webhookUrl=receiver.url)

            # The core flow: submit on B, completed by a worker, webhook signed, charged once.
            submitted = await asyncio.gather(*(gw_b.submit_ok(key, valid_body()) for _ in range(10)))
            ids = {s["id"] for s in submitted}
            await until(lambda: gw_a.all_done(key, ids), 60, "the predictions to complete")
            for _ in ids:
                event = verify(tenant["webhookSecret"], await receiver.next(timeout=30))
                assert event["type"] == "prediction.completed" and event["data"]["id"] in ids
            usage = (await gw_a.http.get("/api/v1/usage", headers={"Authorization": f"Bearer {key}"})).json()
            assert usage["spentCents"] == COST * len(ids)

            # Revoked on A, refused by B, which had the key cached.
            path = f"/api/v1/predictions/{submitted[0]['id']}"
            auth = {"Authorization": f"Bearer {key}"}
            assert (await gw_b.http.get(path, headers=auth)).status_code == 200
            keys = await gw_a.admin("GET", f"/admin/v1/tenants/{tenant['id']}/keys")
            key_id = keys.json()["data"][0]["id"]
            assert (await gw_a.admin("DELETE", f"/admin/v1/tenants/{tenant['id']}/keys/{key_id}")).status_code == 200

            async def refused_by_b() -> bool:
                return (await gw_b.http.get(path, headers=auth)).status_code == 401

            await until(refused_by_b, 10, "server B to refuse the revoked key")
            assert (await gw_b.submit(key)).status_code == 401
        errors = [line for p in procs.all for line in p.stderr if '"level":"error"' in line]
        assert errors == [], errors[:5]
