"""Constrained input types: what every body field, path, query and header parameter may hold, so that
anything the columns, the JSON encoder or the database's text type cannot take is a 422 naming the
field instead of a 500 from deep inside a query (SPEC §2: no input answers 5xx).

- `Line`: one line of text (names, ids, URLs, cursors, header values): no control character at all.
- `Text`: free text (the prompt, strings inside metadata): tab, newline and carriage return allowed.
  Neither may hold NUL (PostgreSQL text cannot) or a lone surrogate (UTF-8 cannot encode one).
- `Int32`: an integer that fits the INTEGER columns (every integer input has one); JSON booleans are not
  integers.
- `moment_bound()`: a `from`/`to` query parameter (a date or an ISO 8601 moment) as a UTC datetime, or
  a 422 for what the calendar cannot hold (the day after 9999-12-31, year 1 moved to UTC).
- `JsonObject`: a JSON object nested at most `JSON_MAX_DEPTH` levels, whose integers fit 64 bits and
  whose numbers are finite (Python's JSON parser reads `NaN` and `1e999`; no database stores them).
"""

from __future__ import annotations

import math
import re
from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated, Any

from annotated_types import Ge, Le
from pydantic import AfterValidator, Field, Strict

from app.core.errors import InvalidRequest

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
JSON_MAX_DEPTH = 32

# C0 and C1 controls, DEL, and lone surrogates. Patterns for the OpenAPI document (what a client can
# check before sending) and for the check itself.
_LINE_REFUSED = "\x00-\x1f\x7f-\x9f"
_TEXT_REFUSED = "\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f"
_SURROGATES = "\ud800-\udfff"
_NOT_LINE = re.compile(f"[{_LINE_REFUSED}{_SURROGATES}]")
_NOT_TEXT = re.compile(f"[{_TEXT_REFUSED}{_SURROGATES}]")


def _refuse(match: re.Match[str]) -> None:
    char = match.group()
    if char == "\x00":
        raise ValueError("must not contain NUL characters")
    if "\ud800" <= char <= "\udfff":
        raise ValueError("must not contain lone surrogates (not valid Unicode)")
    raise ValueError(f"must not contain control characters (found U+{ord(char):04X})")


def check_line(value: str) -> str:
    if (match := _NOT_LINE.search(value)) is not None:
        _refuse(match)
    return value


def check_text(value: str) -> str:
    if (match := _NOT_TEXT.search(value)) is not None:
        _refuse(match)
    return value


def _check_json(value: Any, depth: int) -> None:
    if depth > JSON_MAX_DEPTH:
        raise ValueError(f"must not nest deeper than {JSON_MAX_DEPTH} levels")
    if isinstance(value, dict):
        for key, item in value.items():
            check_text(key)
            _check_json(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_json(item, depth + 1)
    elif isinstance(value, str):
        check_text(value)
    elif isinstance(value, bool) or value is None:
        pass
    elif isinstance(value, int):
        if not INT64_MIN <= value <= INT64_MAX:
            raise ValueError("integers must fit in 64 bits (signed)")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("numbers must be finite (no NaN or Infinity)")
    else:
        raise ValueError("must be plain JSON")


def check_json_object(value: dict[str, Any]) -> dict[str, Any]:
    _check_json(value, 1)
    return value


Line = Annotated[str, AfterValidator(check_line), Field(json_schema_extra={"pattern": f"^[^{_LINE_REFUSED}]*$"})]
Text = Annotated[str, AfterValidator(check_text), Field(json_schema_extra={"pattern": f"^[^{_TEXT_REFUSED}]*$"})]
Int32 = Annotated[int, Strict(), Ge(INT32_MIN), Le(INT32_MAX)]
JsonObject = Annotated[dict[str, Any], AfterValidator(check_json_object)]


def moment_bound(value: str | None, field: str, *, end: bool) -> datetime | None:
    """A date (`2026-11-01`; as an end, that whole day is included) or a moment (offset-less: UTC)."""
    if not value:
        return None
    try:
        if len(value) == 10:
            return datetime.combine(date.fromisoformat(value) + timedelta(days=1 if end else 0), time(), UTC)
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        # In UTC here, where a year-1 moment with an offset overflows as a 422, not in the query.
        return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)
    except (ValueError, OverflowError) as exc:  # OverflowError: the day after 9999-12-31
        raise InvalidRequest(f"{field} must be a date (2026-11-01) or an ISO 8601 timestamp.", field=field) from exc
