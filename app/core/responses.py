from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson
from starlette.responses import Response

from app.core import clock


def json_default(value: Any) -> Any:
    """orjson's hook for what it does not write itself; datetimes come here too (passed through), so
    every moment is written by clock.iso."""
    if isinstance(value, datetime):
        return clock.iso(value)
    raise TypeError(f"cannot serialize {type(value).__name__}")


def dumps(content: Any, option: int = 0) -> bytes:
    return orjson.dumps(content, default=json_default, option=option | orjson.OPT_PASSTHROUGH_DATETIME)


def json_response(content: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    """orjson straight to bytes: the hot read and submit paths skip a second pydantic pass."""
    return json_bytes_response(dumps(content), status_code, headers)


def json_bytes_response(body: bytes, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(body, status_code, headers, media_type="application/json")
