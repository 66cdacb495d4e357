"""Client CPU and wall time per transaction: the old settle statements (reconstructed from main) against the
new ones, on a scratch PostgreSQL database migrated to head (URL in argv[1]); statements that match no row."""

import asyncio
import sys
import time
from datetime import UTC, datetime

from sqlalchemy import Integer, bindparam, update

from app.core.database import (
    create_engine,
    create_sessionmaker,
    table_of,
    transaction,
    value_rows_params,
    value_rows_size,
)
from app.predictions import service as ps
from app.predictions.models import Prediction, PredictionStatus

P = table_of(Prediction)
OLD_CONFIRM = (
    update(P)
    .where(P.c.id == bindparam("b_id"), P.c.status == PredictionStatus.SUBMITTING)
    .values(
        upstream_id=bindparam("b_upstream_id"),
        status=PredictionStatus.PROCESSING,
        estimated_time=bindparam("b_estimated_time"),
        next_poll_at=bindparam("b_next_poll_at"),
        lease_owner=bindparam("b_mark"),
    )
)
OLD_MARKED = (
    update(P)
    .where(P.c.id.in_(bindparam("b_ids", expanding=True)), P.c.lease_owner == bindparam("b_mark"))
    .values(lease_owner=None)
    .returning(P.c.id)
)
OLD_CHARGE = update(P).where(P.c.id == bindparam("b_id")).values(charged_cents=bindparam("b_cents", type_=Integer))


async def main():
    eng = create_engine(sys.argv[1])
    S = create_sessionmaker(eng)
    now = datetime.now(UTC)

    async def old(session):
        await session.execute(
            OLD_CONFIRM,
            [{"b_id": "x", "b_upstream_id": "u", "b_estimated_time": "5-20s", "b_next_poll_at": now, "b_mark": "m"}],
        )
        await session.scalars(OLD_MARKED, {"b_ids": ["x"], "b_mark": "m"})
        await session.execute(OLD_CHARGE, [{"b_id": "x", "b_cents": 3}])

    async def new(session):
        rows = [("x", "u", "5-20s", now, 3)]
        await session.scalars(
            ps._confirm_statement(value_rows_size(1)), value_rows_params("confirm", ps._CONFIRM_SHAPE, rows)
        )

    async def nothing(session):
        pass

    for name, f in [("old", old), ("new", new), ("empty txn", nothing)] * 2:
        for _ in range(50):
            async with transaction(S) as s:
                await f(s)
        c0, w0 = time.process_time(), time.perf_counter()
        for _ in range(500):
            async with transaction(S) as s:
                await f(s)
        print(
            name,
            "cpu us/txn",
            round((time.process_time() - c0) / 500 * 1e6),
            "wall us",
            round((time.perf_counter() - w0) / 500 * 1e6),
        )
    await eng.dispose()


asyncio.run(main())
