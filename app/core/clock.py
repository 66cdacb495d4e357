"""The gateway's notion of "now", in one place so tests can move it (period roll-over)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

_offset = timedelta(0)


def now() -> datetime:
    return datetime.now(UTC) + _offset


def shift_to(moment: datetime) -> None:
    """Make now() return `moment` at this instant; time keeps running from there."""
    global _offset
    _offset = moment - datetime.now(UTC)


def reset() -> None:
    global _offset
    _offset = timedelta(0)
