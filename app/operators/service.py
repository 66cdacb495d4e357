"""Operator tokens (SPEC §13) and who an operator is: the actor the audit log names and the role that
decides whether it may change anything. Functions flush; the caller's transaction commits."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.audit import service as audit_service
from app.core import clock
from app.core.errors import AppError, Conflict, NotFound
from app.core.ids import new_id
from app.operators.models import OperatorToken
from app.operators.schemas import OperatorTokenCreate, OperatorTokenOut

TOKEN_PREFIX = "vgo_"  # noqa: S105 - a prefix, not a secret


@dataclass(frozen=True)
class Operator:
    """Who acts: `actor` as the audit log writes it (`admin`, `operator:{name}`), and the role."""

    actor: str
    role: str
    token_id: str | None = None

    @property
    def can_write(self) -> bool:
        return self.role == "admin"


ADMIN = Operator("admin", "admin")


class Forbidden(AppError):
    status = 403
    code = "forbidden"
    title = "Not allowed for this operator"


class OperatorTokenNotFound(NotFound):
    code = "operator_token_not_found"
    title = "No such operator token"


class OperatorNameTaken(Conflict):
    code = "operator_token_name_taken"
    title = "An active operator token has this name"


def require_write(operator: Operator) -> None:
    if not operator.can_write:
        raise Forbidden(f"{operator.actor} is a viewer: it reads everything and changes nothing.")


def hash_token(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def present(token: OperatorToken) -> dict[str, Any]:
    return OperatorTokenOut.model_validate(token).model_dump(by_alias=True)


def _audited(token: OperatorToken) -> dict[str, Any]:
    # The token itself is never recorded, only what names it.
    return {"id": token.id, "name": token.name, "role": token.role, "prefix": token.prefix}


async def create_token(
    session: AsyncSession, operator: Operator, data: OperatorTokenCreate
) -> tuple[OperatorToken, str]:
    require_write(operator)
    taken = await session.scalar(
        select(OperatorToken.id).where(OperatorToken.name == data.name, OperatorToken.revoked_at.is_(None))
    )
    if taken is not None:
        raise OperatorNameTaken(f"An active operator token is named {data.name!r}; revoke it or pick another name.")
    raw = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = OperatorToken(
        id=new_id("opt"),
        name=data.name,
        role=data.role,
        prefix=raw[:12],
        token_hash=hash_token(raw),
        created_at=clock.now(),
    )
    session.add(token)
    await session.flush()
    await audit_service.record(
        session,
        operator.actor,
        "operator_token.create",
        audit_service.target("operator_token", token.id),
        None,
        _audited(token),
    )
    return token, raw


async def list_tokens(session: AsyncSession) -> list[OperatorToken]:
    return list(await session.scalars(select(OperatorToken).order_by(OperatorToken.id)))


async def revoke_token(session: AsyncSession, operator: Operator, token_id: str) -> OperatorToken:
    require_write(operator)
    token = await session.get(OperatorToken, token_id)
    if token is None:
        raise OperatorTokenNotFound(f"There is no operator token {token_id!r}.")
    if token.revoked_at is None:
        before = {**_audited(token), "revokedAt": None}
        token.revoked_at = clock.now()
        await session.flush()
        after = {**_audited(token), "revokedAt": clock.iso(token.revoked_at)}
        await audit_service.record(
            session,
            operator.actor,
            "operator_token.revoke",
            audit_service.target("operator_token", token.id),
            before,
            after,
        )
    return token


async def authenticate(session: AsyncSession, raw: str) -> Operator | None:
    """The operator of an active `vgo_` token, or None. A lookup by hash, made only on operator routes
    (the operator API, the dashboard, the CLI), where one statement per request costs nothing that matters."""
    if not raw.startswith(TOKEN_PREFIX):
        return None
    digest = hash_token(raw)
    token = await session.scalar(select(OperatorToken).where(OperatorToken.token_hash == digest))
    if token is None or token.revoked_at is not None or not hmac.compare_digest(token.token_hash, digest):
        return None
    return Operator(f"operator:{token.name}", token.role, token.id)


async def is_active(session: AsyncSession, token_id: str) -> Operator | None:
    """A dashboard session's operator, if its token still works (a revoke ends its sessions at once)."""
    token = await session.get(OperatorToken, token_id)
    if token is None or token.revoked_at is not None:
        return None
    return Operator(f"operator:{token.name}", token.role, token.id)
