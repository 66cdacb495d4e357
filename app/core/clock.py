"""The gateway's notion of "now", in one place so tests can move it (period roll-over), and the one
way a moment is written: the vendor's form, ISO 8601 in UTC with exactly three fractional digits and Z
(`2025-01-15T12:00:00.000Z`), so callers parse our answers with the code they use for the vendor's."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, overload

from pydantic import AfterValidator, PlainSerializer

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


@overload
def iso(moment: datetime) -> str: ...
@overload
def iso(moment: None) -> None: ...
def iso(moment: datetime | None) -> str | None:
    """`2025-01-15T12:00:00.000Z`. Milliseconds are what the vendor writes: a vendor moment read
    and written again comes back unchanged, and ours never carry more digits than theirs."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        raise ValueError("a naive datetime has no defined moment; the gateway keeps every moment in UTC")
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _as_utc(moment: datetime) -> datetime:
    # A vendor moment without an offset is taken as UTC, as the vendor documents every moment in UTC.
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


# Every datetime field of a pydantic model the gateway reads or writes: parsed into UTC, written by iso().
Timestamp = Annotated[datetime, AfterValidator(_as_utc), PlainSerializer(iso, return_type=str, when_used="json")]
