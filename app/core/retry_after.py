"""Retry-After (RFC 9110 section 10.2.3), read and written in one place."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

# A longer wait than this is read as this: a hostile or broken header must not park work for years
# (or overflow a datetime).
LONGEST_S = 24 * 3600.0


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait, from delta-seconds (`120`) or an HTTP-date (`Wed, 21 Oct 2015 07:28:00 GMT`);
    None when absent or not either form. A date in the past means now (0)."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return min(float(value), LONGEST_S)
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return min(max((moment - now).total_seconds(), 0.0), LONGEST_S)


def retry_after_value(seconds: float) -> str:
    """The delta-seconds form we send: whole seconds, rounded up so a client never comes back early."""
    return str(max(math.ceil(seconds), 0))
