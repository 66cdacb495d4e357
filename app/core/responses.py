from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response


def _default(value: Any) -> Any:
    if hasattr(value, "isoformat"):
        return value.isoformat().replace("+00:00", "Z")
    raise TypeError(f"cannot serialize {type(value).__name__}")


def json_response(content: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    """orjson straight to bytes: the hot read and submit paths skip a second pydantic pass."""
    return Response(orjson.dumps(content, default=_default), status_code, headers, media_type="application/json")
