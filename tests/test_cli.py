"""The operator CLI in process (the process tests run it as a real command too)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from app.cli import cli
from app.core.settings import get_settings


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("VIDGATE_DATABASE_URL", f"sqlite:///{tmp_path / 'cli.db'}")
    monkeypatch.setenv("VIDGATE_WEBHOOK_ALLOW_PRIVATE", "false")
    get_settings.cache_clear()
    assert CliRunner().invoke(cli, ["migrate"]).exit_code == 0
    yield
    get_settings.cache_clear()


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_tenant_lifecycle(db: None) -> None:
    code, out, _ = run("tenants", "create", "acme", "--budget-cents", "500", "--budget-period", "day", "--json")
    assert code == 0
    tenant = json.loads(out)
    assert tenant["budgetCents"] == 500 and tenant["budgetPeriod"] == "day"
    assert tenant["webhookSecret"].startswith("whsec_")

    code, out, _ = run("tenants", "update", tenant["id"], "--max-concurrent", "3", "--json")
    assert code == 0 and json.loads(out)["maxConcurrent"] == 3 and json.loads(out)["budgetCents"] == 500
    assert (tenant["queueWeight"], tenant["maxQueued"]) == (1, 1000)  # the fair queue's defaults (SPEC §12)
    code, out, _ = run("tenants", "update", tenant["id"], "--queue-weight", "3", "--max-queued", "20", "--json")
    assert code == 0 and (json.loads(out)["queueWeight"], json.loads(out)["maxQueued"]) == (3, 20)
    code, out, _ = run("tenants", "update", tenant["id"], "--unlimited", "--json")
    assert code == 0 and json.loads(out)["budgetCents"] is None

    code, out, _ = run("keys", "create", tenant["id"], "--name", "ci", "--json")
    key = json.loads(out)
    assert code == 0 and key["key"].startswith("vg_")
    code, out, _ = run("keys", "revoke", tenant["id"], key["id"])
    assert code == 0 and "revoked" in out

    code, out, _ = run("tenants", "list", "--json")
    assert [t["id"] for t in json.loads(out)] == [tenant["id"]]
    code, out, _ = run("tenants", "show", tenant["id"])
    assert code == 0 and "acme" in out and "0 spent" in out
    code, out, _ = run("ledger", "verify")
    assert code == 0 and "agree" in out
    code, out, _ = run("usage", "--group-by", "model", "--json")
    assert code == 0 and json.loads(out) == []


@pytest.mark.parametrize(
    "args",
    [
        ("tenants", "create", "x", "--budget-period", "year"),
        ("tenants", "create", "x", "--budget-cents", "-5"),
        ("tenants", "create", "x", "--webhook-url", "http://127.0.0.1/hook"),
        ("tenants", "create", "x", "--queue-weight", "0"),
        ("tenants", "show", "ten_missing"),
        ("keys", "create", "ten_missing"),
        ("usage", "--group-by", "planet"),
    ],
)
def test_bad_input_is_a_readable_error(db: None, args: tuple[str, ...]) -> None:
    code, out, err = run(*args)
    assert code == 2
    assert err.startswith("error: ")
    assert "Traceback" not in out + err


def test_output_retention_per_tenant(db: None) -> None:
    code, out, _ = run("tenants", "create", "keeper", "--output-retention-days", "7", "--json")
    assert code == 0 and json.loads(out)["outputRetentionDays"] == 7
    tenant_id = json.loads(out)["id"]
    code, out, _ = run("tenants", "update", tenant_id, "--output-retention-days", "90", "--json")
    assert code == 0 and json.loads(out)["outputRetentionDays"] == 90
    code, _, err = run("tenants", "update", tenant_id, "--output-retention-days", "0")
    assert code == 2 and "output_retention_days" in err


def test_operator_commands_act_as_the_token_in_the_environment(db: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without VIDGATE_OPERATOR_TOKEN the CLI acts as `admin` (it holds the database's credentials); with one
    it acts as that operator, and a viewer's token changes nothing."""
    code, out, _ = run("operator-tokens", "create", "ops-bot", "--role", "admin", "--json")
    assert code == 0
    admin_token = json.loads(out)["token"]
    code, out, _ = run("operator-tokens", "create", "auditor", "--role", "viewer", "--json")
    viewer = json.loads(out)
    code, out, _ = run("tenants", "create", "by-admin", "--json")
    tenant = json.loads(out)

    monkeypatch.setenv("VIDGATE_OPERATOR_TOKEN", admin_token)
    code, out, _ = run("keys", "create", tenant["id"], "--scopes", "generate", "--models", "ltx-2-19b", "--json")
    assert code == 0, out
    key = json.loads(out)
    assert key["scopes"] == ["generate"] and key["models"] == ["ltx-2-19b"]
    code, out, _ = run("keys", "list", tenant["id"], "--json")
    assert code == 0 and [k["prefix"] for k in json.loads(out)] == [key["prefix"]]
    code, out, _ = run("webhook-secret", "rotate", tenant["id"], "--json")
    assert code == 0 and json.loads(out)["webhookSecret"].startswith("whsec_")

    monkeypatch.setenv("VIDGATE_OPERATOR_TOKEN", viewer["token"])
    for args in (("tenants", "delete", tenant["id"]), ("keys", "revoke", tenant["id"], key["id"])):
        code, out, err = run(*args)
        assert code == 2 and "viewer" in err, (args, out, err)
    code, out, _ = run("tenants", "list", "--json")
    assert code == 0 and len(json.loads(out)) == 1  # a viewer reads

    monkeypatch.setenv("VIDGATE_OPERATOR_TOKEN", "vgo_not-a-token")
    code, _, err = run("tenants", "list")
    assert code == 2 and "VIDGATE_OPERATOR_TOKEN" in err
    monkeypatch.delenv("VIDGATE_OPERATOR_TOKEN")

    code, out, _ = run("operator-tokens", "revoke", viewer["id"], "--json")
    assert code == 0 and json.loads(out)["revokedAt"]
    code, out, _ = run("tenants", "delete", tenant["id"], "--json")
    assert code == 0
    code, out, _ = run("audit", "--json")
    assert code == 0
    seen = [(e["actor"], e["action"]) for e in reversed(json.loads(out)["data"])]
    assert seen == [
        ("admin", "operator_token.create"),
        ("admin", "operator_token.create"),
        ("admin", "tenant.create"),
        ("operator:ops-bot", "key.create"),
        ("operator:ops-bot", "webhook_secret.rotate"),
        ("admin", "operator_token.revoke"),
        ("admin", "tenant.delete"),
    ]
    code, out, _ = run("audit", "--actor", "operator:ops-bot", "--action", "key.create", "--json")
    assert [e["target"] for e in json.loads(out)["data"]] == [f"key:{key['id']}"]
    assert key["key"] not in out and admin_token not in out
