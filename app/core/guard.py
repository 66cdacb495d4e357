"""The request guard: what is refused before routing, so it costs nothing and needs no API key (SPEC §2).

- A body over `MAX_BODY_BYTES` answers 413 `payload_too_large`: from `Content-Length` before a byte of
  it is read, and while a chunked body streams in as soon as the limit is passed. The answer closes the
  connection, so the server does not read (and discard) the rest either.
- Headers of absurd length answer 431 `headers_too_large`, naming the header.

The rules live here; app/core/middleware.py applies them (to the headers, and to the body as it streams in).
"""

from __future__ import annotations

import orjson
from starlette.types import Send

from app.core.errors import AppError, InvalidRequest

MAX_BODY_BYTES = 64 * 1024
MAX_HEADER_BYTES = 8 * 1024  # one header's value
MAX_HEADERS_BYTES = 32 * 1024  # all names and values together
MAX_HEADERS = 100


class PayloadTooLarge(AppError):
    status = 413
    code = "payload_too_large"
    title = "Request body too large"


class HeadersTooLarge(AppError):
    status = 431
    code = "headers_too_large"
    title = "Request headers too large"


def too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"A request body may hold at most {limit} bytes.", limit=limit, field="body")


def check_headers(headers: list[tuple[bytes, bytes]], body_limit: int) -> AppError | None:
    if len(headers) > MAX_HEADERS:
        return HeadersTooLarge(f"Send at most {MAX_HEADERS} headers.", field="headers", limit=MAX_HEADERS)
    total = 0
    for name, value in headers:
        if len(value) > MAX_HEADER_BYTES:
            field = name.decode("latin-1")
            return HeadersTooLarge(
                f"{field}: a header value may hold at most {MAX_HEADER_BYTES} bytes.",
                field=field,
                limit=MAX_HEADER_BYTES,
            )
        total += len(name) + len(value)
    if total > MAX_HEADERS_BYTES:
        return HeadersTooLarge(
            f"All headers together may hold at most {MAX_HEADERS_BYTES} bytes.",
            field="headers",
            limit=MAX_HEADERS_BYTES,
        )
    for name, value in headers:
        if name == b"content-length":
            if not value.isdigit():
                return InvalidRequest("Content-Length must be a number of bytes.", field="Content-Length")
            if int(value) > body_limit:
                return too_large(body_limit)
    return None


async def refuse(send: Send, error: AppError, *, close: bool = True) -> None:
    body = orjson.dumps(error.body())
    headers = [
        (b"content-type", b"application/problem+json"),
        (b"content-length", str(len(body)).encode()),
        *((name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in error.headers.items()),
    ]
    if close:
        # The rest of the request is not read: the connection cannot carry another one.
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
