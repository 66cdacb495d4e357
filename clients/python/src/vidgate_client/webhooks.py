"""Verify the gateway's webhooks (Standard Webhooks: HMAC-SHA256 over "{id}.{timestamp}.{body}").

Written with hmac and hashlib so the client needs nothing beyond httpx and pydantic.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Iterable, Mapping

from pydantic import ValidationError

from vidgate_client.models import WebhookEvent

SECRET_PREFIX = "whsec_"  # noqa: S105 - a prefix, not a secret


class WebhookVerificationError(Exception):
    """The delivery is forged, tampered with, signed with another secret, or outside the time tolerance."""


def _key(secret: str | bytes) -> bytes:
    if isinstance(secret, bytes):
        key = secret
    else:
        try:
            encoded = secret.removeprefix(SECRET_PREFIX)
            key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError("the webhook secret must be 'whsec_' followed by base64") from exc
    if not key:
        raise ValueError("the webhook secret is empty")
    return key


def sign(secret: str | bytes, webhook_id: str, timestamp: int, body: bytes) -> str:
    """The `v1,<base64>` signature of one delivery (what the gateway sends)."""
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(_key(secret), signed, hashlib.sha256).digest()).decode()


def _signatures(header: str) -> list[bytes]:
    found = []
    for part in header.split():
        version, _, value = part.partition(",")
        if version != "v1":
            continue
        try:
            found.append(base64.b64decode(value, validate=True))
        except (binascii.Error, ValueError):
            continue
    return found


def verify(
    body: bytes | str,
    headers: Mapping[str, str],
    secret: str | bytes | Iterable[str | bytes],
    tolerance_s: float = 300,
) -> WebhookEvent:
    """Check a delivery and return its event; raise WebhookVerificationError otherwise.

    `body` must be the raw bytes received (not re-serialized JSON). `secret` may be several secrets
    (yours during a rotation); the gateway also sends a signature per active secret, so either matching
    is enough. A timestamp further than `tolerance_s` from now, in either direction, is refused: a replay
    of an old delivery fails even with a valid signature.
    """
    raw = body.encode() if isinstance(body, str) else bytes(body)
    lowered = {name.lower(): value for name, value in headers.items()}
    webhook_id = lowered.get("webhook-id")
    timestamp_text = lowered.get("webhook-timestamp")
    signature_header = lowered.get("webhook-signature")
    if not (webhook_id and timestamp_text and signature_header):
        raise WebhookVerificationError("missing webhook-id, webhook-timestamp or webhook-signature header")
    try:
        timestamp = int(timestamp_text)
    except ValueError:
        raise WebhookVerificationError("webhook-timestamp is not an integer") from None
    if abs(time.time() - timestamp) > tolerance_s:
        raise WebhookVerificationError(f"webhook-timestamp is more than {tolerance_s:g} s from now")
    secrets = [secret] if isinstance(secret, str | bytes) else list(secret)
    if not secrets:
        raise ValueError("no webhook secret given")
    offered = _signatures(signature_header)
    signed = f"{webhook_id}.{timestamp}.".encode() + raw
    expected = [hmac.new(_key(s), signed, hashlib.sha256).digest() for s in secrets]
    # Every pair is compared (no early exit), in constant time per comparison.
    matched = False
    for candidate in offered:
        for digest in expected:
            matched |= hmac.compare_digest(candidate, digest)
    if not matched:
        raise WebhookVerificationError("no signature matches the secret")
    try:
        payload = json.loads(raw)
        return WebhookEvent(
            id=webhook_id, type=payload["type"], timestamp=payload["timestamp"], data=payload.get("data") or {}
        )
    except (ValueError, KeyError, TypeError, ValidationError) as exc:
        raise WebhookVerificationError(f"the signed body is not a webhook event: {exc}") from None
