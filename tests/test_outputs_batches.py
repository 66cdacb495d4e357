"""The copier works in batches like the poller: one claim for many jobs, and one transaction that
stores their files, ends them and makes their predictions terminal with their webhooks. So a round
of twelve copies costs the same transactions and statements as a round of one, not three
transactions per prediction; and the batch keeps every guarantee of a copy written alone (a job
whose lease was taken over writes nothing, a retry resumes after the files already stored)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from sqlalchemy import event, select, update

from app.core import clock
from app.core.database import transaction
from app.outputs.models import OutputCopy, StoredOutput
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
