from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.types import Send

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


async def send_json_bytes(send: Send, body: bytes, headers: dict[str, str] | None = None) -> None:
    """json_bytes_response's 200 sent as two ASGI messages, for the bare routes (app/predictions/hot.py):
    the same headers in the same order, without a Response object and its header list built per answer."""
    raw = (
        [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]
        if headers
        else []
    )
    raw.append((b"content-length", str(len(body)).encode()))
    raw.append((b"content-type", b"application/json"))
    await send({"type": "http.response.start", "status": 200, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def etag_matches(header: str | None, etag: str) -> bool:
    """If-None-Match (RFC 9110 13.1.2): `*` or a list of tags, weak ones compared weakly."""
    if not header:
        return False
    if header.strip() == "*":
        return True
    return any(tag.strip().removeprefix("W/") == etag.removeprefix("W/") for tag in header.split(","))


def file_response(request: Request, path: Any, **options: Any) -> Response:
    """A FileResponse that answers If-None-Match with 304 (Starlette's sends its ETag and ignores it)."""
    response = FileResponse(path, stat_result=path.stat(), **options)
    if etag_matches(request.headers.get("if-none-match"), response.headers["etag"]):
        kept = {k: v for k, v in response.headers.items() if k in ("etag", "cache-control", "last-modified")}
        return Response(status_code=304, headers=kept)
    return response
