"""When to retry, and how long to wait: shared by the sync and the async client."""

from __future__ import annotations

import email.utils
import random
import time
from datetime import UTC
from typing import Any

import httpx

from vidgate_client.errors import VidgateError, error_for

BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 8.0
RETRY_AFTER_CAP_S = 60.0  # a Retry-After beyond this is honoured as this much, then asked again
RETRYABLE_STATUS = frozenset({429, 502, 503, 504})

# No answer, or an answer cut short: the request may or may not have reached the gateway. Safe to
# repeat because every generate carries one Idempotency-Key on all its attempts; reads are safe anyway.
RETRYABLE_TRANSPORT = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After in either form of RFC 9110: delay-seconds or an HTTP-date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, moment.timestamp() - (time.time() if now is None else now))


def backoff_s(attempt: int, retry_after: float | None) -> float:
    """Capped exponential back-off with jitter (so many clients do not retry in step), never sooner
    than the gateway's Retry-After."""
    delay: float = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2.0**attempt) * random.uniform(0.5, 1.0)
    if retry_after is not None:
        delay = max(delay, min(retry_after, RETRY_AFTER_CAP_S))
    return delay


def problem_of(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def is_retryable(response: httpx.Response) -> bool:
    if response.status_code in RETRYABLE_STATUS:
        return True
    # 409 only for "the same key is still in flight": its answer will be there in a moment.
    return response.status_code == 409 and problem_of(response).get("code") == "idempotency_key_in_flight"


def error_from(response: httpx.Response) -> VidgateError:
    return error_for(response.status_code, problem_of(response), parse_retry_after(response.headers.get("Retry-After")))
