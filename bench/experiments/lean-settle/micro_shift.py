"""The counters: the old executemany UPDATE plus the read of the spent cents against the one UPDATE ... RETURNING
(alone, and two rows with the ordered lock CTE). Scratch PostgreSQL database migrated to head, URL in argv[1]."""

import asyncio
import sys
import time
from datetime import UTC, datetime

from sqlalchemy import Integer, bindparam, select, update

from app.budgets import service as bs
from app.budgets.models import BudgetCounter
from app.core.database import (
    create_engine,
    create_sessionmaker,
    table_of,
    transaction,
    value_rows_params,
)

C = table_of(BudgetCounter)
c = C.c
OLD_SHIFT = (
    update(C)
    .where(c.scope == bindparam("b_scope"), c.period_start == bindparam("b_period"))
    .values(
        reserved_cents=c.reserved_cents + bindparam("b_reserved", type_=Integer),
        spent_cents=c.spent_cents + bindparam("b_spent", type_=Integer),
    )
)
OLD_SPENT = select(c.scope, c.period_start, c.spent_cents).where(c.scope.in_(bindparam("b_scopes", expanding=True)))
P = datetime(2026, 11, 1, tzinfo=UTC)


async def main():
    eng = create_engine(sys.argv[1])
    S = create_sessionmaker(eng)

    async def old(s):
        await s.execute(OLD_SHIFT, [{"b_scope": "tenant:t1", "b_period": P, "b_reserved": 0, "b_spent": 0}])
        list(await s.execute(OLD_SPENT, {"b_scopes": ["tenant:t1"]}))

    async def new(s):
        list(
            await s.execute(
                bs._shift_statement(1, False), value_rows_params("shift", bs._SHIFT_SHAPE, [(0, "tenant:t1", P, 0, 0)])
            )
        )

    async def new2(s):
        list(
            await s.execute(
                bs._shift_statement(2, True),
                value_rows_params("shift", bs._SHIFT_SHAPE, [(0, "tenant:t1", P, 0, 0), (1, "tenant:t2", P, 0, 0)]),
            )
        )

    for name, f in [("old", old), ("new", new), ("new 2 rows locked", new2)] * 2:
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
