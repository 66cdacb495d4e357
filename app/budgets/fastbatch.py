"""A ledger writer batch in one statement (PostgreSQL): the common holds and settles of a batch, applied
by one SQL statement that commits on its own, instead of a transaction of ten.

Why: the writer runs one batch at a time, and every statement of a batch is a round trip whose answer
waits in the event loop behind the requests' work. Under load a batch of ten statements took 15 to 22 ms,
so the writer, not the CPU, capped the submits a process serves (bench/FINDINGS.md, issue 25). One
statement is one round trip and one commit.

What it does is exactly what app/budgets/movements.py.move_batch and the writer's confirm and insert do
for the same jobs (tests/test_fastbatch.py runs both on the same batches and compares every row):
- settles: each prediction still waiting for its confirm ("submitting", or "sending" from the queue) and
  never charged starts processing, charged its cost; its hold becomes the cost on the tenant's counter;
  a ledger row "settle"; the tenant's day adds the cost (and one prediction, when the cost is not 0);
- holds: each tenant's group is held on its counter in one conditional step if the whole group fits
  within the tenant's budget (after the batch's settles), at the highest of its candidates' prices and
  the price point's highest bill seen; each held prediction is inserted "submitting" with a ledger row
  "reserve".

Only the common case comes here (app/predictions/onestatement.py decides): no Idempotency-Key, a tenant with
neither ratePerMinute nor maxConcurrent, a key with no budget of its own, and a settle that teaches no
new price. Everything else, and everything this statement leaves undone, goes through move_batch, which
holds one by one and names the refusal:
- a group that does not fit, or whose counter does not exist yet (a new period), is not held here;
- a settle whose prediction is no longer waiting (a late or repeated confirm) is not settled here;
- if a settle would take its tenant across 50, 80 or 100 % of its budget, the statement does nothing at
  all (`go` is false), so that the threshold notice and its webhook are written in the same transaction
  as the charge, by move_batch.

Locks, in the lock order (app/budgets/movements.py, top): the settles' predictions (sorted), then the
counters (sorted by scope: tenants in order, `locked`), then the days: every write is gated on `gate`,
which reads `locked`, so no row is written before the counters are locked. It takes no rate-limit or
slot row.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import ARRAY, Boolean, Date, Integer, String, bindparam, column, text
from sqlalchemy.ext.asyncio import AsyncConnection

from app.budgets.scopes import TENANT, tenant_scope
from app.budgets.service import THRESHOLDS
from app.core import prebuilt
from app.core.database import UTCDateTime

_LINES = ", ".join(f"({p})" for p in THRESHOLDS)
_TENANT = f"'{TENANT}'"  # a counter's scope in SQL, as app/budgets/scopes.py names it

# Statuses are written as the enum's values (app/predictions/models.py): this module names columns of
# the predictions table without importing the domain (money depends on no domain but tenants).
_SQL = f"""
WITH
s AS (
    SELECT * FROM json_to_recordset(CAST(:settles AS JSON))
        AS s(prediction_id text, upstream_id text, estimated_time text, next_poll_at timestamptz, provider text,
             cost int, ref text)
),
h AS (
    SELECT h.*, pp.max_seen_cents AS seen,
        GREATEST(h.floor_cents,
                 CASE WHEN h.priced THEN GREATEST(h.table_cents, COALESCE(pp.max_seen_cents, 0)) ELSE 0 END) AS amount
    FROM ROWS FROM (json_to_recordset(CAST(:holds AS JSON))
        AS (prediction_id text, tenant_id text, api_key_id text, model_id text, model_name text, params text,
            webhook_url text, webhook_events text, meta text, public_base_url text, period_start timestamptz,
            floor_cents int, table_cents int, priced boolean, resolution text, duration_s int)) WITH ORDINALITY
        AS h(id, tenant_id, api_key_id, model_id, model_name, params, webhook_url, webhook_events, meta,
             public_base_url, period_start, floor_cents, table_cents, priced, resolution, duration_s, ord)
    LEFT JOIN price_points pp
        ON pp.model_id = h.model_id AND pp.resolution = h.resolution AND pp.duration_s = h.duration_s
),
sp AS MATERIALIZED (
    SELECT p.id, p.tenant_id, p.api_key_id, p.model_id, p.period_start, p.estimate_cents, s.cost, s.provider
    FROM predictions p JOIN s ON p.id = s.prediction_id
    -- The fence is not an index condition (IS TRUE): moving rows out of "submitting" leaves dead entries in
    -- the status index, and the primary key finds these rows directly.
    WHERE p.id = ANY(:s_id) AND (p.status IN ('submitting', 'sending') AND p.charged_cents IS NULL) IS TRUE
    ORDER BY p.id
    FOR UPDATE OF p
),
touch AS (
    SELECT scope, period_start, tenant_id, sum(dr)::int AS dr, sum(ds)::int AS ds, sum(amt)::int AS amt
    FROM (
        SELECT {_TENANT} || tenant_id AS scope, period_start, tenant_id,
               -estimate_cents AS dr, cost AS ds, 0 AS amt
        FROM sp
        UNION ALL
        SELECT {_TENANT} || tenant_id, period_start, tenant_id, 0, 0, amount FROM h
    ) AS m
    GROUP BY scope, period_start, tenant_id
),
locked AS MATERIALIZED (
    SELECT c.scope, c.period_start, c.spent_cents, c.reserved_cents
    FROM budget_counters c JOIN touch t ON c.scope = t.scope AND c.period_start = t.period_start
    WHERE c.scope = ANY(:scopes)
    ORDER BY c.scope, c.period_start
    FOR UPDATE OF c
),
plan AS MATERIALIZED (
    SELECT t.*, l.spent_cents AS spent, tn.budget_cents,
        (t.amt = 0 OR tn.budget_cents IS NULL
         OR l.spent_cents::bigint + l.reserved_cents + t.ds + t.dr + t.amt <= tn.budget_cents) AS fits
    FROM touch t
    JOIN locked l ON l.scope = t.scope AND l.period_start = t.period_start
    JOIN tenants tn ON tn.id = t.tenant_id
),
gate AS MATERIALIZED (
    SELECT NOT EXISTS (
        SELECT 1 FROM plan, (VALUES {_LINES}) AS line(percent)
        WHERE plan.ds <> 0 AND plan.budget_cents > 0
          AND plan.spent::bigint * 100 < line.percent::bigint * plan.budget_cents
          AND line.percent::bigint * plan.budget_cents <= (plan.spent::bigint + plan.ds) * 100
    ) AND (SELECT count(*) FROM touch WHERE dr <> 0 OR ds <> 0)
        = (SELECT count(*) FROM plan WHERE dr <> 0 OR ds <> 0) AS go
),
confirmed AS (
    UPDATE predictions p
    SET upstream_id = s.upstream_id, status = 'processing', estimated_time = s.estimated_time,
        next_poll_at = s.next_poll_at, provider = s.provider,
        upstream_ref = COALESCE(CAST(s.ref AS JSON), p.upstream_ref), charged_cents = s.cost
    FROM sp JOIN s ON s.prediction_id = sp.id
    WHERE p.id = sp.id AND (SELECT go FROM gate)
    RETURNING p.id
),
counted AS (
    UPDATE budget_counters c
    SET reserved_cents = c.reserved_cents + p.dr + CASE WHEN p.fits THEN p.amt ELSE 0 END,
        spent_cents = c.spent_cents + p.ds
    FROM plan p
    WHERE c.scope = p.scope AND c.period_start = p.period_start AND (SELECT go FROM gate)
    RETURNING c.scope
),
held AS MATERIALIZED (
    SELECT h.* FROM h JOIN plan p ON p.scope = {_TENANT} || h.tenant_id AND p.period_start = h.period_start
    WHERE p.fits AND (SELECT go FROM gate)
),
inserted AS (
    INSERT INTO predictions (id, tenant_id, api_key_id, model_id, model_name, status, params, webhook_url,
        webhook_events, metadata, estimate_cents, holds_slot, charged_cents, period_start, created_at,
        poll_count, poll_failures, public_base_url, holds_provider_slot)
    SELECT id, tenant_id, api_key_id, model_id, model_name, 'submitting', CAST(params AS JSON), webhook_url,
        CAST(webhook_events AS JSON), CAST(meta AS JSON), amount, false, NULL, period_start, :now,
        0, 0, public_base_url, false
    FROM held ORDER BY ord
    RETURNING id
),
ledger AS (
    INSERT INTO ledger_entries (tenant_id, api_key_id, prediction_id, model_id, provider, period_start, kind,
        reserved_delta, spent_delta, note, created_at)
    SELECT tenant_id, api_key_id, id, model_id, provider, period_start, 'settle', -estimate_cents, cost, NULL, :now
    FROM sp WHERE (SELECT go FROM gate)
    UNION ALL
    SELECT tenant_id, api_key_id, id, model_id, NULL, period_start, 'reserve', amount, 0, NULL, :now FROM held
    RETURNING id
),
days AS (
    INSERT INTO daily_usage (tenant_id, day, spent_cents, predictions, refusals)
    SELECT tenant_id, :day, sum(cost), count(*), 0 FROM sp
    WHERE cost <> 0 AND (SELECT go FROM gate) AND (SELECT count(*) FROM counted) >= 0
    GROUP BY tenant_id ORDER BY tenant_id
    ON CONFLICT (tenant_id, day) DO UPDATE SET
        spent_cents = daily_usage.spent_cents + excluded.spent_cents,
        predictions = daily_usage.predictions + excluded.predictions
    RETURNING tenant_id
)
SELECT (SELECT go FROM gate) AS go,
    ARRAY(SELECT id FROM confirmed) AS confirmed,
    ARRAY(SELECT id FROM inserted) AS held,
    ARRAY(SELECT amount FROM h ORDER BY ord) AS amounts,
    ARRAY(SELECT seen FROM h ORDER BY ord) AS seen,
    (SELECT count(*) FROM ledger) AS ledger_rows,
    (SELECT count(*) FROM days) AS days
