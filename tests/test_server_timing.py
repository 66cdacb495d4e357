"""`Server-Timing` on every answer: the database and upstream time a request spent, and the rest."""

from __future__ import annotations

import re

import httpx

from tests.conftest import Api

TIMING = re.compile(r"^db;dur=(\d+\.\d), upstream;dur=(\d+\.\d), app;dur=(\d+\.\d)$")


def durations(answer: httpx.Response) -> tuple[float, float, float]:
    match = TIMING.match(answer.headers["server-timing"])
    assert match, answer.headers["server-timing"]
    db, upstream, app = (float(v) for v in match.groups())
    return db, upstream, app


async def test_every_answer_says_where_its_time_went(api: Api) -> None:
    tenant = await api.tenant(budgetCents=100)
    submitted = await tenant.submit()
    db, upstream, _ = durations(submitted)
    assert db > 0 and upstream > 0  # the hold and settle, and the forward
    got = await tenant.get(f"/api/v1/predictions/{submitted.json()['id']}")
    db, upstream, _ = durations(got)
    assert db > 0 and upstream == 0  # served from the database alone
    # Answers that touch neither, and refusals, carry it too.
    db, upstream, _ = durations(await api.http.get("/healthz"))
    assert db == 0 and upstream == 0
    durations(await api.http.get("/api/v1/usage"))
