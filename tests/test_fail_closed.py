"""Fail-closed modes with real processes (SPEC section 6): what `vidgate serve` and `vidgate worker` do
when a setting is missing, what a production process refuses, and where its links point."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import valid_body
from tests.procs import ADMIN_TOKEN, Procs, Simulator, base_env, free_port, gateway_env

# Fixtures: pytest finds them in this module's namespace (`x as x` marks them as used on purpose).
from tests.procs import module_procs_fixture as module_procs_fixture
from tests.procs import proc_cwd_fixture as proc_cwd_fixture
from tests.procs import proc_db_fixture as proc_db_fixture
from tests.procs import procs_fixture as procs_fixture
from tests.procs import sim_fixture as sim_fixture
from tests.procs import simulator_proc_fixture as simulator_proc_fixture

pytestmark = pytest.mark.slow

DOCKERFILE = Path(__file__).resolve().parents[1] / "Dockerfile"
SANDBOX_ADMIN_TOKEN = "sandbox-admin-token"  # as the README documents it


async def refused(procs: Procs, *args: str, env: dict[str, str]) -> list[str]:
    """Run a command that must refuse to start; returns its stderr lines."""
    proc = await procs.start(" ".join(args[:1]), *args, env=env)
    try:
        rc = await proc.wait(30)
    except TimeoutError:
        raise AssertionError(f"`vidgate {' '.join(args)}` started\n{proc.tail()}") from None
    assert rc != 0, proc.tail()
    assert proc.stdout == [], proc.tail()
    lines = [line for line in proc.stderr if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.tail()  # one clear line, no traceback
    return lines


async def test_docker_default_command_needs_real_settings(procs: Procs, tmp_path: Path) -> None:
    text = DOCKERFILE.read_text()
    cmd_line = re.search(r"^CMD\s+(\[.*\])\s*$", text, re.M)
    assert cmd_line, "the Dockerfile has a CMD in exec form"
    args = [{"0.0.0.0": "127.0.0.1", "8000": str(free_port())}.get(a, a) for a in json.loads(cmd_line.group(1))]
    assert "--sandbox" not in args and "VIDGATE_SANDBOX" not in text
    # The image with no settings given: no vendor key, no admin token.
    (line,) = await refused(procs, *args, env=base_env(VIDGATE_DATABASE_URL=f"sqlite:///{tmp_path / 'x.db'}"))
    assert "VIDGATE_UPSTREAM_API_KEY" in line and "--sandbox" in line


async def test_worker_without_vendor_key_refuses(procs: Procs, tmp_path: Path) -> None:
    # A deployment that points at the vendor but forgot the key.
    env = base_env(
        VIDGATE_DATABASE_URL=f"sqlite:///{tmp_path / 'x.db'}",
        VIDGATE_UPSTREAM_BASE_URL="https://api.vibedream.ai",
        VIDGATE_ADMIN_TOKEN=ADMIN_TOKEN,
    )
    (line,) = await refused(procs, "worker", env=env)
    assert "VIDGATE_UPSTREAM_API_KEY" in line


async def test_a_production_process_refuses_the_sandbox_token_and_closes_metrics(
    procs: Procs, proc_db: str, sim: Simulator
) -> None:
    metrics_token = "met-" + "k" * 28
    gw = await procs.serve(gateway_env(proc_db, sim, VIDGATE_METRICS_TOKEN=metrics_token))
    async with gw.http:
        sandbox = await gw.http.get("/admin/v1/tenants", headers={"Authorization": f"Bearer {SANDBOX_ADMIN_TOKEN}"})
        assert sandbox.status_code == 401 and sandbox.json()["code"] == "invalid_admin_token"
        assert "x-vidgate-sandbox" not in sandbox.headers
        closed = await gw.http.get("/metrics")
        assert closed.status_code == 401 and closed.json()["code"] == "invalid_metrics_token"
        opened = await gw.http.get("/metrics", headers={"Authorization": f"Bearer {metrics_token}"})
        assert opened.status_code == 200 and "vidgate_http_requests_total" in opened.text

        # No VIDGATE_PUBLIC_BASE_URL: the link follows the Host the caller used, never the loopback
        # address the process happens to listen on; forwarded headers from an untrusted peer are ignored.
        _, key = await gw.tenant()
        answer = await gw.http.post(
            "/api/v1/models/ltx-2-19b/generate",
            json=valid_body(),
            headers={
                "Authorization": f"Bearer {key}",
                "Host": "gateway.example:8443",
                "X-Forwarded-Host": "evil.example",
                "X-Forwarded-Proto": "https",
            },
        )
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["statusUrl"] == f"http://gateway.example:8443/api/v1/predictions/{body['id']}"
        bogus = await gw.http.post(
            "/api/v1/models/ltx-2-19b/generate",
            json=valid_body(),
            headers={"Authorization": f"Bearer {key}", "Host": "evil.example/x?"},
        )
        assert bogus.status_code == 400 and bogus.json()["code"] == "invalid_host"