"""  # noqa: S608 (only constants of the code are formatted in: the thresholds, the scope prefix)

_PARAMS: dict[str, Any] = {
    "settles": String(),  # FastSettle rows as JSON: one parameter rather than an array per field
    "s_id": ARRAY(String()),  # their predictions' ids again, for the primary key's index condition
    "holds": String(),  # FastHold rows as JSON
    "scopes": ARRAY(String()),
    "now": UTCDateTime(),
    "day": Date(),
}
STATEMENT = (
    text(_SQL)
    .bindparams(*(bindparam(name, type_=type_) for name, type_ in _PARAMS.items()))
    .columns(
        column("go", Boolean()),
        column("confirmed", ARRAY(String())),
        column("held", ARRAY(String())),
        column("amounts", ARRAY(Integer())),
        column("seen", ARRAY(Integer())),
        column("ledger_rows", Integer()),
        column("days", Integer()),
    )
)


@dataclass(frozen=True)
class FastSettle:
    """A confirm: what the prediction becomes, and what it costs. The statement reads the fields by name."""

    prediction_id: str
    tenant_id: str
    upstream_id: str
    estimated_time: str | None
    next_poll_at: datetime
    provider: str
    cost: int
    ref: str | None  # the provider's reference (JSON text), or None


@dataclass(frozen=True)
class FastHold:
    """A new prediction to hold and insert. Its hold is the highest of `floor_cents` (the candidates'
    prices by the providers file, 0 if none) and, if `priced`, of `table_cents` (the price table's
    estimate) and the price point's highest bill seen: budgets_service.hold_cents, read in the statement.
    The statement reads the fields by name."""

    prediction_id: str
    tenant_id: str
    api_key_id: str
    model_id: str
    model_name: str
    params: str  # JSON text, as are webhook_events and meta
    webhook_url: str | None
    webhook_events: str | None
    meta: str | None
    public_base_url: str | None
    period_start: datetime
    floor_cents: int
    table_cents: int
    priced: bool
    resolution: str
    duration_s: int


@dataclass(frozen=True)
class Applied:
    """What the statement did: nothing at all unless `go`; the predictions confirmed and the ones held;
    per hold, in order, the cents it holds (or would have) and the price point's highest bill seen."""

    go: bool
    confirmed: set[str]
    held: set[str]
    amounts: list[int]
    seen: list[int | None]


async def apply(
    connection: AsyncConnection, holds: list[FastHold], settles: list[FastSettle], now: datetime
) -> Applied:
    """Run the statement on `connection`, in AUTOCOMMIT (its own transaction) or in the caller's."""
    # The rows go as JSON, matched by field name (json_to_recordset): encoding an array per field cost
    # asyncpg about 70 us a batch (two abstract-class checks for every text element), one JSON text 2 us.
    params: dict[str, Any] = {
        "settles": orjson.dumps(settles).decode(),
        "s_id": [s.prediction_id for s in settles],
        "holds": orjson.dumps(holds).decode(),
        "scopes": sorted({tenant_scope(t) for t in [*(h.tenant_id for h in holds), *(s.tenant_id for s in settles)]}),
        "now": now,
        "day": now.date(),
    }
    (row,) = await prebuilt.fetch(connection, STATEMENT, params)
    return Applied(bool(row.go), set(row.confirmed), set(row.held), list(row.amounts), list(row.seen))
