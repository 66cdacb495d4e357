"""What the dashboard's pages read. Every query is bounded: by the number of tenants, by a page size
with an index giving its order, or by a range of a primary key. Operator actions are not here: the
router calls the same service functions as the operator API and the CLI.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import Select, and_, case, func, literal, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.budgets import scopes as budget_scopes
from app.budgets import service as budgets_service
from app.budgets.models import BudgetCounter, DailyUsage
from app.core import clock
from app.predictions.models import Prediction
from app.queue import service as queue_service
from app.tenants.models import Tenant
from app.webhooks.models import WebhookDelivery

PAGE_SIZE = 50
OVERVIEW_PAGE_SIZE = 100
IN_FLIGHT = ("submitting", "processing", "queued", "sending")
PREDICTION_STATUSES = ("submitting", "queued", "sending", "processing", "completed", "failed", "rejected")
DELIVERY_STATUSES = ("pending", "succeeded", "dead")
CHART_DAYS = 30


@dataclass(frozen=True)
class TenantRow:
    id: str
    name: str
    budget_cents: int | None
    budget_period: str
    spent_cents: int
    reserved_cents: int
    refusals_today: int
    in_flight: int = 0
    queued: int = 0  # waiting in the fair queue (SPEC §12)
    webhooks_pending: int = 0
    webhooks_dead: int = 0

    @property
    def used_percent(self) -> float | None:
        if not self.budget_cents:
            return None
        return 100.0 * (self.spent_cents + self.reserved_cents) / self.budget_cents


@dataclass(frozen=True)
class Overview:
    tenants: list[TenantRow]
    tenant_count: int
    spent_cents: int
    reserved_cents: int
    refusals_today: int
    in_flight: int
    webhooks_pending: int
    webhooks_dead: int
    page: int
    has_next: bool
    queued: int = 0  # waiting in the fair queue (SPEC §12)


SORTS = ("name", "spent", "used", "refusals")


def _current_counter_join(now: datetime) -> Any:
    """The tenant's counter row for its current period: one primary-key lookup per tenant."""
    starts = {kind: budgets_service.period_of(kind, now).start for kind in ("day", "week", "month", "total")}
    period_start = case(
        (Tenant.budget_period == "day", literal(starts["day"], BudgetCounter.period_start.type)),
        (Tenant.budget_period == "week", literal(starts["week"], BudgetCounter.period_start.type)),
        (Tenant.budget_period == "month", literal(starts["month"], BudgetCounter.period_start.type)),
        else_=literal(starts["total"], BudgetCounter.period_start.type),
    )
    return and_(
        BudgetCounter.scope == budget_scopes.tenant_scope_of(Tenant.id), BudgetCounter.period_start == period_start
    )


def _tenant_filter(stmt: Select[Any], search: str | None) -> Select[Any]:
    stmt = stmt.where(Tenant.deleted_at.is_(None))
    if search:
        pattern = "%" + search.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        stmt = stmt.where(or_(func.lower(Tenant.name).like(pattern, escape="\\"), Tenant.id == search))
    return stmt


