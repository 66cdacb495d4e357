"""The audit log (SPEC §13): one append-only row per change, added to the transaction that makes the change,
so a change and its record commit or roll back together. Rows are never updated or deleted.

`before` and `after` hold what an operator needs to see what changed, never a secret or a key: callers pass
the public view of the thing (a key's prefix, a tenant without its webhook secret)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.audit.models import AuditEntry
from app.core import clock
from app.core.ids import new_id
from app.core.logging import request_id_var
from app.core.types import moment_bound


def target(noun: str, ident: str) -> str:
    """How a row names what it is about (`tenant:ten_...`), and an actor a tenant's key (`key:vg_...`)."""
    return f"{noun}:{ident}"


async def record(
    session: AsyncSession,
    actor: str,
    action: str,
    target: str,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
) -> None:
    """`action` is `{noun}.{verb}`; `target` is `{noun}:{id}`; the request id is the current request's."""
    session.add(
        AuditEntry(
            id=new_id("aud"),
            at=clock.now(),
            actor=actor,
            action=action,
            target=target,
            before=_plain(before),
            after=_plain(after),
            request_id=request_id_var.get(),
        )
    )
    await session.flush()


def _plain(value: dict[str, Any] | None) -> dict[str, Any] | None:
    """JSON-ready: moments as the gateway writes them."""
    if value is None:
        return None
    return {k: clock.iso(v) if isinstance(v, datetime) else v for k, v in value.items()}


@dataclass(frozen=True)
class AuditFilters:
    target: str | None = None
    actor: str | None = None
    action: str | None = None
    start: datetime | None = None
    end: datetime | None = None
    cursor: str | None = None

    @classmethod
    def of(
        cls,
        *,
        target: str | None,
        actor: str | None,
        action: str | None,
        from_: str | None,
        to: str | None,
        cursor: str | None,
    ) -> AuditFilters:
        """The filters as the API, the CLI and the dashboard take them: a blank one is no filter, `from` and
        `to` a date or a moment (a date's `to` takes in its whole day)."""
        return cls(
            target=_given(target),
            actor=_given(actor),
            action=_given(action),
            start=moment_bound(from_, "from", end=False),
            end=moment_bound(to, "to", end=True),
            cursor=_given(cursor),
        )


def _given(value: str | None) -> str | None:
    return (value or "").strip() or None


async def list_entries(session: AsyncSession, filters: AuditFilters, limit: int) -> tuple[list[AuditEntry], str | None]:
    """Newest first, `limit` a page; the cursor is the last id shown."""
    stmt = select(AuditEntry)
    if filters.target:
        stmt = stmt.where(AuditEntry.target == filters.target)
    if filters.actor:
        stmt = stmt.where(AuditEntry.actor == filters.actor)
    if filters.action:
        stmt = stmt.where(AuditEntry.action == filters.action)
    if filters.start is not None:
        stmt = stmt.where(AuditEntry.at >= filters.start)
    if filters.end is not None:
        stmt = stmt.where(AuditEntry.at < filters.end)
    if filters.cursor:
        stmt = stmt.where(AuditEntry.id < filters.cursor)
    rows = list(await session.scalars(stmt.order_by(AuditEntry.id.desc()).limit(limit + 1)))
    return rows[:limit], rows[limit - 1].id if len(rows) > limit else None


def present(entry: AuditEntry) -> dict[str, Any]:
    return {
        "id": entry.id,
        "at": entry.at,
        "actor": entry.actor,
        "action": entry.action,
        "target": entry.target,
        "before": entry.before,
        "after": entry.after,
        "requestId": entry.request_id,
    }
