"""Request-scoped dependencies shared by every router."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.database import transaction
from app.core.public_url import public_base_url
from app.runtime import Runtime


async def get_runtime(request: Request) -> Runtime:
    # async: FastAPI runs a plain `def` dependency in a thread pool, a thread hop per request.
    runtime: Runtime = request.app.state.runtime
    return runtime


async def _session(runtime: Annotated[Runtime, Depends(get_runtime)]) -> AsyncIterator[AsyncSession]:
    # scope="function" below: the transaction commits before the response is sent, so a client
    # that reads right after our answer sees what we wrote.
    async with transaction(runtime.sessions) as session:
        yield session


async def _read_session(runtime: Annotated[Runtime, Depends(get_runtime)]) -> AsyncIterator[AsyncSession]:
    async with transaction(runtime.sessions, readonly=True) as session:
        yield session


async def _public_base_url(request: Request, runtime: Annotated[Runtime, Depends(get_runtime)]) -> str:
    return public_base_url(request, runtime.settings)


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
# The base of every link the gateway hands out (statusUrl, output links).
PublicBaseUrlDep = Annotated[str, Depends(_public_base_url)]
SessionDep = Annotated[AsyncSession, Depends(_session, scope="function")]
ReadSessionDep = Annotated[AsyncSession, Depends(_read_session, scope="function")]
