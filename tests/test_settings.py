from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.core.settings import Settings, normalize_database_url

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgresql://u@h:5432/db", "postgresql+asyncpg://u@h:5432/db"),
        ("postgres://u@h/db", "postgresql+asyncpg://u@h/db"),
        ("sqlite:///data/x.db", "sqlite+aiosqlite:///data/x.db"),
        ("sqlite:////abs/x.db", "sqlite+aiosqlite:////abs/x.db"),
        ("postgresql+asyncpg://u@h/db", "postgresql+asyncpg://u@h/db"),
    ],
)
def test_database_urls_pick_async_drivers(given: str, expected: str) -> None:
    assert normalize_database_url(given) == expected


def test_every_setting_is_documented_in_env_example() -> None:
    documented = set(re.findall(r"^(VIDGATE_[A-Z0-9_]+)=", (ROOT / ".env.example").read_text(), re.M))
    assert documented == {f"VIDGATE_{name.upper()}" for name in Settings.model_fields}


def test_default_database_is_a_file_in_the_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("VIDGATE_DATABASE_URL", raising=False)
    monkeypatch.setenv("VIDGATE_DATA_DIR", str(tmp_path))
    assert Settings().database_url == f"sqlite+aiosqlite:///{tmp_path}/vidgate.db"
    monkeypatch.setenv("VIDGATE_DATABASE_URL", "")  # as `VIDGATE_DATABASE_URL=` in a .env file
    assert Settings().database_url == f"sqlite+aiosqlite:///{tmp_path}/vidgate.db"


def test_vendor_key_alias(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VIDGATE_UPSTREAM_API_KEY", raising=False)
    monkeypatch.setenv("VIBEDREAM_API_KEY", "vendor-secret")
    settings = Settings(_env_file=None)
    assert settings.upstream_api_key is not None
    assert settings.upstream_api_key.get_secret_value() == "vendor-secret"
    assert "vendor-secret" not in repr(settings)


def test_production_needs_an_admin_token() -> None:
    refusal = Settings(_env_file=None, upstream_api_key="k", admin_token=None).startup_refusal("serve")
    assert refusal is not None and "VIDGATE_ADMIN_TOKEN" in refusal
    assert Settings(_env_file=None, upstream_api_key="k", admin_token="t" * 32).startup_refusal("serve") is None


def test_list_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIDGATE_ALLOWED_MODELS", "ltx-2-19b, other-model")
    monkeypatch.setenv("VIDGATE_WEBHOOK_RETRY_SCHEDULE_S", "0,1,2")
    monkeypatch.setenv("VIDGATE_PRICE_TABLE", '{"ltx-2-19b": {"480p": 2.5}}')
    settings = Settings(_env_file=None)
    assert settings.allowed_models == ["ltx-2-19b", "other-model"]
    assert settings.webhook_retry_schedule_s == [0, 1, 2]
    assert settings.price_table == {"ltx-2-19b": {"480p": 2.5}}


def test_recovery_must_outlive_upstream_calls() -> None:
    with pytest.raises(ValidationError, match="SUBMIT_RECOVERY"):
        Settings(_env_file=None, upstream_timeout_s=60, submit_recovery_s=30)
