"""The providers file (SPEC §11): what it may say, and one line naming provider and field per mistake."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.budgets import service as budgets_service
from app.core.settings import Settings
from app.providers.config import ProvidersFileError, load_registry, parse_registry

GOOD = """
routing = "cheapest"
[[providers]]
name = "vibedream"
kind = "vibedream"
base_url = "https://api.vibedream.ai"
api_key_env = "VD_KEY"
output_hosts = ["assets.vibedream.ai"]

[[providers]]
name = "wavespeed"
kind = "wavespeed"
base_url = "https://api.wavespeed.ai"
api_key_env = "WS_KEY"
priority = 2
max_concurrent = 5
rate_per_minute = 60
cents_per_second = { "480p" = 1.8, "720p" = 3.6, "1080p" = 7.2 }

[[providers]]
name = "fal"
kind = "fal"
base_url = "https://queue.fal.run"
api_key_env = "FAL_KEY"
resolutions = ["720p"]
max_duration = 10
cents_per_second = { "720p" = 4 }
"""
ENV = {"VD_KEY": "vd", "WS_KEY": "ws", "FAL_KEY": "fal"}


def test_a_good_file_gives_every_provider_with_its_defaults_and_keys() -> None:
    registry = parse_registry(GOOD, "p.toml", ENV)
    assert registry.routing == "cheapest"
    assert registry.names == ["vibedream", "wavespeed", "fal"]
    vibedream, wavespeed, fal = registry.providers
    assert vibedream.model == "" and vibedream.serves == ["ltx-2-19b"]  # the gateway's modelId as it is
    assert wavespeed.model == "wavespeed-ai/ltx-2-19b/image-to-video"
    assert fal.model == "fal-ai/ltx-2-19b/image-to-video"
    assert fal.host == "queue.fal.run"
    assert [p.api_key.get_secret_value() if p.api_key else None for p in registry.providers] == ["vd", "ws", "fal"]
    assert "api_key" not in wavespeed.public() and wavespeed.public()["max_concurrent"] == 5
    # cents_per_second x duration, rounded up to a whole cent (1.8 x 5 is exactly 9, not 10)
    assert wavespeed.file_price_cents("480p", 5) == 9
    assert wavespeed.file_price_cents("720p", 7) == 26  # 25.2 -> 26
    assert vibedream.file_price_cents("480p", 5) is None
    assert fal.serves_request("ltx-2-19b", "720p", 10)
    assert not fal.serves_request("ltx-2-19b", "1080p", 10)
    assert not fal.serves_request("ltx-2-19b", "720p", 11)
    assert not fal.serves_request("other", "720p", 5)


@pytest.mark.parametrize(
    ("change", "env", "expected"),
    [
        (lambda t: t + "\n[[providers\n", ENV, "providers file p.toml: does not parse as TOML"),
        (lambda t: t.replace('kind = "fal"', 'kind = "runway"'), ENV, "provider 'fal': kind: unknown kind 'runway'"),
        (lambda t: t.replace('name = "fal"', 'name = "wavespeed"'), ENV, "provider 'wavespeed': name: repeated"),
        (lambda t: t, {**ENV, "FAL_KEY": ""}, "provider 'fal': api_key_env: the variable FAL_KEY is not set"),
        (lambda t: t.replace('name = "fal"', 'name = "Fal_1"'), ENV, "provider 'Fal_1': name: 'Fal_1' must match"),
        (lambda t: t.replace('routing = "cheapest"', 'routing = "fastest"'), ENV, "file: routing:"),
        (lambda t: t.replace("max_concurrent = 5", "max_concurrent = 0"), ENV, "provider 'wavespeed': max_concurrent:"),
        (
            lambda t: t.replace('cents_per_second = { "720p" = 4 }', ""),
            ENV,
            "provider 'fal': (entry): cents_per_second",
        ),
        (
            lambda t: t.replace('base_url = "https://queue.fal.run"', 'base_url = "queue"'),
            ENV,
            "provider 'fal': base_url:",
        ),
        (lambda t: t.replace("max_duration = 10", "colour = 1"), ENV, "provider 'fal': colour: Extra inputs"),
    ],
)
def test_each_mistake_is_one_line_naming_provider_and_field(change, env, expected) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ProvidersFileError) as raised:
        parse_registry(change(GOOD), "p.toml", env)
    assert len(raised.value.lines) == 1, raised.value.lines
    assert expected in raised.value.lines[0], raised.value.lines
    assert "\n" not in raised.value.lines[0]


def test_several_mistakes_are_several_lines() -> None:
    text = GOOD.replace('kind = "fal"', 'kind = "x"').replace("max_concurrent = 5", "max_concurrent = -1")
    with pytest.raises(ProvidersFileError) as raised:
        parse_registry(text, "p.toml", ENV)
    assert len(raised.value.lines) == 2


def test_sandbox_needs_no_keys() -> None:
    registry = parse_registry(GOOD, "p.toml", {}, sandbox=True)
    assert all(p.api_key is None for p in registry.providers)


def test_without_a_file_todays_settings_are_the_one_vibedream_provider() -> None:
    settings = Settings(
        upstream_base_url="https://vd.example.com/", upstream_api_key="k", output_hosts="a.example.com,b:8080"
    )
    registry = load_registry(settings)
    (provider,) = registry.providers
    assert (provider.name, provider.kind, provider.base_url) == ("vibedream", "vibedream", "https://vd.example.com")
    assert provider.api_key is not None and provider.api_key.get_secret_value() == "k"
    assert provider.output_hosts == ["a.example.com", "b:8080"]
    assert registry.routing == "priority" and registry.source is None


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_serve_and_worker_refuse_a_bad_file_with_one_line(tmp_path: Path, command: str) -> None:
    path = tmp_path / "providers.toml"
    path.write_text(GOOD.replace('kind = "fal"', 'kind = "runway"'))
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "VIDGATE_PROVIDERS_FILE": str(path),
        "VIDGATE_ADMIN_TOKEN": "a-long-admin-token-0123456789abcdef",
        "VIDGATE_DATA_DIR": str(tmp_path),
        **ENV,
    }
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", command], env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [
        f"error: providers file {path}: provider 'fal': kind: unknown kind 'runway': must be one of vibedream, wavespeed, fal"
    ]


@given(
    per_second=st.decimals(min_value=0, max_value=1000, places=3).map(float),
    duration=st.integers(min_value=5, max_value=20),
)
def test_a_file_price_is_the_product_rounded_up_to_a_whole_cent(per_second: float, duration: int) -> None:
    from decimal import Decimal

    cents = budgets_service.per_second_cents(per_second, duration)
    exact = Decimal(str(per_second)) * duration
    assert exact <= cents < exact + 1


@given(
    prices=st.lists(st.integers(min_value=0, max_value=10_000), max_size=5),
    estimate=st.none() | st.integers(min_value=0, max_value=10_000),
)
def test_the_hold_covers_whichever_candidate_serves(prices: list[int], estimate: int | None) -> None:
    held = budgets_service.hold_cents(estimate, prices)
    for price in prices:
        assert budgets_service.provider_charge(None, price) <= held
    if estimate is not None:
        assert estimate <= held
    assert held == max([*prices, *([estimate] if estimate is not None else [])], default=0)
