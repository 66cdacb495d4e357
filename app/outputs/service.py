"""Rehosted outputs: enqueueing a copy, the links handed out, what operators see, and retention.

The predictions domain calls into this one, never the other way: the terminal transition stays in
app/predictions, and the copier is handed it as a callback (`FinishCopies`)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, FromClause, Join, Row, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.core import clock
from app.core.database import insert_ignore, table_of, transaction
from app.core.errors import AppError, NotFound
from app.core.settings import Settings
from app.outputs import signing
from app.outputs.models import COPYING, DELETED, STORED, OutputCopy, StoredOutput
from app.outputs.schemas import PredictionOutputsOut, StoredFileOut
from app.outputs.store import OutputStore
from app.tenants.models import Tenant

log = logging.getLogger("vidgate.outputs")


class OutputLinkInvalid(AppError):
    status = 403
    code = "output_link_invalid"
    title = "Invalid output link"


class OutputLinkExpired(AppError):
    status = 403
    code = "output_link_expired"
    title = "Output link expired"


class OutputNotFound(NotFound):
    code = "output_not_found"
    title = "No such output"


class OutputDeleted(AppError):
    status = 410
    code = "output_deleted"
    title = "Output deleted"


class RangeNotSatisfiable(AppError):
    status = 416
    code = "range_not_satisfiable"
    title = "Range not satisfiable"


@dataclass(frozen=True)
class CopyResult:
    """What the terminal transition needs once a copy job ends: `completed` with the gateway's links, or
    `failed` with the gateway's own message. `completed_at` and `model_name` are the vendor's."""

    prediction_id: str
    status: str
    outputs: list[str] | None
    error: str | None
    completed_at: datetime | None
    model_name: str | None


# Called by the copier in its own transaction with a batch of endings (one terminal transition for all
# of them); returns the ids it finished (a prediction no longer in flight is left out).
FinishCopies = Callable[[AsyncSession, list[CopyResult]], Awaitable[set[str]]]


def rehosting(settings: Settings) -> bool:
    return settings.rehost_outputs


def link_base(settings: Settings, fallback: str | None) -> str:
    """Where output links start. VIDGATE_PUBLIC_BASE_URL when set; otherwise the base the caller of
    enqueue_copy knows (the one the prediction was submitted through, or the sandbox's address)."""
    base = settings.public_base_url or fallback
    if not base:
        raise ValueError("output links need VIDGATE_PUBLIC_BASE_URL or the base the prediction was submitted to")
    return base.rstrip("/")


@dataclass(frozen=True)
class CopyJob:
    """One prediction the vendor reported `completed` with outputs: what its copy job is made of."""

    prediction_id: str
    tenant_id: str
    sources: Sequence[str]
    vendor_completed_at: datetime | None
    model_name: str | None
    base_url: str | None = None
    provider: str | None = None


# Job rows per INSERT: 12 parameters a row, well under the 32,767 bound parameters of one statement.
ENQUEUE_ROWS = 1000


async def enqueue_copy(
    session: AsyncSession,
    settings: Settings,
    *,
    prediction_id: str,
    tenant_id: str,
    sources: Sequence[str],
    vendor_completed_at: datetime | None,
    model_name: str | None,
    base_url: str | None = None,
    provider: str | None = None,
) -> bool:
    """The vendor said `completed`: with VIDGATE_REHOST_OUTPUTS on, queue the copy in the caller's
    transaction (the poller's terminal transition) instead of finishing; the prediction then stays
    `processing`, not due for polling, and the copier finishes it through its FinishCopies callback.
    Returns False when nothing was queued (rehosting off, or no outputs): finish it as before.
    Idempotent: a second call for the same prediction changes nothing."""
    job = CopyJob(prediction_id, tenant_id, sources, vendor_completed_at, model_name, base_url, provider)
    return bool(await enqueue_copies(session, settings, [job]))


async def enqueue_copies(session: AsyncSession, settings: Settings, jobs: Sequence[CopyJob]) -> set[str]:
    """enqueue_copy for a whole batch of the poller's endings: one multi-row INSERT per ENQUEUE_ROWS
    jobs instead of a statement (a round trip inside the poll writer's transaction) per job. Returns the
    ids queued (those with outputs, rehosting on); idempotent like enqueue_copy."""
    if not rehosting(settings):
        return set()
    now = clock.now()
    rows = [
        dict(
            prediction_id=job.prediction_id,
            tenant_id=job.tenant_id,
            status=COPYING,
            sources=list(job.sources),
            link_base=link_base(settings, job.base_url),
            vendor_completed_at=job.vendor_completed_at,
            model_name=job.model_name,
            provider=job.provider,
            attempts=0,
            next_attempt_at=now,
            started_at=now,
            stored_bytes=0,
        )
        for job in jobs
        if job.sources
    ]
    for start in range(0, len(rows), ENQUEUE_ROWS):
        await insert_ignore(session, OutputCopy, rows[start : start + ENQUEUE_ROWS])
    return {job.prediction_id for job in jobs if job.sources}


# ---------------------------------------------------------------- links


def links(settings: Settings, copy: OutputCopy, files: Sequence[StoredOutput], now: datetime) -> list[str] | None:
    """The links valid at `now` (None once retention deleted the files, or before they are stored)."""
    named = [(f.position, f.name) for f in files]
    return _links(settings, copy.prediction_id, copy.status, copy.stored_at, copy.link_base, named, now)


def stored_links(
    settings: Settings, prediction_id: str, link_base: str, files: Sequence[StoredOutput], stored_at: datetime
) -> list[str]:
    """The links of a copy that becomes `stored` at `stored_at`: what its webhook carries."""
    named = [(f.position, f.name) for f in files]
    found = _links(settings, prediction_id, STORED, stored_at, link_base, named, stored_at)
    assert found is not None
    return found


def _links(
    settings: Settings,
    prediction_id: str,
    status: str,
    stored_at: datetime | None,
    link_base: str,
    files: Sequence[tuple[int, str]],
    now: datetime,
) -> list[str] | None:
    if status != STORED or stored_at is None:
        return None
    key = signing.signing_key(settings)
    expires = signing.window_expiry(stored_at, now, settings.output_url_ttl_s)
    return [link_base + signing.link_path(key, prediction_id, name, expires) for _, name in sorted(files)]


# For a reader that reads a prediction in one statement (GET): the columns its current links are
# computed from, joined on its id. One row per stored file, or one with these columns NULL.
_copies = table_of(OutputCopy)
_files = table_of(StoredOutput)
LINK_COLUMNS = (
    _copies.c.status.label("copy_status"),
    _copies.c.stored_at.label("copy_stored_at"),
    _copies.c.link_base.label("copy_link_base"),
    _files.c.position.label("file_position"),
    _files.c.name.label("file_name"),
)


def join_links(source: FromClause, prediction_id: ColumnElement[str]) -> Join:
    return source.outerjoin(_copies, _copies.c.prediction_id == prediction_id).outerjoin(
        _files, _files.c.prediction_id == prediction_id
    )


def show_joined_links(settings: Settings, body: dict[str, Any], rows: Sequence[Row[*tuple[Any, ...]]]) -> bool:
    """show_current_links for one presented prediction read with LINK_COLUMNS (`rows`: all its rows).
    Returns whether it was rehosted: only then can its `outputs` change after it is terminal."""
    first = rows[0]
    if first.copy_status is None:
        return False
    if body.get("status") == "completed" and body.get("outputs"):
        files = [(r.file_position, r.file_name) for r in rows if r.file_name is not None]
        body["outputs"] = _links(
            settings, body["id"], first.copy_status, first.copy_stored_at, first.copy_link_base, files, clock.now()
        )
    return True


async def current_links_many(
    session: AsyncSession, settings: Settings, prediction_ids: Sequence[str]
) -> dict[str, list[str] | None]:
    """For each rehosted prediction among `prediction_ids`: its links now (None after retention).
    Predictions absent from the answer were not rehosted: their stored `outputs` stand."""
    if not prediction_ids:
        return {}
    copies = {
        c.prediction_id: c
        for c in await session.scalars(select(OutputCopy).where(OutputCopy.prediction_id.in_(prediction_ids)))
    }
    stored = [pid for pid, c in copies.items() if c.status == STORED]
    files: dict[str, list[StoredOutput]] = {pid: [] for pid in stored}
    if stored:
        for item in await session.scalars(select(StoredOutput).where(StoredOutput.prediction_id.in_(stored))):
            files[item.prediction_id].append(item)
    now = clock.now()
    return {pid: links(settings, copy, files.get(pid, []), now) for pid, copy in copies.items()}


async def current_links(session: AsyncSession, settings: Settings, prediction_id: str) -> list[str] | None:
    """The links the predictions presenter shows as `outputs` now, or None (not rehosted, not stored
    yet, or deleted). Use current_links_many to tell a prediction that was never rehosted apart."""
    return (await current_links_many(session, settings, [prediction_id])).get(prediction_id)


async def show_current_links(session: AsyncSession, settings: Settings, bodies: Sequence[dict[str, Any]]) -> None:
    """Rewrite the `outputs` of presented predictions (GET, the list, `Prefer: wait`) to the links valid
    now: the same link the webhook carried until it expires, then a fresh one. One query, and only when
    a completed prediction with outputs is among them; a prediction never rehosted keeps its outputs."""
    ids = [b["id"] for b in bodies if b.get("status") == "completed" and b.get("outputs")]
    if not ids:
        return
    rows = await session.execute(
        select(OutputCopy, StoredOutput)
        .join(StoredOutput, StoredOutput.prediction_id == OutputCopy.prediction_id, isouter=True)
        .where(OutputCopy.prediction_id.in_(ids))
    )
    copies: dict[str, OutputCopy] = {}
    files: dict[str, list[StoredOutput]] = {}
    for copy, item in rows:
        copies[copy.prediction_id] = copy
        if item is not None:
            files.setdefault(copy.prediction_id, []).append(item)
    now = clock.now()
    for body in bodies:
        if (job := copies.get(body["id"])) is not None:
            body["outputs"] = links(settings, job, files.get(job.prediction_id, []), now)


# ---------------------------------------------------------------- serving


@dataclass(frozen=True)
class Servable:
    key: str
    content_type: str
    size: int
    etag: str
    expires: int


async def servable(
    session: AsyncSession, settings: Settings, prediction_id: str, name: str, expires: str | None, sig: str | None
) -> Servable:
    """Check a link and find its file. A bad signature and an expired link are both 403, with different
    codes; a good link to a file retention deleted is 410."""
    verdict = signing.verify(
        signing.signing_key(settings), prediction_id, name, expires, sig, clock.now(), settings.output_url_ttl_s
    )
    if verdict == "invalid":
        raise OutputLinkInvalid("This output link is not valid. Use the link from the prediction as given.")
    if verdict == "expired":
        raise OutputLinkExpired(
            "This output link has expired. GET the prediction again for a fresh link.", predictionId=prediction_id
        )
    row = (
        await session.execute(
            select(StoredOutput, OutputCopy.status)
            .join(OutputCopy, OutputCopy.prediction_id == StoredOutput.prediction_id)
            .where(StoredOutput.prediction_id == prediction_id, StoredOutput.name == name)
        )
    ).first()
    if row is None:
        raise OutputNotFound("There is no such output.")
    item, status = row
    if status == DELETED:
        raise OutputDeleted("This output was deleted after its retention period.")
    assert expires is not None
    return Servable(item.key, item.content_type, item.size_bytes, f'"{item.sha256[:32]}"', int(expires))


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """One byte range [start, end) from a Range header, or None for the whole file. Several ranges or a
    unit other than bytes are ignored (RFC 9110 lets a server answer 200 with everything); a range
    that lies outside the file raises RangeNotSatisfiable."""
    if not header:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    first, last = first.strip(), last.strip()
    numbers = all(part.isascii() and part.isdigit() and len(part) <= 18 for part in (first, last) if part)
    if not dash or not (first or last) or not numbers:
        return None  # malformed: ignored, as RFC 9110 says
    unsatisfiable = RangeNotSatisfiable(
        f"The file has {size} bytes; ask for a range within them.", headers={"Content-Range": f"bytes */{size}"}
    )
    if not first:  # a suffix: the last N bytes
        if int(last) == 0 or size == 0:
            raise unsatisfiable
        return max(size - int(last), 0), size
    start = int(first)
    if last and int(last) < start:
        return None  # an inverted range is malformed, not unsatisfiable: ignored
    if start >= size:
        raise unsatisfiable
    return start, min(int(last) + 1, size) if last else size


# ---------------------------------------------------------------- operators


async def operator_view(session: AsyncSession, prediction_id: str) -> PredictionOutputsOut:
    """The vendor's original URLs and what was stored, for the operator API."""
    copy = await session.get(OutputCopy, prediction_id)
    if copy is None:
        raise OutputNotFound(f"Prediction {prediction_id!r} has no rehosted outputs.", predictionId=prediction_id)
    files = await session.scalars(
        select(StoredOutput).where(StoredOutput.prediction_id == prediction_id).order_by(StoredOutput.position)
    )
    return PredictionOutputsOut(
        prediction_id=copy.prediction_id,
        tenant_id=copy.tenant_id,
        status=copy.status,
        source_urls=copy.sources,
        stored_bytes=copy.stored_bytes if copy.status == STORED else 0,
        attempts=copy.attempts,
        last_error=copy.last_error,
        started_at=copy.started_at,
        stored_at=copy.stored_at,
        deleted_at=copy.deleted_at,
        files=[StoredFileOut.model_validate(f) for f in files],
    )


async def stored_bytes_by_tenant(session: AsyncSession) -> dict[str, int]:
    rows = await session.execute(
        select(OutputCopy.tenant_id, func.coalesce(func.sum(OutputCopy.stored_bytes), 0))
        .where(OutputCopy.status == STORED)
        .group_by(OutputCopy.tenant_id)
    )
    return {tenant_id: int(total) for tenant_id, total in rows}


# ---------------------------------------------------------------- retention

SWEEP_BATCH = 100


async def sweep(sessions: async_sessionmaker[AsyncSession], settings: Settings, store: OutputStore) -> int:
    """Delete stored outputs older than their tenant's retention (VIDGATE_OUTPUT_RETENTION_DAYS unless
    the tenant sets its own). Files go first, then the row says `deleted`: a crash in between only
    means the next sweep deletes already deleted files again."""
    now = clock.now()
    async with transaction(sessions, readonly=True) as session:
        tenants = list(
            await session.execute(
                select(OutputCopy.tenant_id, Tenant.output_retention_days)
                .join(Tenant, Tenant.id == OutputCopy.tenant_id)
                .where(OutputCopy.status == STORED)
                .distinct()
            )
        )
    deleted = 0
    for tenant_id, days in tenants:
        cutoff = now - timedelta(days=days or settings.output_retention_days)
        async with transaction(sessions) as session:
            due = list(
                await session.scalars(
                    select(OutputCopy)
                    .where(
                        OutputCopy.tenant_id == tenant_id,
                        OutputCopy.status == STORED,
                        OutputCopy.stored_at < cutoff,
                    )
                    .limit(SWEEP_BATCH)
                    .with_for_update(skip_locked=True)
                )
            )
            if not due:
                continue
            ids = [c.prediction_id for c in due]
            keys = list(await session.scalars(select(StoredOutput.key).where(StoredOutput.prediction_id.in_(ids))))
            for key in keys:
                await store.delete(key)
            await session.execute(
                update(OutputCopy)
                .where(OutputCopy.prediction_id.in_(ids))
                .values(status=DELETED, deleted_at=now)
                .execution_options(synchronize_session=False)
            )
            deleted += len(ids)
            log.info("outputs deleted by retention", extra={"tenant_id": tenant_id, "predictions": len(ids)})
    return deleted