async def overview(session: AsyncSession, *, search: str | None, sort: str, descending: bool, page: int) -> Overview:
    now = clock.now()
    today = now.date()
    spent = func.coalesce(BudgetCounter.spent_cents, 0)
    reserved = func.coalesce(BudgetCounter.reserved_cents, 0)
    refusals = func.coalesce(DailyUsage.refusals, 0)
    joined = (
        select()
        .select_from(Tenant)
        .outerjoin(BudgetCounter, _current_counter_join(now))
        .outerjoin(DailyUsage, and_(DailyUsage.tenant_id == Tenant.id, DailyUsage.day == today))
    )
    used = case((Tenant.budget_cents > 0, (spent + reserved) * 1.0 / Tenant.budget_cents), else_=-1.0)
    order_by: Any = {"name": func.lower(Tenant.name), "spent": spent, "used": used, "refusals": refusals}[sort]
    rows_stmt = _tenant_filter(
        joined.add_columns(
            Tenant.id, Tenant.name, Tenant.budget_cents, Tenant.budget_period, spent, reserved, refusals
        ),
        search,
    )
    rows_stmt = rows_stmt.order_by(order_by.desc() if descending else order_by.asc(), Tenant.id)
    rows_stmt = rows_stmt.limit(OVERVIEW_PAGE_SIZE + 1).offset(page * OVERVIEW_PAGE_SIZE)
    rows = (await session.execute(rows_stmt)).all()
    totals = (
        await session.execute(
            _tenant_filter(
                joined.add_columns(func.count(Tenant.id), func.sum(spent), func.sum(reserved), func.sum(refusals)),
                search,
            )
        )
    ).one()
    page_ids = [row.id for row in rows[:OVERVIEW_PAGE_SIZE]]
    in_flight = await _in_flight_by_tenant(session, page_ids)
    health = await _webhook_health_by_tenant(session, page_ids)
    depths = await queue_service.depths(session)  # one row per tenant that ever queued
    tenants = [
        TenantRow(
            id=row.id,
            name=row.name,
            budget_cents=row.budget_cents,
            budget_period=row.budget_period,
            spent_cents=int(row[4]),
            reserved_cents=int(row[5]),
            refusals_today=int(row[6]),
            in_flight=in_flight.get(row.id, 0),
            queued=depths.get(row.id, 0),
            webhooks_pending=health.get((row.id, "pending"), 0),
            webhooks_dead=health.get((row.id, "dead"), 0),
        )
        for row in rows[:OVERVIEW_PAGE_SIZE]
    ]
    all_health = await _webhook_health_by_tenant(session, None)
    return Overview(
        tenants=tenants,
        tenant_count=int(totals[0] or 0),
        spent_cents=int(totals[1] or 0),
        reserved_cents=int(totals[2] or 0),
        refusals_today=int(totals[3] or 0),
        in_flight=await _in_flight_total(session),
        webhooks_pending=sum(n for (_, status), n in all_health.items() if status == "pending"),
        webhooks_dead=sum(n for (_, status), n in all_health.items() if status == "dead"),
        page=page,
        has_next=len(rows) > OVERVIEW_PAGE_SIZE,
        queued=sum(depths.values()),
    )


async def _in_flight_by_tenant(session: AsyncSession, tenant_ids: list[str]) -> dict[str, int]:
    # Through the (status, created_at) index: as many rows as are in flight, never the history.
    if not tenant_ids:
        return {}
    rows = await session.execute(
        select(Prediction.tenant_id, func.count())
        .where(Prediction.status.in_(IN_FLIGHT), Prediction.tenant_id.in_(tenant_ids))
        .group_by(Prediction.tenant_id)
    )
    return {tenant_id: int(n) for tenant_id, n in rows}


async def _in_flight_total(session: AsyncSession) -> int:
    return int(await session.scalar(select(func.count()).where(Prediction.status.in_(IN_FLIGHT))) or 0)


async def _webhook_health_by_tenant(session: AsyncSession, tenant_ids: list[str] | None) -> dict[tuple[str, str], int]:
    # Through the (status, id) index: pending and dead rows only, never the delivered history.
    stmt = select(WebhookDelivery.tenant_id, WebhookDelivery.status, func.count()).where(
        WebhookDelivery.status.in_(("pending", "dead"))
    )
    if tenant_ids is not None:
        if not tenant_ids:
            return {}
        stmt = stmt.where(WebhookDelivery.tenant_id.in_(tenant_ids))
    rows = await session.execute(stmt.group_by(WebhookDelivery.tenant_id, WebhookDelivery.status))
    return {(tenant_id, status): int(n) for tenant_id, status, n in rows}


# ---------------------------------------------------------------- one tenant


@dataclass(frozen=True)
class Day:
    day: date
    spent_cents: int
    predictions: int
    refusals: int


