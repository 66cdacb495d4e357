"""Prometheus metric families.

One process exposes its own at /metrics. Under `vidgate serve --workers N`, `serve` points
PROMETHEUS_MULTIPROC_DIR at a fresh directory before the workers start: each process then writes its
values to files there, and a scrape (answered by any one worker) merges every process's files.
Gauges say how to merge: the sampled ones hold the same database figure in every process, so the most
recently written value is the answer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300)

REQUESTS = Counter("vidgate_http_requests_total", "HTTP requests served", ["route", "method", "status"])
REQUEST_LATENCY = Histogram("vidgate_http_request_seconds", "HTTP request latency", ["route"])
# One series per provider (SPEC §11): its `_count` is the number of calls by provider, op and outcome.
UPSTREAM_LATENCY = Histogram(
    "vidgate_upstream_request_seconds",
    "Upstream call latency by provider, op (submit, poll, result) and outcome (HTTP status, timeout, "
    "connection_error, error)",
    ["provider", "op", "outcome"],
)
UPSTREAM_ERRORS = Counter("vidgate_upstream_errors_total", "Upstream calls that failed", ["provider", "op", "kind"])
POLLS_PER_PREDICTION = Histogram(
    "vidgate_upstream_polls_per_prediction",
    "Upstream polls a prediction needed",
    buckets=(1, 2, 3, 5, 8, 13, 21, 50, 100),
)
IN_FLIGHT = Gauge(
    "vidgate_predictions_in_flight",
    "Predictions not yet terminal (sampled from the database)",
    multiprocess_mode="mostrecent",
)
POLL_LAG = Histogram("vidgate_poll_lag_seconds", "Due time to actual upstream poll", buckets=LAG_BUCKETS)
NOTIFICATION_LAG = Histogram(
    "vidgate_notification_lag_seconds",
    "Upstream terminal state seen to webhook delivered",
    buckets=LAG_BUCKETS,
)
WEBHOOK_ATTEMPTS = Counter("vidgate_webhook_attempts_total", "Webhook delivery attempts", ["outcome"])
BUDGET_REFUSALS = Counter("vidgate_budget_refusals_total", "Submits refused by a limit", ["code"])
RESERVED_CENTS = Gauge(
    "vidgate_reserved_cents", "Cents held this period (sampled)", ["tenant"], multiprocess_mode="mostrecent"
)
SPENT_CENTS = Gauge(
    "vidgate_spent_cents", "Cents spent this period (sampled)", ["tenant"], multiprocess_mode="mostrecent"
)
PREDICTIONS_FINISHED = Counter("vidgate_predictions_finished_total", "Predictions that ended", ["status"])
OUTPUT_COPIES = Counter(
    "vidgate_output_copy_attempts_total", "Attempts to copy a prediction's outputs", ["outcome"]
)  # stored, retried, failed, lease_lost
OUTPUT_BYTES = Counter("vidgate_output_bytes_stored_total", "Bytes of outputs written to the store")
# Counted at the driver (app/core/timing.py), so a benchmark can report statements per request without
# pg_stat_statements; BEGIN and COMMIT are not statements here.
DB_STATEMENTS = Counter("vidgate_db_statements_total", "SQL statements this process sent to the database")
LEDGER_BATCH_SIZE = Histogram(
    "vidgate_ledger_batch_size",
    "Items one ledger writer transaction applied",
    ["op"],  # hold | settle | release | finish
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)

QUEUE_DEPTH = Gauge(
    "vidgate_queue_depth",
    "Predictions waiting in the fair queue (sampled from the database)",
    ["tenant"],
    multiprocess_mode="mostrecent",
)
QUEUE_WAIT = Histogram(
    "vidgate_queue_wait_seconds",
    "Queued to sent upstream (or ended), by outcome",
    ["outcome"],  # sent | failed | expired
    buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 1800, 3600),
)
QUEUE_DISPATCHES = Counter(
    "vidgate_queue_dispatches_total", "Dispatches from the fair queue by outcome", ["provider", "outcome"]
)  # accepted | requeued | refused | unknown


MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


@dataclass
class ProviderTally:
    """One provider's upstream calls since the last flush, in this process (app/providers/stats.py
    adds them to the database's daily rows, so the dashboard sees every replica's)."""

    submits: int = 0  # submit calls made, whatever their answer
    accepted: int = 0  # submit calls the provider took (2xx)
    throttled: int = 0  # 429 answers, any op
    errors: int = 0  # 5xx, 401/403, timeouts, refused connections and unreadable answers, any op
    submit_ms: float = 0.0  # summed latency of the submit calls
    polls: int = 0


# Swapped out whole by the flusher (`take_tallies`): nothing awaits between reading and replacing it.
_tallies: dict[str, ProviderTally] = {}


def _counts_as_error(outcome: str) -> bool:
    if not outcome.isdigit():
        return True  # timeout, connection_error, error
    status = int(outcome)
    return status >= 500 or status in (401, 403)


def observe_upstream(provider: str, op: str, outcome: str, elapsed_s: float) -> None:
    """Every upstream call, once: the latency histogram (labelled by provider) and the provider's tally."""
    UPSTREAM_LATENCY.labels(provider=provider, op=op, outcome=outcome).observe(elapsed_s)
    tally = _tallies.get(provider)
    if tally is None:
        tally = _tallies[provider] = ProviderTally()
    if op == "submit":
        tally.submits += 1
        tally.submit_ms += elapsed_s * 1000.0
        tally.accepted += outcome.startswith("2")
    elif op == "poll":
        tally.polls += 1
    if outcome == "429":
        tally.throttled += 1
    elif _counts_as_error(outcome):
        tally.errors += 1


def take_tallies() -> dict[str, ProviderTally]:
    """The tallies since the last call, handed over and reset (not awaited in between: no call is lost)."""
    global _tallies
    taken, _tallies = _tallies, {}
    return taken


def give_back_tallies(tallies: dict[str, ProviderTally]) -> None:
    """A flush that failed: its tallies join the next one's."""
    for provider, old in tallies.items():
        tally = _tallies.setdefault(provider, ProviderTally())
        tally.submits += old.submits
        tally.accepted += old.accepted
        tally.throttled += old.throttled
        tally.errors += old.errors
        tally.submit_ms += old.submit_ms
        tally.polls += old.polls


def exposition() -> tuple[bytes, str]:
    """The scrape: this process's families, or every process's when running several (see above)."""
    directory = os.environ.get(MULTIPROC_DIR_ENV)
    if not directory:
        return generate_latest(), CONTENT_TYPE_LATEST
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    return generate_latest(registry), CONTENT_TYPE_LATEST
