"""Alembic is the only source of schema, so the ORM models must describe exactly what it builds."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

import app.models  # noqa: F401 - registers every table on the metadata
from app.core.database import Base


def _differences(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"compare_type": True, "compare_server_default": True})
    return list(compare_metadata(context, Base.metadata))


async def test_models_and_migrations_agree(engine: AsyncEngine) -> None:
    # `engine` is migrated to head by `alembic upgrade`; autogenerate would write nothing against it.
    async with engine.connect() as connection:
        assert await connection.run_sync(_differences) == []
