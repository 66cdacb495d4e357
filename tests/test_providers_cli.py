"""`vidgate providers list|disable|enable` on the database under test (SQLite or PostgreSQL)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from typer.testing import CliRunner

from app.cli import cli
from app.core.settings import get_settings
from tests.conftest import empty_tables

TOML = """
routing = "priority"

[[providers]]
name = "first"
kind = "vibedream"
base_url = "http://127.0.0.1:9"
api_key_env = "CLI_VD_KEY"
max_concurrent = 5

[[providers]]
name = "second"
kind = "wavespeed"
base_url = "http://127.0.0.1:9"
api_key_env = "CLI_WS_KEY"
priority = 2
cents_per_second = { "480p" = 1.5, "720p" = 3.0, "1080p" = 6.0 }
"""


@pytest.fixture
async def db(
    engine: AsyncEngine, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[None]:
    path = tmp_path / "providers.toml"
    path.write_text(TOML)
    monkeypatch.setenv("VIDGATE_DATABASE_URL", database_url)
    monkeypatch.setenv("VIDGATE_PROVIDERS_FILE", str(path))
    monkeypatch.setenv("CLI_VD_KEY", "vd-cli-secret")
    monkeypatch.setenv("CLI_WS_KEY", "ws-cli-secret")
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()
    await empty_tables(engine)


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_list_disable_enable(db: None) -> None:
    code, out, _ = run("providers", "list", "--json")
    assert code == 0, out
    listing = json.loads(out)
    assert listing["routing"] == "priority"
    assert [(p["name"], p["state"]["enabled"]) for p in listing["data"]] == [("first", True), ("second", True)]
    assert "secret" not in out

    code, out, _ = run("providers", "disable", "second", "--json")
    assert code == 0 and json.loads(out)["state"]["enabled"] is False
    code, out, _ = run("providers", "list", "--json")
    assert [p["state"]["enabled"] for p in json.loads(out)["data"]] == [True, False]
    code, out, _ = run("providers", "list")
    assert code == 0
    assert "first  (vibedream, priority 1, weight 1)  enabled" in out
    assert "second  (wavespeed, priority 2, weight 1)  DISABLED since " in out
    assert "in flight 0 / 5" in out and "in flight 0 / no cap" in out
    assert "secret" not in out

    code, out, _ = run("providers", "show", "second", "--json")
    assert code == 0 and json.loads(out)["name"] == "second" and json.loads(out)["state"]["enabled"] is False
    code, out, _ = run("providers", "show", "second")
    assert code == 0 and out.startswith("second  (wavespeed") and "DISABLED" in out

    code, out, _ = run("providers", "enable", "second")
    assert code == 0 and out.strip() == "second enabled"
    code, out, _ = run("providers", "list", "--json")
    assert [p["state"]["enabled"] for p in json.loads(out)["data"]] == [True, True]


@pytest.mark.parametrize("verb", ["show", "disable", "enable"])
def test_unknown_provider_is_a_readable_error(db: None, verb: str) -> None:
    code, out, err = run("providers", verb, "third")
    assert code == 2
    assert err.startswith("error: There is no provider 'third'") and "first, second" in err
    assert "Traceback" not in out + err


def test_a_broken_providers_file_is_one_line(db: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text(TOML.replace('kind = "wavespeed"', 'kind = "nonesuch"'))
    monkeypatch.setenv("VIDGATE_PROVIDERS_FILE", str(broken))
    get_settings.cache_clear()
    code, out, err = run("providers", "list")
    assert code == 2
    assert err.startswith("error: providers file") and "'second'" in err and "kind" in err
    assert "Traceback" not in out + err


def test_usage_by_provider(db: None) -> None:
    code, out, _ = run("usage", "--group-by", "provider", "--json")
    assert code == 0 and json.loads(out) == []
    code, out, _ = run("usage", "--group-by", "provider")
    assert code == 0 and out.strip() == "no spending"
