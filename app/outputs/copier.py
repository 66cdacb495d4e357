"""Copies vendor outputs into the gateway's store before a prediction becomes completed (SPEC section 8).

Jobs are rows (`output_copies`) with a due time and a lease, claimed with SKIP LOCKED on PostgreSQL,
so any number of processes copy side by side, no two copy one job at once, and a killed process's
job is resumed by another when its lease runs out. Long copies renew their lease while bytes flow;
a copier that lost its lease stops and records nothing (the files it stored are deleted if the job
has failed meanwhile).

Batched like the poller: one statement claims many jobs, their downloads run concurrently, and the
jobs that ended are written together by one writer, one transaction per batch: the stored files in
multi-row INSERTs, each kind of ending in one statement, and the predictions made terminal with their
webhooks through one terminal transition (`FinishCopies`). A stored file is recorded only in that
transaction; a crash before it means the file is copied again, never that a prediction is lost. A
graceful stop records the files of the copies it interrupts, so those resume after them.

Each output is streamed from the vendor into the store chunk by chunk (the store uploads parts of
a bounded size), checked on the way: status 200, a video, audio or raster image Content-Type, at most
VIDGATE_OUTPUT_MAX_BYTES. Only hosts in VIDGATE_OUTPUT_HOSTS are fetched, redirects are followed by
hand and only within them, and every address dialled passes the SSRF guard. Transient failures
(the vendor erring, the file missing for now, a stalled connection) retry with back-off until
VIDGATE_OUTPUT_COPY_MAX_S has passed since the copy began; then, or at once for a refusal that
retrying cannot fix, the prediction fails with the gateway's own message."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import mimetypes
import random
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final

import aiohttp
from sqlalchemy import Select, bindparam, delete, select, update
from yarl import URL

from app.core import clock, metrics
from app.core.batching import batches
from app.core.database import insert_ignore, read_connection, store_until_done, transaction
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
MEDIA_TYPES: Final = ("video/", "audio/")
# Raster images only: an SVG (or any XML or HTML) is a document a browser runs scripts in, and the
# gateway serves outputs from its own origin.
RASTER_IMAGES: Final = frozenset(
    {"image/png", "image/jpeg", "image/gif", "image/webp", "image/avif", "image/apng", "image/bmp", "image/tiff"}
)
# A token "/" token (RFC 9110), nothing a browser might read as another type or a header could carry.
_MEDIA_TYPE: Final = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]{0,63}/[a-z0-9][a-z0-9!#$&^_.+-]{0,63}")
MAX_BACKOFF_S: Final = 60.0
USER_AGENT: Final = "vidgate-outputs/1"
WRITE_BATCH: Final = 500
# Jobs claimed ahead of the download slots: up to VIDGATE_OUTPUT_COPY_CONCURRENCY jobs wait for a slot
# besides those copying, so a slot that frees starts its next copy at once instead of after a claim's
# round trip, and one claim takes many jobs. Bounded, so another process still finds jobs to take.
CLAIM_AHEAD: Final = 1
# An output that declares at most this many bytes is small: it is copied in one of the
# VIDGATE_OUTPUT_COPY_SMALL_CONCURRENCY slots, holding at most this much in memory (what the local
# store gathers into one write, a single PUT to S3); a larger one, or one of unknown size, also needs one
# of the VIDGATE_OUTPUT_COPY_CONCURRENCY large slots while its bytes flow.
SMALL_OUTPUT_BYTES: Final = 1024 * 1024
# Stored-file rows per INSERT: 9 parameters a row, well under the 32,767 bound parameters asyncpg
# (and SQLite) take in one statement, however many outputs the jobs of a batch have.
INSERT_ROWS: Final = 1000


def _nothing() -> None:
    pass


class _Lane:
    """The slots one job holds: a download slot from the start (its connection), and a large slot once
    one of its outputs is not small, until the job ends. It waits for the large slot without its
    download slot, so jobs waiting for a large slot never keep small outputs waiting."""

    def __init__(self, slots: asyncio.Semaphore, large: asyncio.Semaphore) -> None:
        self.slots = slots
        self.large = large
        self.slot = False
        self.held = False

    async def enter(self) -> None:
        await self.slots.acquire()
        self.slot = True

    async def take_large_now(self) -> bool:
        """The large slot if one is free now (then the open connection goes on), else False."""
        if self.large.locked():
            return False
        await self.large.acquire()  # not locked: returns at once, nobody can take it in between
        self.held = True
        return True

    async def take_large(self) -> None:
        if self.slot:
            self.slots.release()
            self.slot = False
        await self.large.acquire()
        self.held = True
        await self.slots.acquire()  # a slot holder never waits for a large slot: this wait ends
        self.slot = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.large.release()
        if self.slot:
            self.slot = False
            self.slots.release()


def small(response: aiohttp.ClientResponse) -> bool:
    """Copied in a small slot: declared at most SMALL_OUTPUT_BYTES, or an error answer (no bytes to hold)."""
    declared = response.content_length
    return response.status != 200 or (declared is not None and declared <= SMALL_OUTPUT_BYTES)


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


def accepted_media_type(content_type: str) -> bool:
    """Video, audio or a raster image: what a player or an <img> shows, never a document."""
    if _MEDIA_TYPE.fullmatch(content_type) is None or "xml" in content_type or "html" in content_type:
        return False
    return content_type.startswith(MEDIA_TYPES) or content_type in RASTER_IMAGES


def extension(content_type: str) -> str:
    guessed = mimetypes.guess_extension(content_type) or ""
    return guessed if len(guessed) <= 8 else ""


@dataclass(frozen=True)
class Outcome:
    """How one attempt at a job ended, for the writer: `files` are the outputs this attempt stored
    (recorded whatever the ending, so a retry resumes after them); `status` is STORED (every output
    is in the store), COPYING (retry at `due`) or FAILED (with the gateway's `error`)."""

    job: OutputCopy
    status: str
    files: list[dict[str, Any]]
    error: str | None = None
    due: datetime | None = None


@dataclass
class Copier:
    """Claims due jobs in batches, copies them concurrently (outputs over 1 MiB or of unknown size at
    most VIDGATE_OUTPUT_COPY_CONCURRENCY at once, smaller ones VIDGATE_OUTPUT_COPY_SMALL_CONCURRENCY more)
    and writes how they ended in batches: one transaction stores the files of many jobs, ends them, and
    makes their predictions terminal with their webhooks (the FinishCopies callback)."""

    runtime: Runtime
    finish: service.FinishCopies
    store: OutputStore | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    room: asyncio.Event = field(default_factory=asyncio.Event)
    outcomes: asyncio.Queue[Outcome] = field(default_factory=asyncio.Queue)
    # Claimed jobs whose outcome is not written yet: a job of ours waiting for the writer is never
    # claimed a second time, and no more wait than one batch holds.
    unwritten: set[str] = field(default_factory=set)
    # The last claim emptied the queue of due jobs: the next one first reads whether anything is due,
    # so an idle copier takes no write transaction (on SQLite, BEGIN IMMEDIATE against the submits)
    # per tick; a busy one, whose claims fill up, claims straight away.
    idle: bool = True
    # Called once a write that made predictions terminal (with their webhooks) has committed: the
    # worker wakes its webhook dispatcher, so a delivery does not wait for the dispatcher's idle tick.
    events_queued: Callable[[], None] = _nothing
    _http: aiohttp.ClientSession | None = None
    _slots: asyncio.Semaphore | None = None
    _large: asyncio.Semaphore | None = None

    def __post_init__(self) -> None:
        if self.store is None:
            self.store = open_store(self.runtime.settings)

    @property
    def http(self) -> aiohttp.ClientSession:
        if self._http is None:
            settings = self.runtime.settings
            self._http = outputs_session(
                concurrency=self.downloads,
                read_timeout_s=settings.output_read_timeout_s,
                allow_private=private_allowed(settings),
            )
        return self._http

    @property
    def downloads(self) -> int:
        """Copies at once: the large slots and the small ones."""
        settings = self.runtime.settings
        return settings.output_copy_concurrency + settings.output_copy_small_concurrency

    @property
    def slots(self) -> asyncio.Semaphore:
        """A copy runs in one of these (its connection); claimed jobs wait here for one."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.downloads)
        return self._slots

    @property
    def large(self) -> asyncio.Semaphore:
        """VIDGATE_OUTPUT_COPY_CONCURRENCY: held besides a slot while an output that is not small flows."""
        if self._large is None:
            self._large = asyncio.Semaphore(self.runtime.settings.output_copy_concurrency)
        return self._large

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()

    def wake(self) -> None:
        """Copy jobs were queued (the poller's write committed): claim now, not at the next idle tick."""
        self.idle = True  # read first all the same: the jobs may be another process's by now
        self.room.set()

    # ------------------------------------------------------------ claiming

    async def run_once(self) -> int:
        # VIDGATE_OUTPUT_COPY_CONCURRENCY bounds the downloads (connections, memory), not the outcomes
        # waiting for the writer: a slot is free again as soon as its bytes are stored. Jobs in hand:
        # those copying (in a large or a small slot), and CLAIM_AHEAD times the large slots waiting.
        in_hand = self.downloads + CLAIM_AHEAD * self.runtime.settings.output_copy_concurrency
        free = min(in_hand - len(self.tasks), WRITE_BATCH - len(self.unwritten))
        if free <= 0:
            return 0
        if self.idle and not await self._any_due():
            return 0
        claimed = await self._claim(free)
        self.idle = len(claimed) < free  # nothing more was due: read first next time
        claimed_at = asyncio.get_running_loop().time()
        for job, done in claimed:
            self.unwritten.add(job.prediction_id)
            task = asyncio.create_task(self._run(job, done, claimed_at))
            self.tasks.add(task)
            task.add_done_callback(self._done)
        return len(claimed)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self.room.set()

    async def run_round(self) -> int:
        """Claim and copy one round to the end, and write it as one batch (tests and one-off tools)."""
        started = await self.run_once()
        await asyncio.gather(*self.tasks)
        batch: list[Outcome] = []
        while not self.outcomes.empty():
            batch.append(self.outcomes.get_nowait())
        await self._store(batch)
        return started

    def _due(self, now: datetime) -> Select[Any]:
        """Jobs due and not leased, bar ours that wait for the writer."""
        due = select(OutputCopy.prediction_id).where(
            OutputCopy.status == COPYING,
            OutputCopy.next_attempt_at <= now,
            (OutputCopy.lease_expires_at.is_(None)) | (OutputCopy.lease_expires_at < now),
        )
        if self.unwritten:
            due = due.where(OutputCopy.prediction_id.not_in(sorted(self.unwritten)))
        return due

    async def _any_due(self) -> bool:
        async with read_connection(self.runtime.sessions) as connection:
            return await connection.scalar(self._due(clock.now()).limit(1)) is not None

    async def _claim(self, limit: int) -> list[tuple[OutputCopy, set[int]]]:
        """Lease up to `limit` due jobs in one statement, with the outputs each one already stored (a
        job resumed after a crash or a retry copies only the rest)."""
        now = clock.now()
        due = self._due(now).order_by(OutputCopy.next_attempt_at).limit(limit).with_for_update(skip_locked=True)
        async with transaction(self.runtime.sessions) as session:
            jobs = list(
                await session.scalars(
                    update(OutputCopy)
                    .where(OutputCopy.prediction_id.in_(due.scalar_subquery()))
                    .values(lease_owner=self.runtime.worker_id, lease_expires_at=now + self._lease())
                    .returning(OutputCopy)
                    .execution_options(synchronize_session=False)
                )
            )
            done: dict[str, set[int]] = {job.prediction_id: set() for job in jobs}
            if jobs:
                stored = await session.execute(
                    select(StoredOutput.prediction_id, StoredOutput.position).where(
                        StoredOutput.prediction_id.in_(list(done))
                    )
                )
                for prediction_id, position in stored:
                    done[prediction_id].add(position)
        return [(job, done[job.prediction_id]) for job in jobs]

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

    async def _run(self, job: OutputCopy, done: set[int], claimed_at: float | None = None) -> None:
        """Copy one claimed job once a download slot is free (`claimed_at`: the loop's time of its claim,
        by default now), and queue its outcome for the writer."""
        files: list[dict[str, Any]] = []
        loop = asyncio.get_running_loop()
        claimed_at = loop.time() if claimed_at is None else claimed_at
        lane = _Lane(self.slots, self.large)
        try:
            await lane.enter()
            if loop.time() - claimed_at > self.runtime.settings.lease_s / 3:
                # It waited long for its slot (the copies ahead of it are large): the lease is renewed
                # before the copy starts, as it is while bytes flow (LeaseLost if taken over).
                await self._renew(job)
            outcome = await self._copy_all(job, done, files, lane)
        except LeaseLost:
            # The writer records nothing for it (fenced on our lease) and says so; it deletes the files
            # this attempt stored if the job has ended meanwhile (see `write`).
            outcome = Outcome(job, COPYING, files, "the lease was lost", due=clock.now())
        except Refused as exc:
            outcome = Outcome(job, FAILED, files, f"vidgate refused to copy the output: {exc}")
        except (Transient, aiohttp.ClientError, TimeoutError, OSError) as exc:
            outcome = self._retry_or_give_up(job, files, _describe(exc))
        except asyncio.CancelledError:
            # Shutting down: the lease is handed back, but the outputs already stored are recorded
            # (the worker drains the writer after cancelling the copies), so the next holder copies
            # only the rest instead of starting a long multi-output copy over, maybe past its bound.
            if files:
                error = job.last_error or "interrupted: the copying process stopped"
                self.outcomes.put_nowait(Outcome(job, COPYING, files, error, due=clock.now()))
            else:
                self.unwritten.discard(job.prediction_id)
            raise
        except Exception as exc:
            # A bug or a store outage: the job stays queued and is retried within its bound.
            log.error(
                "output copy failed", extra={"prediction_id": job.prediction_id, "error_type": type(exc).__name__}
            )
            outcome = self._retry_or_give_up(job, files, f"internal error ({type(exc).__name__})")
        finally:
            lane.release()
        self.outcomes.put_nowait(outcome)

    async def _copy_all(self, job: OutputCopy, done: set[int], files: list[dict[str, Any]], lane: _Lane) -> Outcome:
        if clock.now() >= self._deadline(job):
            raise Transient(job.last_error or "the copy did not finish in time")
        for position, source in enumerate(job.sources):
            if position not in done:
                files.append(await self._copy_one(job, position, source, lane))
        return Outcome(job, STORED, files)

    async def _copy_one(self, job: OutputCopy, position: int, source: str, lane: _Lane) -> dict[str, Any]:
        """Stream one output into the store; returns its `stored_outputs` row, for the writer."""
        settings = self.runtime.settings
        assert self.store is not None
        response = await self._open(source, job.provider)
        if not lane.held and not small(response) and not await lane.take_large_now():
            # Large, or of unknown size, and every large slot busy: its bytes wait for one. The
            # connection is not held meanwhile (the wait may outlast the vendor's patience): the output
            # is asked for again once the slot is ours.
            response.close()
            waited_from = asyncio.get_running_loop().time()
            await lane.take_large()
            if asyncio.get_running_loop().time() - waited_from > settings.lease_s / 3:
                await self._renew(job)
            response = await self._open(source, job.provider)
        try:
            if response.status != 200:
                raise Transient(f"the provider answered {response.status} for output {position + 1}")
            content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
            if not accepted_media_type(content_type):
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
        metrics.OUTPUT_BYTES.inc(size)
        log.info("output stored", extra={"prediction_id": job.prediction_id, "position": position, "bytes": size})
        return dict(
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

    async def _open(self, source: str, provider: str | None) -> aiohttp.ClientResponse:
        """GET `source`, following redirects by hand so that every hop is checked: only on the output hosts
        of the provider that served it (SPEC §11)."""
        settings = self.runtime.settings
        hosts = self.runtime.providers.output_hosts(provider)
        url = URL(source)
        for _ in range(MAX_REDIRECTS + 1):
            if url.scheme not in ("http", "https") or not allowed_host(url, hosts):
                raise Refused(
                    f"{url.host or str(url)!r} is not one of the hosts outputs of provider {provider!r} may come "
                    "from (its output_hosts, or VIDGATE_OUTPUT_HOSTS)"
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

    def _retry_or_give_up(self, job: OutputCopy, files: list[dict[str, Any]], error: str) -> Outcome:
        now = clock.now()
        settings = self.runtime.settings
        if now >= self._deadline(job):
            return Outcome(
                job,
                FAILED,
                files,
                f"vidgate could not copy the output from the provider within {settings.output_copy_max_s:g} s "
                f"(last error: {error})",
            )
        delay = min(2.0**job.attempts, MAX_BACKOFF_S) * random.uniform(0.8, 1.2)
        return Outcome(job, COPYING, files, error, due=min(now + timedelta(seconds=delay), self._deadline(job)))

    # ------------------------------------------------------------ writing outcomes

    async def write_loop(self, stopping: asyncio.Event) -> None:
        """Write outcomes as they arrive, many per transaction. Runs until stopped and drained."""

        def done() -> bool:
            return stopping.is_set() and not self.tasks

        async for batch in batches(self.outcomes, done=done, max_size=WRITE_BATCH):
            await self._store(batch)

    async def _store(self, batch: list[Outcome]) -> None:
        """Waits out a database outage. If the batch fails otherwise, each outcome is tried alone, so
        one bad row costs only its own job; what still fails is left to its lease (copied again)."""
        try:
            if not batch or await store_until_done(functools.partial(self.write, batch), "output copies"):
                return
            if len(batch) > 1:
                for outcome in batch:
                    await store_until_done(functools.partial(self.write, [outcome]), "output copy")
        finally:
            self._written([o.job.prediction_id for o in batch])

    def _written(self, prediction_ids: list[str]) -> None:
        self.unwritten.difference_update(prediction_ids)
        self.room.set()

    async def write(self, batch: list[Outcome]) -> None:
        """One transaction for the batch: fenced on our leases (a job taken over is left to its new
        holder), the stored files in INSERTs of INSERT_ROWS rows, each kind of ending in one statement,
        and the predictions made terminal with their webhooks in one terminal transition.

        A lease is not renewed while its outcome waits for this writer. The wait is normally one
        batch's transaction; it is long only in a database outage, when no renewal could land either.
        It is safe all the same: the fence is on the owner, not the expiry, so a lease that ran out
        but was not taken is still written; one another process took over is left to it (the bytes
        copied here are wasted, and the keys being fixed per output, overwritten by its copy)."""
        owner = self.runtime.worker_id
        now = clock.now()
        by_id = {o.job.prediction_id: o for o in batch}  # a job appears once: it is leased once
        removed: list[str] = []
        async with transaction(self.runtime.sessions) as session:
            held = set(
                await session.scalars(
                    select(OutputCopy.prediction_id)
                    .where(
                        OutputCopy.prediction_id.in_(sorted(by_id)),
                        OutputCopy.lease_owner == owner,
                        OutputCopy.status == COPYING,
                    )
                    .order_by(OutputCopy.prediction_id)
                    .with_for_update()
                )
            )
            live = [by_id[pid] for pid in sorted(held)]
            stored = [o for o in live if o.status == STORED]
            failed = [o for o in live if o.status == FAILED]
            retried = [o for o in live if o.status == COPYING]
            rows = [f for o in stored + retried for f in o.files]
            for start in range(0, len(rows), INSERT_ROWS):
                await insert_ignore(session, StoredOutput, rows[start : start + INSERT_ROWS])
            files: dict[str, list[StoredOutput]] = {o.job.prediction_id: [] for o in stored + failed}
            if files:
                for item in await session.scalars(
                    select(StoredOutput).where(StoredOutput.prediction_id.in_(list(files)))
                ):
                    files[item.prediction_id].append(item)
            results: list[service.CopyResult] = []
            if stored:
                await session.execute(
                    _STORED,
                    [
                        {
                            "b_id": o.job.prediction_id,
                            "b_owner": owner,
                            "b_now": now,
                            "b_bytes": sum(f.size_bytes for f in files[o.job.prediction_id]),
                        }
                        for o in stored
                    ],
                )
                results += [
                    service.CopyResult(
                        o.job.prediction_id,
                        "completed",
                        service.stored_links(
                            self.runtime.settings, o.job.prediction_id, o.job.link_base, files[o.job.prediction_id], now
                        ),
                        None,
                        o.job.vendor_completed_at,
                        o.job.model_name,
                    )
                    for o in stored
                ]
            if failed:
                await session.execute(
                    _FAILED,
                    [{"b_id": o.job.prediction_id, "b_owner": owner, "b_error": (o.error or "")[:500]} for o in failed],
                )
                ids = [o.job.prediction_id for o in failed]
                # What earlier attempts recorded and what this one stored: a failed job keeps no file.
                removed += sorted(
                    {f.key for pid in ids for f in files[pid]} | {f["key"] for o in failed for f in o.files}
                )
                await session.execute(delete(StoredOutput).where(StoredOutput.prediction_id.in_(ids)))
                results += [
                    service.CopyResult(
                        o.job.prediction_id, "failed", None, o.error, o.job.vendor_completed_at, o.job.model_name
                    )
                    for o in failed
                ]
            if retried:
                await session.execute(
                    _RETRIED,
                    [
                        {
                            "b_id": o.job.prediction_id,
                            "b_owner": owner,
                            "b_error": (o.error or "")[:500],
                            "b_due": o.due,
                        }
                        for o in retried
                    ],
                )
            finished: set[str] = set()
            if results:
                finished = await self.finish(session, sorted(results, key=lambda r: r.prediction_id))
            # Files stored under a lease that was lost: while another holder copies the job or has
            # stored it, they are its files too (the keys are fixed per output) and stay. Once the job
            # failed, was deleted by retention or is gone, nobody records them: deleted here, or never.
            lost = [o for o in batch if o.job.prediction_id not in held and o.files]
            if lost:
                kept = set(
                    await session.scalars(
                        select(OutputCopy.prediction_id).where(
                            OutputCopy.prediction_id.in_(sorted(o.job.prediction_id for o in lost)),
                            OutputCopy.status.in_((COPYING, STORED)),
                        )
                    )
                )
                removed += sorted(f["key"] for o in lost if o.job.prediction_id not in kept for f in o.files)
        if finished:
            self.events_queued()  # committed: their webhooks are due now
        assert self.store is not None
        for o in batch:
            if o.job.prediction_id not in held:
                metrics.OUTPUT_COPIES.labels(outcome="lease_lost").inc()
                log.warning("output copy lease lost", extra={"prediction_id": o.job.prediction_id})
        for key in removed:
            with contextlib.suppress(Exception):
                await self.store.delete(key)
        for o in stored:
            metrics.OUTPUT_COPIES.labels(outcome="stored").inc()
            log.info("outputs rehosted", extra={"prediction_id": o.job.prediction_id, "files": len(o.job.sources)})
        for o in retried:
            metrics.OUTPUT_COPIES.labels(outcome="retried").inc()
            log.warning(
                "output copy retried", extra={"prediction_id": o.job.prediction_id, "error": (o.error or "")[:200]}
            )
        for o in failed:
            metrics.OUTPUT_COPIES.labels(outcome="failed").inc()
            log.warning(
                "output copy failed", extra={"prediction_id": o.job.prediction_id, "error": (o.error or "")[:200]}
            )

    async def drain(self, timeout_s: float) -> None:
        if self.tasks:
            _, pending = await asyncio.wait(set(self.tasks), timeout=timeout_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)


# The endings, one statement each for a whole batch (executemany), fenced on the lease like the claim.
_copies: Any = OutputCopy.__table__
_FENCED = (
    _copies.c.prediction_id == bindparam("b_id"),
    _copies.c.lease_owner == bindparam("b_owner"),
    _copies.c.status == COPYING,
)
_ENDED = dict(lease_owner=None, lease_expires_at=None, attempts=_copies.c.attempts + 1)
_STORED = (
    update(_copies)
    .where(*_FENCED)
    .values(
        status=STORED,
        stored_at=bindparam("b_now"),
        stored_bytes=bindparam("b_bytes"),
        next_attempt_at=None,
        last_error=None,
        **_ENDED,
    )
)
_FAILED = (
    update(_copies)
    .where(*_FENCED)
    .values(status=FAILED, last_error=bindparam("b_error"), next_attempt_at=None, **_ENDED)
)
_RETRIED = (
    update(_copies)
    .where(*_FENCED)
    .values(last_error=bindparam("b_error"), next_attempt_at=bindparam("b_due"), **_ENDED)
)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, Transient):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return "the provider stopped sending (timed out)"
    return f"connection failed ({type(exc).__name__})"
