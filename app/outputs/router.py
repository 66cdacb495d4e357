"""Serving rehosted outputs at signed links (no API key: they go to browsers and players). The operator's
view of a prediction's outputs is an operator route (app/admin/router.py)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.responses import StreamingResponse

from app.core import clock
from app.core.responses import etag_matches
from app.deps import ReadSessionDep, RuntimeDep
from app.outputs import service
from app.outputs.store import open_store

router = APIRouter(tags=["outputs"])

PredictionId = Annotated[str, Path(alias="predictionId", max_length=40)]


@router.get(
    "/outputs/{predictionId}/{name}",
    summary="A rehosted output, at the signed link the prediction gave (HTTP Range supported)",
    response_class=Response,
)
@router.head("/outputs/{predictionId}/{name}", include_in_schema=False)
async def serve_output(
    request: Request,
    session: ReadSessionDep,
    runtime: RuntimeDep,
    prediction_id: PredictionId,
    name: Annotated[str, Path(max_length=40)],
    expires: Annotated[str | None, Query(max_length=20)] = None,
    sig: Annotated[str | None, Query(max_length=100)] = None,
) -> Response:
    settings = runtime.settings
    item = await service.servable(session, settings, prediction_id, name, expires, sig)
    remaining = max(item.expires - int(clock.now().timestamp()), 0)
    headers = {
        "Accept-Ranges": "bytes",
        "ETag": item.etag,
        # The link is the credential: only the player's own cache keeps the file, and not past expiry.
        "Cache-Control": f"private, max-age={remaining}",
        # Served from the gateway's own origin: never sniffed into a document, never run as one, and
        # saved under its own name when opened directly.
        "Content-Security-Policy": "sandbox; default-src 'none'",
        "Content-Disposition": f'inline; filename="{name}"',
    }
    if etag_matches(request.headers.get("if-none-match"), item.etag):
        return Response(status_code=304, headers=headers)
    wanted = service.parse_range(request.headers.get("range"), item.size)
    if_range = request.headers.get("if-range")
    if wanted is not None and if_range is not None and if_range != item.etag:
        wanted = None  # the caller's partial copy is of another version: send it all
    start, end = wanted or (0, item.size)
    status = 206 if wanted is not None else 200
    if wanted is not None:
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{item.size}"
    headers["Content-Length"] = str(end - start)
    if request.method == "HEAD" or end == start:
        return Response(status_code=status, headers=headers, media_type=item.content_type)
    store = open_store(settings)
    return StreamingResponse(
        store.read(item.key, start, end), status_code=status, headers=headers, media_type=item.content_type
    )
