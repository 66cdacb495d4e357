"""The client installs and works in a fresh virtualenv holding only it, httpx and pydantic."""

from __future__ import annotations

import json
import subprocess
import sys
import venv
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1]
SERVER_ONLY = {"vidgate", "fastapi", "starlette", "sqlalchemy", "aiohttp", "asyncpg", "aiosqlite", "alembic", "uvicorn"}
SMOKE = """
import importlib.metadata, importlib.util, sys
import vidgate_client
from vidgate_client import AsyncVidgate, Vidgate, webhooks
assert "app" not in sys.modules
assert all(importlib.util.find_spec(name) is None for name in ("app", "fastapi", "sqlalchemy", "aiohttp"))
requires = sorted(r.split(">")[0].split("=")[0].strip() for r in importlib.metadata.requires("vidgate-client"))
assert requires == ["httpx", "pydantic"], requires
secret = "whsec_" + "a" * 44
body = b'{"type": "prediction.completed", "timestamp": "2026-01-01T00:00:00.000Z", "data": {}}'
import time
now = int(time.time())
headers = {"webhook-id": "m", "webhook-timestamp": str(now), "webhook-signature": webhooks.sign(secret, "m", now, body)}
assert webhooks.verify(body, headers, secret).type == "prediction.completed"
with Vidgate("vg_x", "http://127.0.0.1:9") as client:
    pass
print("ok", vidgate_client.__version__)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="venv layout")
def test_installs_and_imports_without_the_server(tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    installed = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", str(PACKAGE)], capture_output=True, text=True, timeout=600
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    listed = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=json"], capture_output=True, text=True, timeout=120, check=True
    )
    names = {package["name"].lower() for package in json.loads(listed.stdout)}
    assert {"vidgate-client", "httpx", "pydantic"} <= names
    assert not names & SERVER_ONLY, names & SERVER_ONLY
    smoke = subprocess.run([str(python), "-c", SMOKE], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert smoke.returncode == 0 and smoke.stdout.startswith("ok"), smoke.stdout + smoke.stderr
