"""What one GET read costs at each layer, sequentially, in this process (CPU and wall per read):

    .venv/bin/python bench/experiments/readpath/layers.py

raw asyncpg (a prepared statement on a held connection), SQLAlchemy Core on a held connection, Core with
a pool checkout per read (read_connection, what GET does now), and the ORM session (transaction(),
what GET did before). The statement is GET's own (`_READ_WITH_BALANCE`), on an empty database.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import uvloop
from sqlalchemy.dialects import postgresql

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ab

from app.core import clock
from app.core.database import create_engine, create_sessionmaker, read_connection, transaction
from app.core.settings import Settings
from app.predictions import service as predictions_service

N = 2000


async def timeit(label: str, read: Callable[[], Awaitable[object]]) -> None:
    for _ in range(100):
        await read()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(N):
        await read()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    print(f"| {label} | {cpu / N * 1e6:.0f} | {wall / N * 1e6:.0f} |")


async def main() -> None:
    await ab.fresh_db()
    workdir = Path(tempfile.mkdtemp(prefix="vidgate-layers-"))
    migrate = ab.start(ab.ROOT, ["migrate"], ab.env(ab.ROOT, "http://127.0.0.1:9", workdir), workdir / "m.log")
    assert migrate.wait(120) == 0
    url = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{ab.DB}"
    engine = create_engine(url)
    sessions = create_sessionmaker(engine)
    settings = Settings(database_url=url, admin_token="x" * 32)
    statement = predictions_service._READ_WITH_BALANCE
    params = {"b_id": "p", "b_tenant_id": "t", "b_scope": "s", "b_period_start": clock.now()}
    compiled = statement.compile(dialect=postgresql.asyncpg.dialect())  # type: ignore[attr-defined]
    full = compiled.construct_params(params)
    args = [full[name] for name in compiled.positiontup or ()]
    raw = await asyncpg.connect(f"{ab.PG}/{ab.DB}")
    prepared = await raw.prepare(str(compiled))
    held = await engine.connect()
    await held.execution_options(isolation_level="AUTOCOMMIT")

    async def via_connection() -> None:
        async with read_connection(sessions) as connection:
            await predictions_service.read_with_balance(connection, settings, "t", "p", "s", params["b_period_start"])

    async def via_session() -> None:
        async with transaction(sessions, readonly=True) as session:
            await predictions_service.read_with_balance(session, settings, "t", "p", "s", params["b_period_start"])

    try:
        print("| layer | CPU µs/read | wall µs/read |")
        print("|---|---|---|")
        for _ in range(2):
            await timeit("raw asyncpg, held connection", lambda: prepared.fetch(*args))
            await timeit("SQLAlchemy Core, held connection", lambda: held.execute(statement, params))
            await timeit("read_connection (pool checkout per read)", via_connection)
            await timeit("ORM session, transaction(readonly=True)", via_session)
    finally:
        await held.close()
        await raw.close()
        await engine.dispose()
        await ab.drop_db()


if __name__ == "__main__":
    uvloop.install()
    asyncio.run(main())
