"""Prometheus metric families.

One process exposes its own at /metrics. Under `vidgate serve --workers N`, `serve` points
PROMETHEUS_MULTIPROC_DIR at a fresh directory before the workers start: each process then writes its
values to files there, and a scrape (answered by any one worker) merges every process's files.
Gauges say how to merge: the sampled ones hold the same database figure in every process, so the most
recently written value is the answer.
"""

from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300)

REQUESTS = Counter("vidgate_http_requests_total", "HTTP requests served", ["route", "method", "status"])
REQUEST_LATENCY = Histogram("vidgate_http_request_seconds", "HTTP request latency", ["route"])
UPSTREAM_LATENCY = Histogram(
    "vidgate_upstream_request_seconds",
    "Upstream call latency by outcome (status, timeout, error)",
    ["op", "outcome"],
)
UPSTREAM_ERRORS = Counter("vidgate_upstream_errors_total", "Upstream calls that failed", ["op", "kind"])
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


def exposition() -> tuple[bytes, str]:
    """The scrape: this process's families, or every process's when running several (see above)."""
    directory = os.environ.get(MULTIPROC_DIR_ENV)
    if not directory:
        return generate_latest(), CONTENT_TYPE_LATEST
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    return generate_latest(registry), CONTENT_TYPE_LATEST
