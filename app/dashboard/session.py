"""The dashboard's session cookie and CSRF tokens.

One cookie, `vidgate_session`: a JSON payload and its HMAC-SHA256, `HttpOnly`, `SameSite=Strict`, `Secure`
when the request came over TLS (ours or a trusted proxy's), with an expiry inside the signed payload (the
cookie's own Max-Age is only a hint to the browser). Before login it carries only a CSRF token for the
login form; login replaces it with a new one (no fixation).

A signed-in cookie also names its session, which has a row in `dashboard_sessions` (app/dashboard/models.py)
until logout deletes it: a copy of the cookie kept after logout (or stolen before it) opens nothing. The
check is one primary-key read per page, next to the several queries each page makes anyway.

The signing key is derived from the admin token (and VIDGATE_SESSION_SECRET when set), so changing the
token ends every session. Without an admin token there is no key and no login: fail closed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import orjson
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.responses import Response

from app.core import clock
from app.core.settings import Settings
from app.dashboard.models import DashboardSession

COOKIE = "vidgate_session"
PRE_LOGIN_TTL_S = 3600.0
PATH = "/dashboard"


@dataclass(frozen=True)
class Session:
    authenticated: bool
    csrf: str
    expires_at: float
    # The operator token signed in with (None: the admin token). Its name and role are read from the
    # database on each page, so a revoked token's sessions end at once.
    token_id: str | None = None
    sid: str = ""  # a signed-in session's row in dashboard_sessions


def signing_key(settings: Settings, admin_token: str | None) -> bytes | None:
    if admin_token is None:
        return None
    secret = settings.session_secret.get_secret_value() if settings.session_secret else ""
    base = secret or admin_token
    return hmac.new(base.encode(), b"vidgate-dashboard-session\0" + admin_token.encode(), hashlib.sha256).digest()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def encode(key: bytes, session: Session) -> str:
    fields = {"a": session.authenticated, "c": session.csrf, "e": session.expires_at, "s": session.sid}
    if session.token_id is not None:
        fields["o"] = session.token_id
    payload = _b64(orjson.dumps(fields))
    signature = _b64(hmac.new(key, payload.encode(), hashlib.sha256).digest())
    return f"{payload}.{signature}"


def decode(key: bytes, value: str | None) -> Session | None:
    """The session in a cookie, or None when it is missing, forged, malformed or expired."""
    if not value or value.count(".") != 1:
        return None
    payload, signature = value.split(".")
    expected = _b64(hmac.new(key, payload.encode(), hashlib.sha256).digest())
    if not hmac.compare_digest(signature, expected):
        return None
    try:
        data = orjson.loads(_unb64(payload))
        token_id = data.get("o")
        session = Session(
            bool(data["a"]),
            str(data["c"]),
            float(data["e"]),
            None if token_id is None else str(token_id),
            str(data.get("s") or ""),
        )
    except (ValueError, KeyError, TypeError):
        return None
    return session if session.expires_at > time.time() else None


def new_session(*, authenticated: bool, ttl_s: float, token_id: str | None = None) -> Session:
    sid = secrets.token_urlsafe(32) if authenticated else ""
    return Session(authenticated, secrets.token_urlsafe(24), time.time() + ttl_s, token_id, sid)


async def begin(session: AsyncSession, signed_in: Session) -> None:
    """Record a signed-in session (and forget the ones that expired, so the table stays small)."""
    now = clock.now()
    await session.execute(delete(DashboardSession).where(DashboardSession.expires_at < now))
    session.add(DashboardSession(id=signed_in.sid, expires_at=datetime.fromtimestamp(signed_in.expires_at, UTC)))
    await session.flush()


async def is_live(session: AsyncSession, signed_in: Session) -> bool:
    """Whether a signed-in cookie's session still has its row (logout has not ended it)."""
    if not signed_in.sid:
        return False
    expires_at = await session.scalar(select(DashboardSession.expires_at).where(DashboardSession.id == signed_in.sid))
    return expires_at is not None and expires_at > clock.now()


async def end(session: AsyncSession, signed_in: Session) -> None:
    if signed_in.sid:
        await session.execute(delete(DashboardSession).where(DashboardSession.id == signed_in.sid))


def set_cookie(response: Response, key: bytes, session: Session, *, secure: bool) -> None:
    response.set_cookie(
        COOKIE,
        encode(key, session),
        max_age=max(1, round(session.expires_at - time.time())),
        path=PATH,
        httponly=True,
        samesite="strict",
        secure=secure,
    )


def clear_cookie(response: Response, *, secure: bool) -> None:
    response.delete_cookie(COOKIE, path=PATH, httponly=True, samesite="strict", secure=secure)


def csrf_matches(session: Session | None, given: str | None) -> bool:
    return session is not None and bool(given) and hmac.compare_digest(session.csrf.encode(), (given or "").encode())