async def daily_spend(session: AsyncSession, tenant_id: str) -> list[Day]:
    """The last 30 UTC days, oldest first, from the rollup (at most 30 rows of its primary key)."""
    last = clock.now().date()
    first = last - timedelta(days=CHART_DAYS - 1)
    rows = {r.day: r for r in await budgets_service.daily_usage(session, tenant_id, first, last)}
    days = []
    for offset in range(CHART_DAYS):
        day = first + timedelta(days=offset)
        row = rows.get(day)
        days.append(Day(day, row.spent_cents, row.predictions, row.refusals) if row else Day(day, 0, 0, 0))
    return days


async def in_flight_of(session: AsyncSession, tenant_id: str) -> int:
    return (await _in_flight_by_tenant(session, [tenant_id])).get(tenant_id, 0)


# ---------------------------------------------------------------- lists


@dataclass(frozen=True)
class ListFilters:
    tenant: str | None = None
    status: str | None = None
    start: datetime | None = None
    end: datetime | None = None
    cursor: str | None = None


def _id_at(prefix: str, moment: datetime) -> str:
    """The smallest id made at `moment`: ids start with their creation time (app/core/ids.py)."""
    return f"{prefix}_{int(moment.astimezone(UTC).timestamp() * 1000):012x}"


def _paged(stmt: Select[Any], id_column: Any, prefix: str, filters: ListFilters) -> Select[Any]:
    """Newest first, by id, which sorts by creation time: a time range is a range of ids, and every
    filter combination has an index that yields this order ((tenant_id, id), (status, id) or the key)."""
    if filters.start is not None:
        stmt = stmt.where(id_column >= _id_at(prefix, filters.start))
    if filters.end is not None:
        stmt = stmt.where(id_column < _id_at(prefix, filters.end))
    if filters.cursor:
        stmt = stmt.where(id_column < filters.cursor)
    return stmt.order_by(id_column.desc()).limit(PAGE_SIZE + 1)


def _page_of(rows: list[Any]) -> tuple[list[Any], str | None]:
    return rows[:PAGE_SIZE], rows[PAGE_SIZE - 1].id if len(rows) > PAGE_SIZE else None


async def list_predictions(session: AsyncSession, filters: ListFilters) -> tuple[list[Prediction], str | None]:
    stmt = select(Prediction)
    if filters.tenant:
        stmt = stmt.where(Prediction.tenant_id == filters.tenant)
    if filters.status:
        stmt = stmt.where(Prediction.status == filters.status)
    if filters.status and not filters.tenant:
        # The (status, created_at) index gives this order; ids and creation times rise together.
        return await _predictions_by_status(session, stmt, filters)
    return _page_of(list(await session.scalars(_paged(stmt, Prediction.id, "pred", filters))))


async def _predictions_by_status(
    session: AsyncSession, stmt: Select[Any], filters: ListFilters
) -> tuple[list[Prediction], str | None]:
    if filters.start is not None:
        stmt = stmt.where(Prediction.created_at >= filters.start)
    if filters.end is not None:
        stmt = stmt.where(Prediction.created_at < filters.end)
    if filters.cursor:
        at = select(Prediction.created_at).where(Prediction.id == filters.cursor).scalar_subquery()
        stmt = stmt.where(
            or_(Prediction.created_at < at, and_(Prediction.created_at == at, Prediction.id < filters.cursor))
        )
    stmt = stmt.order_by(Prediction.created_at.desc(), Prediction.id.desc()).limit(PAGE_SIZE + 1)
    return _page_of(list(await session.scalars(stmt)))


async def list_deliveries(session: AsyncSession, filters: ListFilters) -> tuple[list[WebhookDelivery], str | None]:
    stmt = select(WebhookDelivery)
    if filters.tenant:
        stmt = stmt.where(WebhookDelivery.tenant_id == filters.tenant)
    if filters.status:
        stmt = stmt.where(WebhookDelivery.status == filters.status)
    return _page_of(list(await session.scalars(_paged(stmt, WebhookDelivery.id, "msg", filters))))


async def tenant_names(session: AsyncSession, tenant_ids: set[str]) -> dict[str, str]:
    if not tenant_ids:
        return {}
    rows = await session.execute(select(Tenant.id, Tenant.name).where(Tenant.id.in_(tenant_ids)))
    return {tenant_id: name for tenant_id, name in rows}
