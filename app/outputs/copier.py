"""Copies vendor outputs into the gateway's store before a prediction becomes completed (SPEC section 8).

Jobs are rows (`output_copies`) with a due time and a lease, claimed with SKIP LOCKED on PostgreSQL,
so any number of processes copy side by side, no two copy one job at once, and a killed process's
job is resumed by another when its lease runs out. Long copies renew their lease while bytes flow;
a copier that lost its lease stops and writes nothing.

Each output is streamed from the vendor into the store chunk by chunk (the store uploads parts of
a bounded size), checked on the way: status 200, a video/audio/image Content-Type, at most
VIDGATE_OUTPUT_MAX_BYTES. Only hosts in VIDGATE_OUTPUT_HOSTS are fetched, redirects are followed by
hand and only within them, and every address dialled passes the SSRF guard. Transient failures
(the vendor erring, the file missing for now, a stalled connection) retry with back-off until
VIDGATE_OUTPUT_COPY_MAX_S has passed since the copy began; then, or at once for a refusal that
retrying cannot fix, the prediction fails with the gateway's own message."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import mimetypes
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Final

import aiohttp
from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from yarl import URL

from app.core import clock, metrics
from app.core.database import transaction
from app.core.http import outputs_session
from app.core.settings import Settings
from app.core.ssrf import ForbiddenTarget, check_url
from app.outputs import service
from app.outputs.models import COPYING, FAILED, STORED, OutputCopy, StoredOutput
from app.outputs.store import OutputStore, open_store
from app.runtime import Runtime

log = logging.getLogger("vidgate.outputs")

MAX_REDIRECTS: Final = 5
REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})
MEDIA_TYPES: Final = ("video/", "audio/", "image/")
MAX_BACKOFF_S: Final = 60.0
USER_AGENT: Final = "vidgate-outputs/1"


class Refused(Exception):
    """Retrying cannot help (a host outside the allowed ones, a wrong type, too large): fail now."""


class Transient(Exception):
    """Worth another attempt while the bound allows."""


class LeaseLost(Exception):
    """Another process took this job over: stop without writing."""


def private_allowed(settings: Settings) -> bool:
    """SPEC section 8: the webhooks' switch; and the sandbox, whose clips the gateway serves on loopback."""
    return settings.webhook_allow_private or settings.sandbox


def allowed_host(url: URL, hosts: list[str]) -> bool:
    """`host` entries allow the scheme's default port, `host:port` entries exactly that port."""
    host = (url.host or "").lower().rstrip(".")
    port = url.port
    for entry in hosts:
        name, _, wanted = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
        if name == host and (int(wanted) == port if wanted else url.explicit_port is None):
            return True
    return False


def extension(content_type: str) -> str:
    guessed = mimetypes.guess_extension(content_type) or ""
    return guessed if len(guessed) <= 8 else ""


