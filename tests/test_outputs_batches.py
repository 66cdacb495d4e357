"""The copier works in batches like the poller: one claim for many jobs, and one transaction that
stores their files, ends them and makes their predictions terminal with their webhooks. So a round
of twelve copies costs the same transactions and statements as a round of one, not three
transactions per prediction; and the batch keeps every guarantee of a copy written alone (a job
whose lease was taken over writes nothing, a retry resumes after the files already stored, and so
does a copy stopped by a shutdown). An idle copier reads before it claims, taking no write
transaction per tick, and a batch of thousands of stored files stays one transaction."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterable, AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select, update

from app.core import clock
from app.core.database import transaction
from app.outputs import copier as copier_module
from app.outputs.copier import Outcome
from app.outputs.models import COPYING, OutputCopy, StoredOutput
from app.outputs.store import OutputStore
from app.runtime import Runtime
from tests.test_outputs import Setup
from tests.test_outputs import settings_overrides as settings_overrides
from tests.test_outputs import setup as setup


@dataclasses.dataclass
class Cost:
    commits: int = 0
    statements: int = 0


@contextlib.contextmanager
def cost(runtime: Runtime) -> Iterator[Cost]:
    """Commits and SQL statements meanwhile (transaction control left out: SQLite's BEGIN)."""
    seen = Cost()

    def commit(_conn: Any) -> None:
        seen.commits += 1

    def statement(_conn: Any, _cursor: Any, sql: str, *_: Any) -> None:
        if not sql.lstrip().upper().startswith("BEGIN"):
            seen.statements += 1

    engine = runtime.engine.sync_engine
    event.listen(engine, "commit", commit)
    event.listen(engine, "before_cursor_execute", statement)
    try:
        yield seen
    finally:
        event.remove(engine, "commit", commit)
        event.remove(engine, "before_cursor_execute", statement)


async def test_a_round_of_copies_costs_the_same_whatever_its_size(setup: Setup, sim_url: str) -> None:
    setup.runtime.settings.output_copy_concurrency = 16

    async def round_of(n: int) -> Cost:
        ids = [await setup.prediction([f"{sim_url}/sandbox/outputs/{i}.mp4"]) for i in range(n)]
        with cost(setup.runtime) as spent:
            assert await setup.copier.run_round() == n
        for prediction_id in ids:
            assert (await setup.row(prediction_id)).status == "completed"
            (event_,) = await setup.webhooks(prediction_id)
            assert event_["type"] == "prediction.completed"
            assert event_["data"]["outputs"] == await setup.links(prediction_id)
        return spent

    one = await round_of(1)
    twelve = await round_of(12)
    # The claim, and one transaction for the batch's files, endings, terminal transitions and webhooks
    # (a copy at a time cost a claim, a transaction per stored file and one to complete each).
    assert one.commits == 2
    assert (twelve.commits, twelve.statements) == (one.commits, one.statements)


async def test_a_job_taken_over_writes_nothing_while_the_rest_of_its_batch_completes(
    setup: Setup, sim_url: str
) -> None:
    kept = await setup.prediction([f"{sim_url}/sandbox/outputs/kept.mp4"])
    lost = await setup.prediction([f"{sim_url}/sandbox/outputs/lost.mp4"])
    copier = setup.copier
    claimed = await copier._claim(10)
    assert sorted(job.prediction_id for job, _ in claimed) == sorted([kept, lost])
    # Our lease ran out mid-copy and another process claimed the job.
    async with transaction(setup.runtime.sessions) as session:
        await session.execute(
            update(OutputCopy).where(OutputCopy.prediction_id == lost).values(lease_owner="other-process")
        )
    await asyncio.gather(*(copier._run(job, done) for job, done in claimed))
    batch = [copier.outcomes.get_nowait() for _ in range(copier.outcomes.qsize())]
    assert len(batch) == 2
    await copier._store(batch)

    assert (await setup.row(kept)).status == "completed"
    assert len(await setup.webhooks(kept)) == 1
    assert (await setup.row(lost)).status == "processing"
    assert await setup.webhooks(lost) == []
    job = await setup.job(lost)
    assert (job.status, job.lease_owner, job.attempts) == ("copying", "other-process", 0)
    async with transaction(setup.runtime.sessions, readonly=True) as session:
        files = list(await session.scalars(select(StoredOutput).where(StoredOutput.prediction_id == lost)))
    assert files == []
    assert copier.unwritten == set()


async def test_a_retry_resumes_after_the_outputs_already_stored(setup: Setup, sim_url: str, sim: Any) -> None:
    first = f"{sim_url}/sandbox/generated/1000/first.mp4"
    prediction_id = await setup.prediction([first, f"{sim_url}/not-there/second.mp4"])
    await setup.copier.run_round()
    job = await setup.job(prediction_id)
    assert (job.status, job.attempts) == ("copying", 1)
    assert "404" in (job.last_error or "")
    async with transaction(setup.runtime.sessions, readonly=True) as session:
        stored = list(
            await session.scalars(select(StoredOutput.position).where(StoredOutput.prediction_id == prediction_id))
        )
    assert stored == [0]  # the first output was recorded with the retry

    # The second output is there now: the next attempt copies only it.
    async with transaction(setup.runtime.sessions) as session:
        await session.execute(
            update(OutputCopy)
            .where(OutputCopy.prediction_id == prediction_id)
            .values(sources=[first, f"{sim_url}/sandbox/outputs/second.mp4"])
        )
    fetched = sim.output_fetches
    clock.shift_to(clock.now() + timedelta(seconds=5))
    await setup.copier.run_round()
    assert sim.output_fetches == fetched + 1
    assert (await setup.row(prediction_id)).status == "completed"
    links = await setup.links(prediction_id)
    assert links is not None and len(links) == 2


async def positions(setup: Setup, prediction_id: str) -> list[int]:
    async with transaction(setup.runtime.sessions, readonly=True) as session:
        return sorted(
            await session.scalars(select(StoredOutput.position).where(StoredOutput.prediction_id == prediction_id))
        )


@dataclasses.dataclass
class Holding:
    """The real store, except that storing a second output (position 1) hangs until cancelled: a copy
    stopped half way through its outputs, without timing anything."""

    inner: OutputStore
    description: str = "holding"
    holding: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    async def put(self, key: str, chunks: AsyncIterable[bytes]) -> None:
        if key.rsplit("/", 1)[-1].startswith("1"):
            self.holding.set()
            await asyncio.Event().wait()
        await self.inner.put(key, chunks)

    def read(self, key: str, start: int, end: int) -> AsyncIterator[bytes]:
        return self.inner.read(key, start, end)

    async def delete(self, key: str) -> None:
        await self.inner.delete(key)


async def test_outputs_stored_before_a_shutdown_are_recorded(setup: Setup, sim_url: str, sim: Any) -> None:
    prediction_id = await setup.prediction([f"{sim_url}/sandbox/outputs/{n}.mp4" for n in ("first", "second")])
    copier = setup.copier
    real = copier.store
    assert real is not None
    store = copier.store = Holding(real)
    assert await copier.run_once() == 1
    await store.holding.wait()  # the first output is in the store, the second one under way

    # The worker's graceful stop: copies in progress are cancelled, the writer drained, leases handed back.
    stopping = asyncio.Event()
    stopping.set()
    await copier.drain(0)
    await copier.write_loop(stopping)
    await copier.release_leases()
    assert copier.unwritten == set()
    job = await setup.job(prediction_id)
    assert (job.status, job.lease_owner) == ("copying", None)
    assert await positions(setup, prediction_id) == [0]
    assert (await setup.row(prediction_id)).status == "processing"

    # The next holder, at once (no back-off for an interruption), copies only the second output.
    copier.store = real
    fetched = sim.output_fetches
    assert await copier.run_round() == 1
    assert sim.output_fetches == fetched + 1
    assert (await setup.row(prediction_id)).status == "completed"
    links = await setup.links(prediction_id)
    assert links is not None and len(links) == 2


async def test_a_copy_stopped_before_storing_anything_only_hands_its_lease_back(setup: Setup, sim_url: str) -> None:
    prediction_id = await setup.prediction([f"{sim_url}/sandbox/outputs/{n}.mp4" for n in ("first", "second")])
    copier = setup.copier
    assert copier.store is not None
    store = copier.store = Holding(copier.store)
    ((job, done),) = await copier._claim(10)
    done.add(0)  # an earlier attempt stored the first output: this one starts at the second
    task = asyncio.create_task(copier._run(job, done))
    await store.holding.wait()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert copier.outcomes.empty()
    assert copier.unwritten == set()
    await copier.release_leases()
    assert (await setup.job(prediction_id)).lease_owner is None


def sql_seen(runtime: Runtime) -> contextlib.AbstractContextManager[list[str]]:
    @contextlib.contextmanager
    def seen() -> Iterator[list[str]]:
        statements: list[str] = []

        def statement(_conn: Any, _cursor: Any, sql: str, *_: Any) -> None:
            statements.append(sql.lstrip().upper())

        engine = runtime.engine.sync_engine
        event.listen(engine, "before_cursor_execute", statement)
        try:
            yield statements
        finally:
            event.remove(engine, "before_cursor_execute", statement)

    return seen()


async def test_an_idle_copier_reads_and_takes_no_write_transaction(setup: Setup, sim_url: str) -> None:
    copier = setup.copier
    with cost(setup.runtime) as spent, sql_seen(setup.runtime) as statements:
        for _ in range(3):
            assert await copier.run_once() == 0
    writes = [sql for sql in statements if sql.startswith(("UPDATE", "INSERT", "DELETE", "BEGIN IMMEDIATE"))]
    assert (spent.commits, writes) == (0, [])
    assert statements  # it did look

    # Work that comes due is claimed on the next tick all the same.
    prediction_id = await setup.prediction([f"{sim_url}/sandbox/outputs/due.mp4"])
    assert await copier.run_round() == 1
    assert (await setup.row(prediction_id)).status == "completed"


async def test_thousands_of_stored_files_are_written_in_one_transaction(setup: Setup, sim_url: str) -> None:
    ids = [await setup.prediction([f"{sim_url}/sandbox/outputs/{i}.mp4"]) for i in range(5)]
    copier = setup.copier
    claimed = await copier._claim(10)
    assert len(claimed) == len(ids)
    now = clock.now()
    per_job = 800  # 4,000 rows of 9 parameters: over the 32,767 one statement may bind
    batch = [
        Outcome(
            job,
            COPYING,
            [
                dict(
                    prediction_id=job.prediction_id,
                    position=position,
                    name=f"{position}.mp4",
                    source_url=f"{sim_url}/sandbox/outputs/{position}.mp4",
                    key=f"{job.prediction_id}/{position}.mp4",
                    content_type="video/mp4",
                    size_bytes=1,
                    sha256="0" * 64,
                    stored_at=now,
                )
                for position in range(per_job)
            ],
            "the provider answered 503 for output 801",
            due=now,
        )
        for job, _ in claimed
    ]
    with cost(setup.runtime) as spent, sql_seen(setup.runtime) as statements:
        await copier.write(batch)
    inserts = [sql for sql in statements if sql.startswith("INSERT INTO STORED_OUTPUTS")]
    assert spent.commits == 1
    assert len(inserts) == -(-len(ids) * per_job // copier_module.INSERT_ROWS)
    for prediction_id in ids:
        assert await positions(setup, prediction_id) == list(range(per_job))
        assert (await setup.job(prediction_id)).attempts == 1


async def test_files_stored_under_a_lost_lease_are_deleted_once_the_job_has_failed(
    setup: Setup, sim_url: str, tmp_path: Path
) -> None:
    taken = await setup.prediction([f"{sim_url}/sandbox/outputs/taken.mp4"])
    ended = await setup.prediction([f"{sim_url}/sandbox/outputs/ended.mp4"])
    copier = setup.copier
    claimed = await copier._claim(10)
    # While we copy, another process takes one job over, and ends the other as failed.
    async with transaction(setup.runtime.sessions) as session:
        await session.execute(
            update(OutputCopy).where(OutputCopy.prediction_id == taken).values(lease_owner="other-process")
        )
        await session.execute(
            update(OutputCopy).where(OutputCopy.prediction_id == ended).values(status="failed", lease_owner=None)
        )
    await asyncio.gather(*(copier._run(job, done) for job, done in claimed))
    batch = [copier.outcomes.get_nowait() for _ in range(copier.outcomes.qsize())]
    assert sorted(len(o.files) for o in batch) == [1, 1]
    await copier._store(batch)

    root = tmp_path / "outputs"
    # The job taken over may record the same keys: its file stays. The failed one keeps no file.
    assert [p.name for p in (root / taken).iterdir()] == ["0.mp4"]
    assert not (root / ended).exists()
    assert (await positions(setup, taken), await positions(setup, ended)) == ([], [])
    assert ((await setup.job(taken)).lease_owner, (await setup.job(ended)).status) == ("other-process", "failed")
    assert copier.unwritten == set()


async def test_jobs_are_claimed_ahead_of_the_download_slots(
    setup: Setup, sim_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup.runtime.settings.output_copy_concurrency = 2
    setup.runtime.settings.output_copy_small_concurrency = 0  # small outputs share the two slots
    ids = [await setup.prediction([f"{sim_url}/sandbox/outputs/{n}.mp4"]) for n in range(5)]
    copier = setup.copier
    gate = asyncio.Event()
    started: asyncio.Queue[str] = asyncio.Queue()
    copying = most = 0
    real = copier._copy_all

    async def held(job: OutputCopy, done: set[int], files: list[dict[str, Any]], lane: Any) -> Outcome:
        nonlocal copying, most
        copying += 1
        most = max(most, copying)
        started.put_nowait(job.prediction_id)
        try:
            await gate.wait()
            return await real(job, done, files, lane)
        finally:
            copying -= 1

    monkeypatch.setattr(copier, "_copy_all", held)
    # One claim takes the slots' worth and as many again, which wait for a slot: a slot that frees
    # starts its next copy at once, not after another claim's round trip.
    assert await copier.run_once() == 4
    first = {await started.get(), await started.get()}
    assert copier.slots.locked() and started.empty()  # two download, two wait
    gate.set()
    await asyncio.gather(*copier.tasks)
    assert most == 2
    claimed = first | {started.get_nowait(), started.get_nowait()}
    await copier._store([copier.outcomes.get_nowait() for _ in range(copier.outcomes.qsize())])
    assert [(await setup.row(i)).status for i in sorted(claimed)] == ["completed"] * 4
    assert await copier.run_round() == 1
    assert [(await setup.row(i)).status for i in ids] == ["completed"] * 5


async def test_a_job_that_waited_long_for_its_slot_renews_its_lease_before_copying(
    setup: Setup, sim_url: str, sim: Any
) -> None:
    kept = await setup.prediction([f"{sim_url}/sandbox/outputs/kept.mp4"])
    taken = await setup.prediction([f"{sim_url}/sandbox/outputs/taken.mp4"])
    copier = setup.copier
    claimed = await copier._claim(10)
    # While both waited for a slot (the copies ahead of them large), one lease ran out and was taken.
    async with transaction(setup.runtime.sessions) as session:
        await session.execute(
            update(OutputCopy).where(OutputCopy.prediction_id == taken).values(lease_owner="other-process")
        )
    long_ago = asyncio.get_running_loop().time() - setup.runtime.settings.lease_s
    fetched = sim.output_fetches
    await asyncio.gather(*(copier._run(job, done, long_ago) for job, done in claimed))
    # The lease is renewed before the copy starts: the one taken over is not fetched at all.
    assert sim.output_fetches == fetched + 1
    batch = [copier.outcomes.get_nowait() for _ in range(copier.outcomes.qsize())]
    assert sorted((o.job.prediction_id, o.status, len(o.files)) for o in batch) == sorted(
        [(kept, "stored", 1), (taken, "copying", 0)]
    )
    await copier._store(batch)
    assert (await setup.row(kept)).status == "completed"
    assert ((await setup.row(taken)).status, (await setup.job(taken)).lease_owner) == ("processing", "other-process")


@dataclasses.dataclass
class Gated:
    """The real store, except that every put waits for `gate`; `log` says when each began and ended."""

    inner: OutputStore
    gate: asyncio.Event
    log: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    began: asyncio.Queue[str] = dataclasses.field(default_factory=asyncio.Queue)
    description: str = "gated"

    async def put(self, key: str, chunks: AsyncIterable[bytes]) -> None:
        prediction_id = key.split("/", 1)[0]
        self.log.append(("began", prediction_id))
        self.began.put_nowait(prediction_id)
        await self.gate.wait()
        await self.inner.put(key, chunks)
        self.log.append(("ended", prediction_id))

    def read(self, key: str, start: int, end: int) -> AsyncIterator[bytes]:
        return self.inner.read(key, start, end)

    async def delete(self, key: str) -> None:
        await self.inner.delete(key)


async def test_small_outputs_are_copied_beside_the_large_ones_which_stay_bounded(setup: Setup, sim_url: str) -> None:
    settings = setup.runtime.settings
    settings.output_copy_concurrency = 1
    settings.output_copy_small_concurrency = 3
    size = copier_module.SMALL_OUTPUT_BYTES + 1
    large = [await setup.prediction([f"{sim_url}/sandbox/generated/{size}/large{n}.mp4"]) for n in range(2)]
    smalls = [await setup.prediction([f"{sim_url}/sandbox/outputs/small{n}.mp4"]) for n in range(3)]
    copier = setup.copier
    assert copier.store is not None
    store = copier.store = Gated(copier.store, asyncio.Event())
    assert await copier.run_once() == 5
    # The three small outputs and one large one flow at once; the other large one waits for the
    # large slot (before, one slot in all: a single copy at a time).
    first = {await asyncio.wait_for(store.began.get(), 15) for _ in range(4)}
    assert first == {*smalls, large[0]} or first == {*smalls, large[1]}
    store.gate.set()
    await asyncio.gather(*copier.tasks)
    first_large, second_large = (large[0], large[1]) if large[0] in first else (large[1], large[0])
    assert store.log.index(("ended", first_large)) < store.log.index(("began", second_large))
    await copier._store([copier.outcomes.get_nowait() for _ in range(copier.outcomes.qsize())])
    assert [(await setup.row(i)).status for i in large + smalls] == ["completed"] * 5
    assert [len(links or []) for links in [await setup.links(i) for i in large + smalls]] == [1] * 5
