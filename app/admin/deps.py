"""Operator authentication: `Authorization: Bearer <VIDGATE_ADMIN_TOKEN>`, failures throttled per address
(app/admin/throttle.py)."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.admin import throttle
from app.core.errors import AppError
from app.core.settings import SANDBOX_ADMIN_TOKEN, Settings
from app.deps import RuntimeDep

bearer = HTTPBearer(auto_error=False, scheme_name="AdminToken", description="VIDGATE_ADMIN_TOKEN")


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


async def require_admin(
    request: Request,
    runtime: RuntimeDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    given = credentials.credentials if credentials else ""
    settings = runtime.settings
    if not throttle.checked(request, settings, given, lambda token: is_admin_token(settings, token)):
        raise InvalidAdminToken(
            "Send the operator token as 'Authorization: Bearer <VIDGATE_ADMIN_TOKEN>'.",
            headers={"WWW-Authenticate": "Bearer"},
        )
