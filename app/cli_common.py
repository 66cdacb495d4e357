"""What every `vidgate` operator command shares: JSON or text output, one transaction, and who acts.

The CLI works on the database directly (no server needed), so whoever runs it holds the database's
credentials and can do anything: its actor in the audit log is `admin`. With VIDGATE_OPERATOR_TOKEN set
to an operator token (`vgo_...`) it acts as that operator instead: `operator:{name}`, and a viewer's
token makes every command that changes something refuse. A token that is unknown or revoked stops the
command (fail closed)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import orjson
import typer

from app.core.responses import dumps
from app.core.settings import get_settings

T = TypeVar("T")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
OPERATOR_TOKEN_ENV = "VIDGATE_OPERATOR_TOKEN"  # noqa: S105 - the variable's name


def emit(data: Any, as_json: bool, text: Callable[[Any], str]) -> None:
    if as_json:
        typer.echo(dumps(data, option=orjson.OPT_INDENT_2).decode())
    else:
        typer.echo(text(data))


def with_session(work: Callable[[Any], Awaitable[T]]) -> T:
    from app.core.database import create_engine, create_sessionmaker, transaction
    from app.core.errors import AppError

    async def run() -> T:
        engine = create_engine(get_settings().database_url, pool_size=2)
        try:
            async with transaction(create_sessionmaker(engine)) as session:
                return await work(session)
        finally:
            await engine.dispose()

    try:
        return asyncio.run(run())
    except AppError as exc:
        typer.echo(f"error: {exc.detail}", err=True)
        raise typer.Exit(2) from None


def as_operator(work: Callable[[Any, Any], Awaitable[T]], *, writes: bool) -> T:
    """`work(session, operator)` in one transaction, as the operator the environment names (see above)."""
    from app.operators import service as operators_service

    async def run(session: Any) -> T:
        raw = os.environ.get(OPERATOR_TOKEN_ENV, "")
        operator = operators_service.ADMIN
        if raw:
            found = await operators_service.authenticate(session, raw)
            if found is None:
                raise operators_service.Forbidden(f"{OPERATOR_TOKEN_ENV} is not an active operator token.")
            operator = found
        if writes:
            operators_service.require_write(operator)
        return await work(session, operator)

    return with_session(run)
