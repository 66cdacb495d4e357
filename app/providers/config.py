"""The provider registry (SPEC §11): the TOML file named by VIDGATE_PROVIDERS_FILE, or, without one,
the one `vibedream` provider today's settings describe.

Read once at start; every mistake in the file is one line naming the provider and the field, and
`serve`/`worker` refuse to start on any (`startup_refusal`). Keys are read from the environment
variables the file names, never from the file.

For other domains (provops' admin routes, CLI, dashboard): `load_registry(settings)` returns a
`Registry`; `Registry.providers` keeps the file's order; `ProviderConfig.public()` is the settings
without the key.
"""

from __future__ import annotations

import math
import os
import tomllib
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from app.budgets import service as budgets_service
from app.core.settings import Settings, secret_given

Kind = Literal["vibedream", "wavespeed", "fal"]
Resolution = Literal["480p", "720p", "1080p"]
Policy = Literal["priority", "cheapest", "weighted"]
KINDS: tuple[str, ...] = ("vibedream", "wavespeed", "fal")
RESOLUTIONS: tuple[Resolution, ...] = ("480p", "720p", "1080p")
NAME_PATTERN = r"^[a-z0-9-]{1,32}$"
MIN_DURATION_S = 5
MAX_DURATION_S = 20

# Each kind's own model or app id when the file names none (SPEC §11); vibedream's ids are the
# gateway's own, so without one the gateway's modelId is sent as it is (as before providers).
DEFAULT_MODELS: dict[str, str] = {
    "vibedream": "",
    "wavespeed": "wavespeed-ai/ltx-2-19b/image-to-video",
    "fal": "fal-ai/ltx-2-19b/image-to-video",
}
# Kinds whose answers carry no cost: they are charged cents_per_second x duration, so the file must
# price every resolution they serve.
PRICED_BY_FILE = ("wavespeed", "fal")


