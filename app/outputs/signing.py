"""Signed, expiring output links. A link is `{base}/outputs/{predictionId}/{name}?expires=..&sig=..`
where sig is an HMAC of the path and the expiry: no API key is needed (links go to browsers and
players), and neither the path nor the expiry can be changed without the key.

Expiries are derived, not stored: links are issued in windows of VIDGATE_OUTPUT_URL_TTL_S counted
from the moment the copy was stored, so every reader in a window (the webhook, each GET, any process)
computes the same link, and the first read after it expires computes the next one."""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import datetime
from typing import Final

from app.core.settings import SANDBOX_ADMIN_TOKEN, Settings, secret_given

_DERIVATION: Final = b"vidgate output links v1"


def signing_key(settings: Settings) -> bytes:
    """VIDGATE_OUTPUT_SIGNING_KEY, else derived from the operator token (so one secret suffices), else
    in sandbox mode from the public sandbox token. Outside the sandbox a process with neither refuses
    to start (Settings.startup_refusal), so the last branch only guards direct callers."""
    if secret_given(settings.output_signing_key):
        assert settings.output_signing_key is not None
        return settings.output_signing_key.get_secret_value().encode()
    if secret_given(settings.admin_token):
        assert settings.admin_token is not None
        root = settings.admin_token.get_secret_value().encode()
    elif settings.sandbox:
        root = SANDBOX_ADMIN_TOKEN.encode()
    else:
        raise RuntimeError("no VIDGATE_OUTPUT_SIGNING_KEY or VIDGATE_ADMIN_TOKEN to sign output links with")
    return hmac.new(root, _DERIVATION, hashlib.sha256).digest()


def window_expiry(stored_at: datetime, now: datetime, ttl_s: int) -> int:
    """Unix second at which the link valid at `now` expires: the end of the current window."""
    start = int(stored_at.timestamp())
    elapsed = max(int(now.timestamp()) - start, 0)
    return start + (elapsed // ttl_s + 1) * ttl_s


def _mac(key: bytes, prediction_id: str, name: str, expires: int) -> str:
    message = f"{prediction_id}/{name}\n{expires}".encode()
    return base64.urlsafe_b64encode(hmac.new(key, message, hashlib.sha256).digest()).rstrip(b"=").decode()


def link_path(key: bytes, prediction_id: str, name: str, expires: int) -> str:
    return f"/outputs/{prediction_id}/{name}?expires={expires}&sig={_mac(key, prediction_id, name, expires)}"


def verify(
    key: bytes, prediction_id: str, name: str, expires: str | None, sig: str | None, now: datetime, ttl_s: int
) -> str | None:
    """None when the link is good; otherwise why not: "invalid" or "expired". The signature is checked
    first, so only a link we signed is ever called expired (and a forged expiry is just invalid). A
    link never lives past now + `ttl_s` (what window_expiry hands out): one signed for longer, by a
    key that leaked or a TTL since shortened, is invalid."""
    if not expires or not sig or not expires.isascii() or not expires.isdigit() or len(expires) > 12:
        return "invalid"
    # As bytes: compare_digest refuses str with non-ASCII characters (a TypeError, not a "no").
    if not hmac.compare_digest(_mac(key, prediction_id, name, int(expires)).encode(), sig.encode()):
        return "invalid"
    if int(expires) <= int(now.timestamp()):
        return "expired"
    if int(expires) > int(now.timestamp()) + ttl_s:
        return "invalid"
    return None
