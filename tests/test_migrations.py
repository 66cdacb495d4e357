"""Alembic is the only source of schema, so the ORM models must describe exactly what it builds."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import delete, insert, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

import app.models  # noqa: F401 - registers every table on the metadata
from app.budgets.models import BudgetCounter
from app.core import clock
from app.core.database import Base
from app.core.ids import new_id
from app.core.migrate import alembic_config
from app.tenants.models import Tenant


def _differences(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"compare_type": True, "compare_server_default": True})
    return list(compare_metadata(context, Base.metadata))


async def test_models_and_migrations_agree(engine: AsyncEngine) -> None:
    # `engine` is migrated to head by `alembic upgrade`; autogenerate would write nothing against it.
    async with engine.connect() as connection:
        assert await connection.run_sync(_differences) == []


async def test_money_columns_refuse_negative_values(engine: AsyncEngine) -> None:
    """Migration 0004's CHECK constraints: a bug that drives a counter below zero fails loudly."""
    tenant_id = new_id("ten")
    async with engine.begin() as connection:
        await connection.execute(
            insert(Tenant.__table__).values(
                id=tenant_id,
                name="checks",
                budget_period="month",
                in_flight=0,
                webhook_secret="s",
                created_at=clock.now(),
            )
        )
    refused = [
        update(Tenant.__table__).where(Tenant.__table__.c.id == tenant_id).values(in_flight=-1),
        update(Tenant.__table__).where(Tenant.__table__.c.id == tenant_id).values(budget_cents=-1),
        insert(BudgetCounter.__table__).values(
            scope=f"tenant:{tenant_id}", period_start=clock.now(), spent_cents=0, reserved_cents=-1
        ),
        insert(BudgetCounter.__table__).values(
            scope=f"tenant:{tenant_id}", period_start=clock.now(), spent_cents=-1, reserved_cents=0
        ),
    ]
    try:
        for statement in refused:
            with pytest.raises(IntegrityError):
                async with engine.begin() as connection:
                    await connection.execute(statement)
    finally:  # the database is shared with the other tests of this worker
        async with engine.begin() as connection:
            await connection.execute(delete(Tenant.__table__).where(Tenant.__table__.c.id == tenant_id))


def test_sqlite_upgrade_keeps_rows_that_reference_rebuilt_tables(tmp_path: Path) -> None:
    """Batch mode rebuilds `tenants` on SQLite; rows of other tables that point at it must survive."""
    path = tmp_path / "upgrade.db"
    config = alembic_config(f"sqlite+aiosqlite:///{path}")
    command.upgrade(config, "0002")
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute(
            "INSERT INTO tenants (id, name, budget_period, in_flight, webhook_secret, created_at) "
            "VALUES ('ten_1', 't', 'month', 2, 's', '2026-11-30 00:00:00')"
        )
        db.execute(
            "INSERT INTO api_keys (id, tenant_id, prefix, key_hash, created_at) "
            "VALUES ('key_1', 'ten_1', 'p', 'h', '2026-11-30 00:00:00')"
        )
        db.commit()
    command.upgrade(config, "head")
    with contextlib.closing(sqlite3.connect(path)) as db:
        joined = db.execute("SELECT tenants.in_flight FROM api_keys JOIN tenants ON tenants.id = tenant_id")
        assert joined.fetchall() == [(2,)]
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []
        sql = db.execute("SELECT sql FROM sqlite_master WHERE name = 'tenants'").fetchone()[0]
        assert "ck_tenants_in_flight_nonnegative" in sql
