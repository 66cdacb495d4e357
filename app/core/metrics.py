"""Prometheus metric families. Each process exposes its own at /metrics."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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
IN_FLIGHT = Gauge("vidgate_predictions_in_flight", "Predictions not yet terminal (sampled from the database)")
POLL_LAG = Histogram("vidgate_poll_lag_seconds", "Due time to actual upstream poll", buckets=LAG_BUCKETS)
NOTIFICATION_LAG = Histogram(
    "vidgate_notification_lag_seconds",
    "Upstream terminal state seen to webhook delivered",
    buckets=LAG_BUCKETS,
)
WEBHOOK_ATTEMPTS = Counter("vidgate_webhook_attempts_total", "Webhook delivery attempts", ["outcome"])
BUDGET_REFUSALS = Counter("vidgate_budget_refusals_total", "Submits refused by a limit", ["code"])
RESERVED_CENTS = Gauge("vidgate_reserved_cents", "Cents held this period (sampled)", ["tenant"])
SPENT_CENTS = Gauge("vidgate_spent_cents", "Cents spent this period (sampled)", ["tenant"])
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
