"""`X-Budget-Remaining-Cents` and `X-Budget-Resets-At` on every answer to a tenant key (SPEC §2).

The balance is read by the query that authenticates the key (a LEFT JOIN on the tenant's counter row of
the current period), so the headers cost no round trip of their own. A route that moves the caller's
money can adjust the snapshot with its own charge before the answer goes out.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from app.core import clock
from app.core.middleware import HeaderSlot


@dataclass
class Balance:
    budget_cents: int | None  # None: unlimited
    spent_cents: int
    reserved_cents: int
    resets_at: datetime | None  # None: a "total" budget never resets

    @property
    def remaining_cents(self) -> int | None:
        if self.budget_cents is None:
            return None
        return max(self.budget_cents - self.spent_cents - self.reserved_cents, 0)


def note_balance(balance: Balance) -> None:
    BALANCE_SLOT.note(balance)


def current_balance() -> Balance | None:
    return BALANCE_SLOT.current()


def note_charge(cents: int) -> None:
    """This request just charged `cents` (after its balance was read): show the balance after it."""
    balance = current_balance()
    if balance is not None:
        balance.spent_cents += cents


def budget_headers(balance: Balance) -> list[tuple[bytes, bytes]]:
    headers = []
    remaining = balance.remaining_cents
    if remaining is not None:
        headers.append((b"x-budget-remaining-cents", str(remaining).encode()))
    if balance.resets_at is not None:
        headers.append((b"x-budget-resets-at", clock.iso(balance.resets_at).encode()))
    return headers


# Opened per request by the middleware (app/core/middleware.py), which adds the headers to the app's answer.
BALANCE_SLOT: HeaderSlot[Balance] = HeaderSlot("budget_balance", budget_headers)


# OpenAPI: the headers above, declared on the tenant routers' answers.
BUDGET_HEADERS_DOC: dict[str, dict[str, object]] = {
    "X-Budget-Remaining-Cents": {
        "description": "Cents left in the tenant's budget this period (absent when the budget is unlimited).",
        "schema": {"type": "integer", "minimum": 0},
    },
    "X-Budget-Resets-At": {
        "description": "When the budget period ends (ISO 8601, UTC; absent for a 'total' budget).",
        "schema": {"type": "string", "format": "date-time"},
    },
}
RETRY_AFTER_DOC: dict[str, dict[str, object]] = {
    "Retry-After": {
        "description": "On a prediction still 'processing': seconds until the next poll is worth making.",
        "schema": {"type": "integer", "minimum": 1},
    }
}


def tenant_responses(**extra_headers: dict[str, object]) -> dict[int | str, dict[str, object]]:
    return {200: {"headers": {**BUDGET_HEADERS_DOC, **extra_headers}}}
