"""Identifiers that sort by creation time, so ids double as pagination cursors."""

from __future__ import annotations

import secrets
import time


def new_id(prefix: str) -> str:
    # 48 bits of milliseconds then 80 random bits, hex: lexicographic order is creation order.
    millis = int(time.time() * 1000)
    return f"{prefix}_{millis:012x}{secrets.token_hex(10)}"
