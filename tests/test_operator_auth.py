"""The operator token under attack (issue 24 B3): wrong tokens are slowed down per client address at
/admin, the dashboard login and /metrics (app/admin/throttle.py); short tokens never start a process
(tests/test_modes.py::test_refusals)."""

from __future__ import annotations

from typing import Any

import pytest

from app.admin.throttle import BURST, INTERVAL_S, FailureThrottle, TooManyFailedAttempts
from tests.conftest import ADMIN_TOKEN, Api
from tests.test_dashboard import csrf_of


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"trusted_proxies": ["10.9.0.1/32"], "metrics_token": "metrics-token-0123456789abcdef-0123"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_wrong_admin_tokens_are_throttled_per_address(api: Api) -> None:
    for _ in range(BURST):
        answer = await api.http.get("/admin/v1/tenants", headers=bearer("guess-" + "x" * 30))
        assert answer.status_code == 401, answer.text
    for headers in (bearer("guess-" + "y" * 30), bearer(ADMIN_TOKEN)):
        # Throttled: not even the right token is compared, so a guess learns nothing.
        answer = await api.http.get("/admin/v1/tenants", headers=headers)
        assert answer.status_code == 429, answer.text
        assert answer.json()["code"] == "too_many_failed_attempts"
        assert 1 <= int(answer.headers["retry-after"]) <= BURST * INTERVAL_S
    # /metrics takes the admin token too: the same count.
    assert (await api.http.get("/metrics", headers=bearer(ADMIN_TOKEN))).status_code == 429
    # Another client is not held back by this one.
    other = {"X-Forwarded-For": "203.0.113.7"}
    assert (await api.http.get("/admin/v1/tenants", headers=bearer(ADMIN_TOKEN) | other)).status_code == 429
    # ...which only counts when the peer is a trusted proxy; this one's clients are counted apart.
    transport: Any = api.http._transport
    transport.client = ("10.9.0.1", 4242)
    assert (await api.http.get("/admin/v1/tenants", headers=bearer(ADMIN_TOKEN) | other)).status_code == 200


async def test_a_missing_token_is_no_attempt(api: Api) -> None:
    for _ in range(BURST * 2):
        assert (await api.http.get("/admin/v1/tenants")).status_code == 401
    assert (await api.http.get("/admin/v1/tenants", headers=bearer(ADMIN_TOKEN))).status_code == 200


async def test_dashboard_login_is_throttled(api: Api) -> None:
    page = await api.http.get("/dashboard/login")
    csrf = csrf_of(page)
    for _ in range(BURST):
        wrong = await api.http.post("/dashboard/login", data={"csrf": csrf, "token": "guess-" + "x" * 30})
        assert wrong.status_code == 401
    right = await api.http.post("/dashboard/login", data={"csrf": csrf, "token": ADMIN_TOKEN})
    assert right.status_code == 429 and "Too many wrong operator tokens" in right.text
    assert right.headers["retry-after"]
    assert (await api.http.get("/dashboard")).status_code == 303  # still logged out


async def test_wrong_metrics_tokens_are_throttled(api: Api) -> None:
    for _ in range(BURST):
        assert (await api.http.get("/metrics", headers=bearer("guess"))).status_code == 401
    assert (await api.http.get("/metrics", headers=bearer("metrics-token-0123456789abcdef-0123"))).status_code == 429


def test_the_throttle_lets_one_failure_a_second_through_after_the_burst() -> None:
    throttle = FailureThrottle(burst=3, interval_s=1.0)
    for _ in range(3):
        throttle.check("192.0.2.1", now=100.0)
        throttle.failed("192.0.2.1", now=100.0)
    with pytest.raises(TooManyFailedAttempts):
        throttle.check("192.0.2.1", now=100.5)
    throttle.check("192.0.2.1", now=101.0)  # one more a second
    throttle.failed("192.0.2.1", now=101.0)
    with pytest.raises(TooManyFailedAttempts):
        throttle.check("192.0.2.1", now=101.5)
    throttle.check("192.0.2.2", now=101.5)  # others are not held back
    throttle.check("192.0.2.1", now=104.0)  # and after a quiet spell the burst is back
    # IPv6: one /64 is one client (what one host is usually given).
    for host in range(3):
        throttle.failed(f"2001:db8:1:2::{host + 1}", now=200.0)
    with pytest.raises(TooManyFailedAttempts):
        throttle.check("2001:db8:1:2::ffff", now=200.0)
    throttle.check("2001:db8:1:3::1", now=200.0)


def test_the_throttle_is_bounded() -> None:
    throttle = FailureThrottle(burst=1, interval_s=60.0, max_addresses=10)
    for host in range(100):
        throttle.failed(f"198.51.100.{host}", now=0.0)
    assert len(throttle._tat) == 10