@dataclass
class Copier:
    runtime: Runtime
    finish: service.FinishCopy
    store: OutputStore | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    room: asyncio.Event = field(default_factory=asyncio.Event)
    _http: aiohttp.ClientSession | None = None

    def __post_init__(self) -> None:
        if self.store is None:
            self.store = open_store(self.runtime.settings)

    @property
    def http(self) -> aiohttp.ClientSession:
        if self._http is None:
            settings = self.runtime.settings
            self._http = outputs_session(
                concurrency=settings.output_copy_concurrency,
                read_timeout_s=settings.output_read_timeout_s,
                allow_private=private_allowed(settings),
            )
        return self._http

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()

    # ------------------------------------------------------------ claiming

    async def run_once(self) -> int:
        free = self.runtime.settings.output_copy_concurrency - len(self.tasks)
        if free <= 0:
            return 0
        claimed = await self._claim(free)
        for job in claimed:
            task = asyncio.create_task(self._run(job))
            self.tasks.add(task)
            task.add_done_callback(self._done)
        return len(claimed)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self.room.set()

    async def run_round(self) -> int:
        """Claim and copy one round to the end (tests and one-off tools)."""
        started = await self.run_once()
        await asyncio.gather(*self.tasks)
        return started

    async def _claim(self, limit: int) -> list[OutputCopy]:
        now = clock.now()
        due = (
            select(OutputCopy.prediction_id)
            .where(
                OutputCopy.status == COPYING,
                OutputCopy.next_attempt_at <= now,
                (OutputCopy.lease_expires_at.is_(None)) | (OutputCopy.lease_expires_at < now),
            )
            .order_by(OutputCopy.next_attempt_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        async with transaction(self.runtime.sessions) as session:
            rows = await session.scalars(
                update(OutputCopy)
                .where(OutputCopy.prediction_id.in_(due.scalar_subquery()))
                .values(lease_owner=self.runtime.worker_id, lease_expires_at=now + self._lease())
                .returning(OutputCopy)
                .execution_options(synchronize_session=False)
            )
            return list(rows)

    def _lease(self) -> timedelta:
        return timedelta(seconds=self.runtime.settings.lease_s)

    async def _renew(self, job: OutputCopy) -> None:
        async with transaction(self.runtime.sessions) as session:
            renewed = await session.scalar(
                update(OutputCopy)
                .where(OutputCopy.prediction_id == job.prediction_id, OutputCopy.lease_owner == self.runtime.worker_id)
                .values(lease_expires_at=clock.now() + self._lease())
                .returning(OutputCopy.prediction_id)
            )
        if renewed is None:
            raise LeaseLost(job.prediction_id)

    async def release_leases(self) -> None:
        async with transaction(self.runtime.sessions) as session:
            await session.execute(
                update(OutputCopy)
                .where(OutputCopy.lease_owner == self.runtime.worker_id, OutputCopy.status == COPYING)
                .values(lease_owner=None, lease_expires_at=None)
            )

    # ------------------------------------------------------------ one job

    def _deadline(self, job: OutputCopy) -> datetime:
        return job.started_at + timedelta(seconds=self.runtime.settings.output_copy_max_s)

    async def _run(self, job: OutputCopy) -> None:
        try:
            await self._copy_all(job)
        except LeaseLost:
            metrics.OUTPUT_COPIES.labels(outcome="lease_lost").inc()
            log.warning("output copy lease lost", extra={"prediction_id": job.prediction_id})
        except Refused as exc:
            await self._fail(job, f"vidgate refused to copy the output: {exc}")
        except (Transient, aiohttp.ClientError, TimeoutError, OSError) as exc:
            await self._retry_or_give_up(job, _describe(exc))
        except Exception as exc:
            # A bug or a store outage: the job stays queued and is retried within its bound.
            log.error(
                "output copy failed", extra={"prediction_id": job.prediction_id, "error_type": type(exc).__name__}
            )
            with contextlib.suppress(Exception):
                await self._retry_or_give_up(job, f"internal error ({type(exc).__name__})")

    async def _copy_all(self, job: OutputCopy) -> None:
        if clock.now() >= self._deadline(job):
            raise Transient(job.last_error or "the copy did not finish in time")
        async with transaction(self.runtime.sessions, readonly=True) as session:
            done = set(
                await session.scalars(
                    select(StoredOutput.position).where(StoredOutput.prediction_id == job.prediction_id)
                )
            )
        for position, source in enumerate(job.sources):
            if position not in done:
                await self._copy_one(job, position, source)
        await self._complete(job)

    async def _copy_one(self, job: OutputCopy, position: int, source: str) -> None:
        settings = self.runtime.settings
        assert self.store is not None
        response = await self._open(source)
        try:
            if response.status != 200:
                raise Transient(f"the provider answered {response.status} for output {position + 1}")
            content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
            if not content_type.startswith(MEDIA_TYPES):
                raise Refused(f"output {position + 1} is {content_type or 'untyped'}, not video, audio or an image")
            declared = response.content_length
            if declared is not None and declared > settings.output_max_bytes:
                raise Refused(
                    f"output {position + 1} is {declared} bytes, over the limit of {settings.output_max_bytes}"
                )
            digest = hashlib.sha256()
            size = 0
            renew_every = settings.lease_s / 3
            loop = asyncio.get_running_loop()
            renewed_at = loop.time()

            # The store consumes this stream from its own code: what went wrong is kept here, since
            # an exception raised inside may reach us wrapped in the store's own error type.
            problem: list[Exception] = []

            async def chunks() -> AsyncIterator[bytes]:
                nonlocal size, renewed_at
                try:
                    async for chunk in response.content.iter_any():
                        size += len(chunk)
                        if size > settings.output_max_bytes:
                            raise Refused(
                                f"output {position + 1} is over the limit of {settings.output_max_bytes} bytes"
                            )
                        digest.update(chunk)
                        if loop.time() - renewed_at > renew_every:
                            renewed_at = loop.time()
                            await self._renew(job)
                        yield chunk
                    if declared is not None and size != declared:
                        raise Transient(f"output {position + 1} ended after {size} of {declared} bytes")
                except Exception as exc:
                    problem.append(exc)
                    raise

            name = f"{position}{extension(content_type)}"
            key = f"{job.prediction_id}/{name}"
            try:
                await self.store.put(key, chunks())
            except Exception as exc:
                if problem and problem[0] is not exc:
                    raise problem[0] from exc
                raise
        finally:
            response.release()
        async with transaction(self.runtime.sessions) as session:
            await self._fence(session, job)
            session.add(
                StoredOutput(
                    prediction_id=job.prediction_id,
                    position=position,
                    name=name,
                    source_url=source,
                    key=key,
                    content_type=content_type,
                    size_bytes=size,
                    sha256=digest.hexdigest(),
                    stored_at=clock.now(),
                )
            )
        metrics.OUTPUT_BYTES.inc(size)
        log.info("output stored", extra={"prediction_id": job.prediction_id, "position": position, "bytes": size})

    async def _open(self, source: str) -> aiohttp.ClientResponse:
        """GET `source`, following redirects by hand so that every hop is checked."""
        settings = self.runtime.settings
        url = URL(source)
        for _ in range(MAX_REDIRECTS + 1):
            if url.scheme not in ("http", "https") or not allowed_host(url, settings.output_hosts):
                raise Refused(
                    f"{url.host or str(url)!r} is not one of the hosts outputs may come from (VIDGATE_OUTPUT_HOSTS)"
                )
            try:
                # aiohttp dials IP literals without asking the guarded resolver: those are checked here.
                check_url(str(url), allow_private=private_allowed(settings))
                response = await self.http.get(
                    url, allow_redirects=False, headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
                )
            except ForbiddenTarget as exc:
                raise Refused(exc.reason) from exc
            except aiohttp.ClientConnectorError as exc:
                if isinstance(exc.__cause__, ForbiddenTarget):
                    raise Refused(exc.__cause__.reason) from exc
                raise
            if response.status not in REDIRECTS:
                return response
            location = response.headers.get("Location")
            response.release()
            if not location:
                raise Transient(f"the provider answered {response.status} without a Location")
            url = url.join(URL(location))
        raise Refused(f"more than {MAX_REDIRECTS} redirects")

    # ------------------------------------------------------------ endings

    async def _fence(self, session: AsyncSession, job: OutputCopy) -> None:
        held = await session.scalar(
            select(OutputCopy.prediction_id)
            .where(OutputCopy.prediction_id == job.prediction_id, OutputCopy.lease_owner == self.runtime.worker_id)
            .with_for_update()
        )
        if held is None:
            raise LeaseLost(job.prediction_id)

    async def _complete(self, job: OutputCopy) -> None:
        """Every output is stored: the prediction becomes completed with our links, and its webhook is
        written, in one transaction with the job's own end."""
        now = clock.now()
        async with transaction(self.runtime.sessions) as session:
            files = list(
                await session.scalars(select(StoredOutput).where(StoredOutput.prediction_id == job.prediction_id))
            )
            ended = await session.scalar(
                update(OutputCopy)
                .where(
                    OutputCopy.prediction_id == job.prediction_id,
                    OutputCopy.lease_owner == self.runtime.worker_id,
                    OutputCopy.status == COPYING,
                )
                .values(
                    status=STORED,
                    stored_at=now,
                    stored_bytes=sum(f.size_bytes for f in files),
                    attempts=OutputCopy.attempts + 1,
                    lease_owner=None,
                    lease_expires_at=None,
                    next_attempt_at=None,
                    last_error=None,
                )
                .returning(OutputCopy)
                .execution_options(populate_existing=True)
            )
            if ended is None:
                raise LeaseLost(job.prediction_id)
            outputs = service.links(self.runtime.settings, ended, files, now)
            await self.finish(
                session,
                service.CopyResult(
                    job.prediction_id, "completed", outputs, None, job.vendor_completed_at, job.model_name
                ),
            )
        metrics.OUTPUT_COPIES.labels(outcome="stored").inc()
        log.info("outputs rehosted", extra={"prediction_id": job.prediction_id, "files": len(files)})

    async def _retry_or_give_up(self, job: OutputCopy, error: str) -> None:
        now = clock.now()
        settings = self.runtime.settings
        if now >= self._deadline(job):
            await self._fail(
                job,
                f"vidgate could not copy the output from the provider within {settings.output_copy_max_s:g} s "
                f"(last error: {error})",
            )
            return
        delay = min(2.0**job.attempts, MAX_BACKOFF_S) * random.uniform(0.8, 1.2)
        due = min(now + timedelta(seconds=delay), self._deadline(job))
        async with transaction(self.runtime.sessions) as session:
            await session.execute(
                update(OutputCopy)
                .where(OutputCopy.prediction_id == job.prediction_id, OutputCopy.lease_owner == self.runtime.worker_id)
                .values(
                    attempts=OutputCopy.attempts + 1,
                    last_error=error[:500],
                    next_attempt_at=due,
                    lease_owner=None,
                    lease_expires_at=None,
                )
            )
        metrics.OUTPUT_COPIES.labels(outcome="retried").inc()
        log.warning("output copy retried", extra={"prediction_id": job.prediction_id, "error": error[:200]})

    async def _fail(self, job: OutputCopy, message: str) -> None:
        """End the job and the prediction `failed` with the gateway's message (the charge is handled by
        the terminal transition, as for any failed prediction). Stored files of it are removed."""
        assert self.store is not None
        async with transaction(self.runtime.sessions) as session:
            keys = list(
                await session.scalars(select(StoredOutput.key).where(StoredOutput.prediction_id == job.prediction_id))
            )
            ended = await session.scalar(
                update(OutputCopy)
                .where(
                    OutputCopy.prediction_id == job.prediction_id,
                    OutputCopy.lease_owner == self.runtime.worker_id,
                    OutputCopy.status == COPYING,
                )
                .values(
                    status=FAILED,
                    attempts=OutputCopy.attempts + 1,
                    last_error=message[:500],
                    lease_owner=None,
                    lease_expires_at=None,
                    next_attempt_at=None,
                )
                .returning(OutputCopy.prediction_id)
            )
            if ended is None:
                return
            await session.execute(delete(StoredOutput).where(StoredOutput.prediction_id == job.prediction_id))
            await self.finish(
                session,
                service.CopyResult(job.prediction_id, "failed", None, message, job.vendor_completed_at, job.model_name),
            )
        for key in keys:
            with contextlib.suppress(Exception):
                await self.store.delete(key)
        metrics.OUTPUT_COPIES.labels(outcome="failed").inc()
        log.warning("output copy failed", extra={"prediction_id": job.prediction_id, "error": message[:200]})

    async def drain(self, timeout_s: float) -> None:
        if self.tasks:
            _, pending = await asyncio.wait(set(self.tasks), timeout=timeout_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, Transient):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return "the provider stopped sending (timed out)"
    return f"connection failed ({type(exc).__name__})"
