"""Health, readiness, metrics, and the sandbox's video file."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.core.database import transaction
from app.core.errors import DatabaseUnavailable, NotFound
from app.core.migrate import current_revision, head_revision
from app.core.responses import json_response
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


@router.get("/metrics", summary="Prometheus metrics of this process", include_in_schema=False)
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


@router.get("/sandbox/outputs/{name}", include_in_schema=False)
async def sandbox_output(runtime: RuntimeDep, name: str) -> Response:
    if not runtime.settings.sandbox:
        raise NotFound("Sandbox outputs exist only in sandbox mode.")
    return FileResponse(SANDBOX_MP4, media_type="video/mp4")
