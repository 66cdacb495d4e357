"""Health, readiness, metrics, and the sandbox's video file."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.admin import throttle
from app.admin.deps import is_admin_token
from app.core import metrics as app_metrics
from app.core.database import transaction
from app.core.errors import AppError, DatabaseUnavailable, NotFound
from app.core.migrate import current_revision, head_revision
from app.core.responses import file_response, json_response
from app.deps import RuntimeDep
from app.upstream.simulator import SANDBOX_MP4

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="The process is alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Database reachable, migrations at head, upstream reachable (or sandbox)")
async def readyz(runtime: RuntimeDep) -> Response:
    checks: dict[str, str] = {}
    try:
        async with transaction(runtime.sessions, readonly=True) as session:
            revision = await current_revision(await session.connection())
    except DatabaseUnavailable as exc:
        # Not ready, and said the way every route says it (anything else is a bug and stays a 500).
        raise DatabaseUnavailable(
            "The database is unreachable.",
            ready=False,
            checks={"database": f"unreachable ({type(exc.__cause__).__name__})", "migrations": "unknown"},
        ) from exc
    checks["database"] = "ok"
    checks["migrations"] = "ok" if revision == head_revision() else f"at {revision}, head is {head_revision()}"
    if runtime.settings.sandbox:
        checks["upstream"] = "sandbox"
    else:
        checks["upstream"] = "ok" if await runtime.upstream.ping() else "unreachable"
    ready = all(value in ("ok", "sandbox") for value in checks.values())
    return json_response({"ready": ready, "checks": checks}, status_code=200 if ready else 503)


class InvalidMetricsToken(AppError):
    status = 401
    code = "invalid_metrics_token"
    title = "Missing or wrong metrics token"


metrics_bearer = HTTPBearer(auto_error=False, scheme_name="MetricsToken", description="VIDGATE_METRICS_TOKEN")


async def require_metrics_reader(
    request: Request,
    runtime: RuntimeDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(metrics_bearer)],
) -> None:
    # The families carry every tenant id with its spend: open only in sandbox mode.
    settings = runtime.settings
    if settings.sandbox:
        return
    given = credentials.credentials if credentials else ""
    metrics_token = settings.metrics_token.get_secret_value() if settings.metrics_token else ""

    def accepts(token: str) -> bool:
        if metrics_token and hmac.compare_digest(token.encode(), metrics_token.encode()):
            return True
        return bool(token) and is_admin_token(settings, token)

    # The admin token opens /metrics too: guesses here count with those at /admin (app/admin/throttle.py).
    if throttle.checked(request, settings, given, accepts):
        return
    raise InvalidMetricsToken(
        "Send 'Authorization: Bearer <VIDGATE_METRICS_TOKEN>' (or the operator token).",
        headers={"WWW-Authenticate": "Bearer"},
    )


@router.get(
    "/metrics",
    summary="Prometheus metrics of this process (of all of them under serve --workers N)",
    include_in_schema=False,
    dependencies=[Depends(require_metrics_reader)],
)
async def metrics() -> Response:
    body, media_type = app_metrics.exposition()
    return Response(body, media_type=media_type)


@router.get("/sandbox/outputs/{name}", include_in_schema=False)
async def sandbox_output(request: Request, runtime: RuntimeDep, name: str) -> Response:
    if not runtime.settings.sandbox:
        raise NotFound("Sandbox outputs exist only in sandbox mode.")
    return file_response(request, SANDBOX_MP4, media_type="video/mp4")