class ProvidersFileError(Exception):
    """The providers file cannot be used; `lines` holds one line per mistake."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


class ProviderConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_PATTERN)
    kind: Kind
    base_url: str
    api_key_env: str | None = Field(default=None, min_length=1, max_length=200)
    # Filled from api_key_env when the registry is loaded (never from the file itself).
    api_key: SecretStr | None = Field(default=None, exclude=True)
    serves: list[str] = Field(default_factory=lambda: ["ltx-2-19b"], min_length=1)
    model: str = ""
    priority: int = Field(default=1, ge=0, le=1_000_000)
    weight: float = Field(default=1.0, ge=0, le=1_000_000)
    max_concurrent: int | None = Field(default=None, ge=1, le=1_000_000)
    rate_per_minute: int | None = Field(default=None, ge=1, le=1_000_000)
    output_hosts: list[str] = Field(default_factory=list)
    resolutions: list[Resolution] = Field(default_factory=lambda: list(RESOLUTIONS), min_length=1)
    max_duration: int = Field(default=MAX_DURATION_S, ge=MIN_DURATION_S, le=MAX_DURATION_S)
    cents_per_second: dict[Resolution, float] = Field(default_factory=dict)
    # None: no circuit (the implicit provider without a file keeps today's behaviour).
    failure_threshold: int | None = Field(default=5, ge=1, le=1_000_000)
    cooldown_s: float = Field(default=30.0, gt=0, le=86_400)

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            raise ValueError("must be an http(s) URL without query or fragment, such as https://api.example.com")
        return value.rstrip("/")

    @field_validator("output_hosts")
    @classmethod
    def _hosts(cls, value: list[str]) -> list[str]:
        for host in value:
            if not host or "/" in host or " " in host:
                raise ValueError(f"{host!r} is not a host name or host:port")
        return [host.lower() for host in value]

    @field_validator("cents_per_second")
    @classmethod
    def _prices(cls, value: dict[str, float]) -> dict[str, float]:
        for resolution, cents in value.items():
            if not math.isfinite(cents) or cents < 0:
                raise ValueError(f"{resolution}: must be a number of cents >= 0")
        return value

    @model_validator(mode="after")
    def _defaults_and_prices(self) -> ProviderConfig:
        if not self.model:
            object.__setattr__(self, "model", DEFAULT_MODELS[self.kind])
        if self.kind in PRICED_BY_FILE:
            missing = [r for r in self.resolutions if r not in self.cents_per_second]
            if missing:
                raise ValueError(
                    f"cents_per_second: a {self.kind} provider's answers carry no cost, so its price per second "
                    f"is needed for every resolution it serves (missing {', '.join(missing)})"
                )
        return self

    @property
    def host(self) -> str:
        """The base_url's host[:port]: the only place a fal answer's URLs are followed to."""
        return urlsplit(self.base_url).netloc.lower()

    def serves_request(self, model_id: str, resolution: str, duration_s: int) -> bool:
        return model_id in self.serves and resolution in self.resolutions and duration_s <= self.max_duration

    def file_price_cents(self, resolution: str, duration_s: int) -> int | None:
        """cents_per_second x duration rounded up to a whole cent; None when the file sets no price."""
        per_second = next((c for r, c in self.cents_per_second.items() if r == resolution), None)
        if per_second is None:
            return None
        return budgets_service.per_second_cents(per_second, duration_s)

    def public(self) -> dict[str, Any]:
        """The settings an operator may see: everything but the key."""
        return self.model_dump(mode="json")


class Registry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    routing: Policy = "priority"
    providers: list[ProviderConfig] = Field(min_length=1)
    # Where it came from: the file's path, or None for the implicit provider of today's settings.
    source: str | None = None

    def get(self, name: str) -> ProviderConfig | None:
        for provider in self.providers:
            if provider.name == name:
                return provider
        return None

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.providers]


def implicit_registry(settings: Settings) -> Registry:
    """No file: VIDGATE_UPSTREAM_BASE_URL and VIDGATE_UPSTREAM_API_KEY as one provider, as before."""
    provider = ProviderConfig(
        name="vibedream",
        kind="vibedream",
        base_url=settings.upstream_base_url,
        api_key=settings.upstream_api_key,
        serves=list(settings.allowed_models),
        output_hosts=list(settings.output_hosts),
        failure_threshold=None,
    )
    return Registry(routing="priority", providers=[provider], source=None)


def _location(raw: Any, loc: tuple[int | str, ...]) -> tuple[str, str]:
    """(`provider 'name'` or `providers[i]` or `routing`, the field path) for one pydantic error."""
    if not loc:
        return "file", "(top level)"
    if loc[0] == "providers" and len(loc) >= 2 and isinstance(loc[1], int):
        index = loc[1]
        entries = raw.get("providers") if isinstance(raw, dict) else None
        name = None
        if isinstance(entries, list) and index < len(entries) and isinstance(entries[index], dict):
            name = entries[index].get("name")
        who = f"provider {name!r}" if isinstance(name, str) and name else f"providers[{index}]"
        field = ".".join(str(part) for part in loc[2:]) or "(entry)"
        return who, field
    return "file", ".".join(str(part) for part in loc)


def parse_registry(text: str, source: str, environ: dict[str, str] | None = None, *, sandbox: bool = False) -> Registry:
    """The registry a providers file describes, or ProvidersFileError listing every mistake, one per line.
    In sandbox mode keys are not needed (the simulator answers; no key is ever sent to it)."""
    environ = dict(os.environ) if environ is None else environ
    prefix = f"providers file {source}"
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProvidersFileError([f"{prefix}: does not parse as TOML: {exc}"]) from exc
    lines: list[str] = []
    try:
        registry = Registry.model_validate({**raw, "source": source})
    except ValidationError as exc:
        for error in exc.errors():
            who, field = _location(raw, tuple(error["loc"]))
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] == "literal_error" and field == "kind":
                message = f"unknown kind {error['input']!r}: must be one of {', '.join(KINDS)}"
            if error["type"] == "string_pattern_mismatch" and field == "name":
                message = f"{error['input']!r} must match [a-z0-9-]{{1,32}}"
            lines.append(f"{prefix}: {who}: {field}: {message}")
        raise ProvidersFileError(lines) from exc
    seen: set[str] = set()
    providers: list[ProviderConfig] = []
    for provider in registry.providers:
        if provider.name in seen:
            lines.append(f"{prefix}: provider {provider.name!r}: name: repeated (names must be unique)")
        seen.add(provider.name)
        key: SecretStr | None = None
        if provider.api_key_env is None:
            if not sandbox:
                lines.append(
                    f"{prefix}: provider {provider.name!r}: api_key_env: missing (the variable holding its key)"
                )
        else:
            value = environ.get(provider.api_key_env, "")
            if value:
                key = SecretStr(value)
            elif not sandbox:
                lines.append(
                    f"{prefix}: provider {provider.name!r}: api_key_env: the variable {provider.api_key_env} is not set"
                )
        providers.append(provider.model_copy(update={"api_key": key}))
    if lines:
        raise ProvidersFileError(lines)
    return registry.model_copy(update={"providers": providers})


def load_registry(settings: Settings, environ: dict[str, str] | None = None) -> Registry:
    """The registry this process routes by (raises ProvidersFileError when the file cannot be used)."""
    path = settings.providers_file
    if path is None:
        return implicit_registry(settings)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ProvidersFileError([f"providers file {path}: cannot be read: {exc}"]) from exc
    return parse_registry(text, str(path), environ, sandbox=settings.sandbox)


def startup_refusal(settings: Settings) -> str | None:
    """Why `serve`/`worker` must not start with this providers setup (one line per mistake), or None.
    With a file, each provider's key comes from its api_key_env, so VIDGATE_UPSTREAM_API_KEY is not needed."""
    try:
        load_registry(settings)
    except ProvidersFileError as exc:
        return str(exc)
    return None


def needs_upstream_key(settings: Settings) -> bool:
    """Only the implicit provider reads VIDGATE_UPSTREAM_API_KEY."""
    return settings.providers_file is None and not secret_given(settings.upstream_api_key)
