"""Standard Webhooks signatures: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">."""

from __future__ import annotations

import base64
import hashlib
import hmac


def sign(secret: str, msg_id: str, timestamp: int, body: str) -> str:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{msg_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def signature_header(secrets: list[str], msg_id: str, timestamp: int, body: str) -> str:
    """During a rotation both secrets sign, space-separated, so receivers on either one verify."""
    return " ".join(sign(secret, msg_id, timestamp, body) for secret in secrets)
