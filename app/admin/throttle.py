"""Failed operator-token checks, slowed down per client address (the /admin bearer check, the dashboard
login and the metrics token).

GCRA in memory: an address may fail `BURST` times at once, then once every `INTERVAL_S`; past that, its
checks answer `429 too_many_failed_attempts` with `Retry-After` without the token being compared, so
guessing runs at one try a second at most, whatever the guesser sends. A right token costs nothing.

In memory, per process, on purpose: a failed check must not cost a database write (that would turn the
throttle into an amplifier), and with N replicas a guesser gets N tries a second, which changes nothing
against a token of 32 characters or more (Settings.startup_refusal refuses shorter ones). IPv6 clients
are counted per /64, what one host is usually given. The table is bounded: the oldest addresses go first.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from ipaddress import IPv6Address, ip_address, ip_network
from typing import TypeVar

from starlette.requests import Request

from app.core.errors import AppError
from app.core.public_url import client_address
from app.core.retry_after import retry_after_value
from app.core.settings import Settings

T = TypeVar("T")

BURST = 10
INTERVAL_S = 1.0
MAX_ADDRESSES = 100_000


class TooManyFailedAttempts(AppError):
    status = 429
    code = "too_many_failed_attempts"
    title = "Too many failed operator-token attempts"

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(
            f"Too many wrong operator tokens from this address. Retry in {retry_after_s} s.",
            headers={"Retry-After": retry_after_value(retry_after_s)},
            retryAfter=retry_after_s,
        )


def _bucket(address: str) -> str:
    try:
        parsed = ip_address(address)
    except ValueError:
        return address
    if isinstance(parsed, IPv6Address) and parsed.ipv4_mapped is None:
        return str(ip_network(f"{parsed}/64", strict=False))
    return str(parsed.ipv4_mapped or parsed) if isinstance(parsed, IPv6Address) else str(parsed)


class FailureThrottle:
    def __init__(self, burst: int = BURST, interval_s: float = INTERVAL_S, max_addresses: int = MAX_ADDRESSES) -> None:
        self.burst = burst
        self.interval_s = interval_s
        self.max_addresses = max_addresses
        # bucket -> theoretical arrival time of its next failure (monotonic seconds)
        self._tat: OrderedDict[str, float] = OrderedDict()

    def check(self, address: str, now: float | None = None) -> None:
        """Raise TooManyFailedAttempts while `address` has used up its failures; else nothing."""
        tat = self._tat.get(_bucket(address))
        if tat is None:
            return
        now = time.monotonic() if now is None else now
        wait = tat - now - (self.burst - 1) * self.interval_s
        if wait > 0:
            raise TooManyFailedAttempts(max(1, math.ceil(wait)))

    def failed(self, address: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        bucket = _bucket(address)
        self._tat[bucket] = max(self._tat.get(bucket, now), now) + self.interval_s
        self._tat.move_to_end(bucket)
        while len(self._tat) > self.max_addresses:
            self._tat.popitem(last=False)


def of_app(request: Request) -> FailureThrottle:
    """The app's throttle (one per app, so each test's app starts with a clean slate)."""
    state = request.app.state
    throttle: FailureThrottle | None = getattr(state, "operator_failures", None)
    if throttle is None:
        throttle = state.operator_failures = FailureThrottle()
    return throttle


def checked(request: Request, settings: Settings, given: str, accepts: Callable[[str], bool]) -> bool:
    """Whether `given` is accepted, counted against the caller's address: raises TooManyFailedAttempts
    instead of comparing while the address is throttled. An empty token is no attempt and not counted."""
    throttle = of_app(request)
    address = client_address(request, settings)
    throttle.check(address)
    if accepts(given):
        return True
    if given:
        throttle.failed(address)
    return False


async def identified(
    request: Request, settings: Settings, given: str, identify: Callable[[str], Awaitable[T | None]]
) -> T | None:
    """As `checked`, for a check that names who `given` is (an operator token is looked up in the
    database): None, counted as a failure, when it names nobody."""
    throttle = of_app(request)
    address = client_address(request, settings)
    throttle.check(address)
    found = await identify(given)
    if found is None and given:
        throttle.failed(address)
    return found
