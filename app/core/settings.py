"""Every setting of the gateway, read from the environment (prefix VIDGATE_)."""

from __future__ import annotations

import json
import os
from functools import lru_cache
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def default_data_dir() -> Path:
    """`data/` of the checkout when run from one; for an installed package (where this file sits in
    site-packages) the user's data directory, as the XDG base-directory convention places it."""
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file():
        return checkout / "data"
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "vidgate"


SANDBOX_ADMIN_TOKEN = "sandbox-admin-token"  # noqa: S105 - only ever accepted in sandbox mode
# Operator and metrics tokens shorter than this are refused at start: a token is guessed offline-fast
# only if short, and the throttle (app/admin/throttle.py) is per process.
MIN_TOKEN_LENGTH = 32


def secret_given(value: SecretStr | None) -> bool:
    return value is not None and bool(value.get_secret_value())


def normalize_database_url(url: str) -> str:
    """Accept the URLs people paste and pick the async drivers the gateway needs."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url.removeprefix("postgres://")
    if url.startswith("postgresql://"):
        return "postgresql+asyncpg://" + url.removeprefix("postgresql://")
    if url.startswith("sqlite:///"):
        return "sqlite+aiosqlite:///" + url.removeprefix("sqlite:///")
    return url


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VIDGATE_", env_file=".env", extra="ignore", populate_by_name=True)

    # Where the default SQLite file (and other local state) lives; see default_data_dir().
    data_dir: Path = Field(default_factory=default_data_dir)
    database_url: str = ""  # empty: the SQLite file vidgate.db in data_dir
    # PostgreSQL connections per process, all opened on demand and kept (no overflow: overflow
    # connections churn exactly when load is highest). Processes x this must stay under max_connections.
    database_pool_size: int = Field(default=40, ge=1, le=1000)
    # Set when VIDGATE_DATABASE_URL points at a transaction pooler (PgBouncer): what needs a session of its
    # own (LISTEN, migrations) connects here, and the pooled connections use no named prepared statement
    # across transactions (README, "Behind PgBouncer").
    database_direct_url: str | None = None
    # The key check is served from memory (app/tenants/cache.py). A key revoke or tenant change reaches
    # every process at once (NOTIFY on PostgreSQL, a marker file on SQLite); this TTL is the backstop.
    key_cache_ttl_s: float = Field(default=5.0, ge=0)
    # How often a serving process writes its keys' lastUsedAt (noted in memory per request).
    key_last_used_flush_s: float = Field(default=30.0, gt=0)
    # How old the balance behind X-Budget-Remaining-Cents on a submit's answer may be (other processes'
    # charges and refunds show up after at most this long; this process's own charges at once).
    balance_ttl_s: float = Field(default=1.0, ge=0)
    upstream_base_url: str = "https://api.vibedream.ai"
    upstream_api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("VIDGATE_UPSTREAM_API_KEY", "VIBEDREAM_API_KEY")
    )
    upstream_timeout_s: float = 30.0
    # SPEC §11: a TOML file of providers; without it the two settings above make the one provider.
    providers_file: Path | None = None
    admin_token: SecretStr | None = None
    metrics_token: SecretStr | None = None
    # Asked for, never implied (`vidgate serve --sandbox`): a built-in simulator answers instead of the vendor.
    sandbox: bool = False
    # Signs the dashboard's session cookies; without it, a key derived from the admin token does.
    session_secret: SecretStr | None = None
    session_ttl_s: float = Field(default=8 * 3600.0, gt=0)
    public_base_url: str | None = None
    # Direct peers whose X-Forwarded-Proto and X-Forwarded-Host are believed (IPs or CIDRs, comma-separated).
    trusted_proxies: Annotated[list[IPv4Network | IPv6Network], NoDecode] = []
    allowed_models: Annotated[list[str], NoDecode] = ["ltx-2-19b"]

    run_worker: bool = True
    # `serve` runs its worker as a child process (`vidgate worker`) at this much lower CPU priority, so
    # poll bursts never hold the requests' event loop or CPU (bench/experiments/worker-process). False:
    # as tasks in the serving process, as before. Sandbox mode always keeps it in-process.
    worker_process: bool = True
    worker_nice: int = Field(default=10, ge=0, le=19)
    worker_concurrency: int = 256  # bench/FINDINGS.md: 64 capped polling at ~320/s
    poll_interval_s: float = 1.5
    poll_batch_size: int = 200
    lease_s: float = 15.0
    prediction_max_age_s: float = 3600.0
    submit_recovery_s: float = 120.0
    # A prediction waiting in the fair queue longer than this ends failed, its hold released (SPEC §12).
    queue_max_wait_s: float = Field(default=3600.0, gt=0)

    price_table: Annotated[dict[str, dict[str, float]], NoDecode] = {}
    keep_failed_charge: bool = True
    idempotency_ttl_s: float = 24 * 3600.0
    prefer_wait_max_s: float = 60.0

    webhook_allow_private: bool = False
    webhook_timeout_s: float = 15.0
    webhook_retry_schedule_s: Annotated[list[float], NoDecode] = [0, 5, 300, 1800, 7200, 18000, 36000, 36000]
    webhook_concurrency: int = 64
    webhook_per_endpoint_concurrency: int = 16  # bench/FINDINGS.md: 4 capped a receiver at ~100/s
    webhook_secret_grace_s: float = 24 * 3600.0

    # SPEC section 8: outputs are copied into our own store before a prediction becomes completed.
    rehost_outputs: bool = True
    # Empty: a directory under the data directory. Else a local path or s3://bucket/prefix.
    outputs_store: str = ""
    # S3-compatible endpoint (MinIO, R2, ...); credentials and region come from the usual AWS_* variables.
    outputs_s3_endpoint_url: str | None = None
    output_hosts: Annotated[list[str], NoDecode] = ["assets.vibedream.ai"]
    output_max_bytes: int = Field(default=4 * 1024**3, ge=1)
    output_copy_max_s: float = Field(default=1800.0, gt=0)
    # A vendor connection that sends nothing for this long is a stalled copy (retried).
    output_read_timeout_s: float = Field(default=30.0, gt=0)
    # Downloads at once of outputs larger than SMALL_OUTPUT_BYTES (1 MiB) or of unknown size: they bound
    # the memory copies take (up to 1 MiB each before a local write, two 8 MiB parts each to S3).
    output_copy_concurrency: int = Field(default=8, ge=1)
    # Downloads at once, besides those, of outputs that declare at most 1 MiB: a burst of small outputs
    # is copied many at a time (bench/burst.md) while the large ones stay bounded as above.
    output_copy_small_concurrency: int = Field(default=64, ge=0)
    output_url_ttl_s: int = Field(default=7 * 24 * 3600, ge=60)
    output_signing_key: SecretStr | None = None
    output_retention_days: int = Field(default=30, ge=1, le=36500)

    sandbox_completion_s: float = 6.0
    sandbox_failure_ratio: float = 0.0
    sandbox_estimated_time: str = "5-20s"

    # Graceful stop (SPEC §6): after SIGTERM, /readyz answers 503 and requests are still served for the
    # drain, so a load balancer takes the process out; everything has ended within the grace.
    shutdown_drain_s: float = Field(default=5.0, ge=0, le=600)
    shutdown_grace_s: float = Field(default=30.0, gt=0, le=3600)
    # API requests in flight at once per process; beyond it, 503 `overloaded` at once. Default: four per
    # pooled database connection (app/core/lifecycle.py).
    max_inflight_requests: int | None = Field(default=None, ge=1, le=100_000)
    # Slow clients (app/core/server.py): a request's head must arrive within this many seconds of its first
    # byte (or of the connection, for a first request), its body within the body timeout after the head.
    client_header_timeout_s: float = Field(default=10.0, gt=0, le=600)
    client_body_timeout_s: float = Field(default=30.0, gt=0, le=3600)

    log_level: str = "INFO"
    log_json: bool = True

    @field_validator("database_url")
    @classmethod
    def _driver(cls, value: str) -> str:
        return normalize_database_url(value)

    @field_validator("database_direct_url")
    @classmethod
    def _direct_driver(cls, value: str | None) -> str | None:
        return normalize_database_url(value) if value else None

    @field_validator("allowed_models", mode="before")
    @classmethod
    def _models(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("output_hosts", mode="before")
    @classmethod
    def _output_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip().lower() for part in value.split(",") if part.strip()]
        return value

    @field_validator("providers_file", mode="before")
    @classmethod
    def _providers_file(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("outputs_store")
    @classmethod
    def _outputs_store(cls, value: str) -> str:
        value = value.strip()
        if "://" in value and not value.startswith(("s3://", "file://")):
            raise ValueError("must be a directory, file:///path or s3://bucket/prefix")
        if value.startswith("s3://") and not value.removeprefix("s3://").strip("/"):
            raise ValueError("s3:// needs a bucket name, such as s3://vidgate-outputs/prod")
        return value

    @field_validator("public_base_url")
    @classmethod
    def _public_base_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            raise ValueError("must be an http(s) URL without query or fragment, such as https://vidgate.example.com")
        return value.rstrip("/")

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _proxies(cls, value: object) -> object:
        if isinstance(value, str):
            return [ip_network(part.strip(), strict=False) for part in value.split(",") if part.strip()]
        return value

    @field_validator("webhook_retry_schedule_s", mode="before")
    @classmethod
    def _schedule(cls, value: object) -> object:
        if isinstance(value, str):
            return [float(part) for part in value.split(",") if part.strip()]
        return value

    @field_validator("price_table", mode="before")
    @classmethod
    def _prices(cls, value: object) -> object:
        if isinstance(value, str):
            return json.loads(value) if value.strip() else {}
        return value

    @model_validator(mode="after")
    def _default_database(self) -> Settings:
        if not self.database_url:
            self.database_url = normalize_database_url(f"sqlite:///{self.data_dir.resolve() / 'vidgate.db'}")
        return self

    @model_validator(mode="after")
    def _recovery_outlives_upstream_calls(self) -> Settings:
        # A hold is only recovered once its upstream call cannot still be running.
        if self.submit_recovery_s <= self.upstream_timeout_s + 5:
            raise ValueError("VIDGATE_SUBMIT_RECOVERY_S must exceed VIDGATE_UPSTREAM_TIMEOUT_S by more than 5 s")
        return self

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def database_pooled(self) -> bool:
        """VIDGATE_DATABASE_URL is a transaction pooler: said by giving the direct URL beside it."""
        return self.database_direct_url is not None and not self.is_sqlite

    @property
    def database_session_url(self) -> str:
        """Where a connection that needs a session of its own (LISTEN, migrations) goes."""
        return self.database_direct_url or self.database_url

    @property
    def inflight_limit(self) -> int:
        return self.max_inflight_requests or 4 * self.database_pool_size

    def startup_refusal(self, role: Literal["serve", "worker"]) -> str | None:
        """Why a `serve` or `worker` process must not start with these settings (one line), or None.
        Fail closed: a forgotten variable stops the process instead of opening it up."""
        for name, token in (("ADMIN", self.admin_token), ("METRICS", self.metrics_token)):
            value = token.get_secret_value() if token is not None else ""
            if value and len(value) < MIN_TOKEN_LENGTH and not (self.sandbox and value == SANDBOX_ADMIN_TOKEN):
                return (
                    f"VIDGATE_{name}_TOKEN is {len(value)} characters: use at least {MIN_TOKEN_LENGTH} random ones "
                    "(e.g. `openssl rand -hex 32`)."
                )
        if self.sandbox:
            return None
        if self.providers_file is None and not secret_given(self.upstream_api_key):
            return (
                "VIDGATE_UPSTREAM_API_KEY (or VIBEDREAM_API_KEY) is not set: set the vendor key, "
                "or run `vidgate serve --sandbox` to try the gateway against its built-in simulator."
            )
        if role == "serve" and not secret_given(self.admin_token):
            return "VIDGATE_ADMIN_TOKEN is not set: the operator API would be open. Set it to a long random string."
        if self.rehost_outputs and not (secret_given(self.output_signing_key) or secret_given(self.admin_token)):
            return (
                "VIDGATE_OUTPUT_SIGNING_KEY is not set (nor VIDGATE_ADMIN_TOKEN to derive it from): output links "
                "could not be signed. Set it to a long random string, the same in every process."
            )
        for name, token in (("ADMIN", self.admin_token), ("METRICS", self.metrics_token)):
            if token is not None and token.get_secret_value() == SANDBOX_ADMIN_TOKEN:
                return f"VIDGATE_{name}_TOKEN is the publicly documented sandbox token: set a long random string."
        return None


@lru_cache
def get_settings() -> Settings:
    return Settings()
