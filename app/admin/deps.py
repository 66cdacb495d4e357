"""Operator authentication: `Authorization: Bearer <VIDGATE_ADMIN_TOKEN>` or an operator token (`vgo_...`,
SPEC §13; its role decides whether it may change anything: app/operators), failures throttled per
address (app/admin/throttle.py)."""

from __future__ import annotations

import hmac
from functools import partial
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.admin import throttle
from app.core.database import transaction
from app.core.errors import AppError
from app.core.settings import SANDBOX_ADMIN_TOKEN, Settings
from app.deps import RuntimeDep
from app.operators import service as operators_service
from app.operators.service import Operator
from app.runtime import Runtime

bearer = HTTPBearer(
    auto_error=False, scheme_name="AdminToken", description="VIDGATE_ADMIN_TOKEN or an operator token (vgo_...)"
)
# What a viewer may ask: everything that reads.
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class InvalidAdminToken(AppError):
    status = 401
    code = "invalid_admin_token"
    title = "Missing or wrong operator token"


def admin_token(settings: Settings) -> str | None:
    if settings.admin_token is not None and settings.admin_token.get_secret_value():
        return settings.admin_token.get_secret_value()
    return SANDBOX_ADMIN_TOKEN if settings.sandbox else None


def is_admin_token(settings: Settings, given: str) -> bool:
    """The publicly documented sandbox token opens nothing outside sandbox mode, however configured."""
    expected = admin_token(settings)
    if expected is None or (given == SANDBOX_ADMIN_TOKEN and not settings.sandbox):
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


async def operator_of(runtime: Runtime, given: str) -> Operator | None:
    """Who `given` is: the admin token, an active operator token (one lookup by its hash), or nobody."""
    if is_admin_token(runtime.settings, given):
        return operators_service.ADMIN
    if given.startswith(operators_service.TOKEN_PREFIX):
        async with transaction(runtime.sessions, readonly=True) as session:
            return await operators_service.authenticate(session, given)
    return None


async def require_admin(
    request: Request, runtime: RuntimeDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> Operator:
    given = credentials.credentials if credentials else ""
    operator = await throttle.identified(request, runtime.settings, given, partial(operator_of, runtime))
    if operator is None:
        raise InvalidAdminToken(
            "Send the operator token as 'Authorization: Bearer <VIDGATE_ADMIN_TOKEN>' or an operator token (vgo_...).",
            headers={"WWW-Authenticate": "Bearer"},
        )
    # Every operator route that is not a read changes something: a viewer is refused before it runs.
    if request.method not in READ_METHODS:
        operators_service.require_write(operator)
    return operator


OperatorDep = Annotated[Operator, Depends(require_admin)]
