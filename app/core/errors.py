"""One error hierarchy, rendered as application/problem+json (RFC 9457) by one set of handlers."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

log = logging.getLogger("vidgate.errors")

PROBLEM_BASE = "https://vidgate.dev/problems/"


class AppError(Exception):
    status: int = 400
    code: str = "bad_request"
    title: str = "Bad request"

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None, **fields: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}
        self.fields = fields

    def body(self) -> dict[str, Any]:
        return {
            "type": PROBLEM_BASE + self.code,
            "title": self.title,
            "status": self.status,
            "code": self.code,
            "detail": self.detail,
            **self.fields,
        }


class InvalidRequest(AppError):
    status = 422
    code = "validation_error"
    title = "The request is not valid"


class Unauthorized(AppError):
    status = 401
    code = "invalid_api_key"
    title = "Missing, unknown or revoked API key"

    def __init__(self, detail: str, **fields: Any) -> None:
        super().__init__(detail, headers={"WWW-Authenticate": "Bearer"}, **fields)


class NotFound(AppError):
    status = 404
    code = "not_found"
    title = "Not found"


class Conflict(AppError):
    status = 409
    code = "conflict"
    title = "Conflict"


class ServiceUnavailable(AppError):
    status = 503
    code = "service_unavailable"
    title = "Service unavailable"


DATABASE_RETRY_AFTER_S = 2


class DatabaseUnavailable(ServiceUnavailable):
    """The database could not be reached: an outage, not a fault of the request (raised by
    `app.core.database.transaction`, which tells the two apart)."""

    code = "database_unavailable"
    title = "The gateway's database is unreachable"

    def __init__(self, detail: str | None = None, **fields: Any) -> None:
        super().__init__(
            detail or "The gateway's database is unreachable for a moment; retry shortly.",
            headers={"Retry-After": str(DATABASE_RETRY_AFTER_S)},
            **fields,
        )


def problem_response(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/problem+json", headers=headers)


def _field_path(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


# An enum member's repr in a message (`<PredictionStatus.PROCESSING: 'processing'>`): callers see the value.
_ENUM_REPR = re.compile(r"<\w+\.\w+: ('[^']*'|-?\d+)>")


def validation_problem(raw_errors: Sequence[Any]) -> InvalidRequest:
    """Pydantic's errors as one problem: the first names the field; all are listed."""
    errors = [
        {
            "field": _field_path(tuple(err.get("loc", ()))),
            "message": _ENUM_REPR.sub(r"\1", str(err.get("msg", "invalid")).removeprefix("Value error, ")),
        }
        for err in raw_errors
    ]
    first = errors[0] if errors else {"field": "body", "message": "invalid"}
    return InvalidRequest(f"{first['field']}: {first['message']}", field=first["field"], errors=errors)


def app_error_response(exc: AppError) -> Response:
    return problem_response(exc.status, exc.body(), exc.headers)


def validation_error_response(raw_errors: Sequence[Any]) -> Response:
    error = validation_problem(raw_errors)
    return problem_response(error.status, error.body())


def http_error_response(status: int, detail: Any, headers: Mapping[str, str] | None = None) -> Response:
    """What the framework itself refuses (no such route, a method not allowed, a body it cannot parse)."""
    codes = {404: "not_found", 405: "method_not_allowed"}
    code = codes.get(status, "http_error")
    detail = detail if isinstance(detail, str) else "request failed"
    if status == 404:
        detail = "No such route. See /openapi.json for the API."
    body = {
        "type": PROBLEM_BASE + code,
        "title": detail,
        "status": status,
        "code": code,
        "detail": detail,
    }
    return problem_response(status, body, dict(headers or {}))


# The bare routes (app/predictions/hot.py) render what they raise with the functions below too: one
# renderer for each kind of error, whichever way the request was routed.
def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(AppError)
    async def _app_error(_request: Request, exc: AppError) -> Response:
        return app_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> Response:
        return validation_error_response(exc.errors())

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> Response:
        return http_error_response(exc.status_code, exc.detail, exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        # Log the type and route only: exception text may carry URLs or secrets.
        log.error(
            "unhandled error",
            extra={"error_type": type(exc).__name__, "path": request.url.path},
        )
        body = {
            "type": PROBLEM_BASE + "internal_error",
            "title": "Internal error",
            "status": 500,
            "code": "internal_error",
            "detail": "The gateway failed unexpectedly. Retry the request with the same Idempotency-Key.",
        }
        return problem_response(500, body)
