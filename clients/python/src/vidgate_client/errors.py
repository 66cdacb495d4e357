"""Typed errors, chosen from the gateway's problem `code` (application/problem+json), else its status."""

from __future__ import annotations

from typing import Any


class VidgateError(Exception):
    """Any error answer of the gateway. `status` is None when no answer arrived at all."""

    def __init__(
        self,
        detail: str,
        *,
        status: int | None = None,
        code: str | None = None,
        problem: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {detail}" if status is not None else detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.problem: dict[str, Any] = problem or {}
        # Set by generate when known: the prediction goes on even if this call failed, and the same
        # Idempotency-Key sent again returns it rather than making another.
        self.prediction_id: str | None = None
        self.idempotency_key: str | None = None


class AuthenticationError(VidgateError):
    """401: the API key is missing, unknown or revoked."""


class BudgetExceeded(VidgateError):
    """402: the estimate does not fit in what is left of the budget this period."""

    @property
    def remaining_cents(self) -> int | None:
        value = self.problem.get("remainingCents")
        return value if isinstance(value, int) else None

    @property
    def estimate_cents(self) -> int | None:
        value = self.problem.get("estimateCents")
        return value if isinstance(value, int) else None

    @property
    def resets_at(self) -> str | None:
        value = self.problem.get("resetsAt")
        return value if isinstance(value, str) else None


class RateLimited(VidgateError):
    """429: the tenant's rate or concurrency limit. `retry_after` is in seconds."""

    def __init__(self, detail: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(detail, **kwargs)
        self.retry_after = retry_after


class NotFound(VidgateError):
    """404: no such prediction (for this tenant), model or route."""


class Conflict(VidgateError):
    """409: e.g. the same Idempotency-Key still in flight, after every retry."""


class InvalidRequest(VidgateError):
    """422: the request is not valid (`field` names what to change) or the vendor refused it."""

    @property
    def field(self) -> str | None:
        value = self.problem.get("field")
        return value if isinstance(value, str) else None


class UpstreamError(VidgateError):
    """5xx: the gateway, its database or the video provider failed. Nothing was charged for a refused submit."""


class APIConnectionError(VidgateError):
    """No answer: the connection failed or timed out on every attempt."""


class PredictionTimeout(VidgateError):
    """`deadline_s` passed before the prediction was terminal. It goes on (and is billed): keep
    `prediction_id` and fetch it later with `predictions.get`."""

    def __init__(self, prediction_id: str, deadline_s: float) -> None:
        super().__init__(
            f"Prediction {prediction_id} was not finished after {deadline_s:g} s; it goes on and is billed. "
            f"Fetch it later with predictions.get({prediction_id!r}).",
            code="prediction_timeout",
        )
        self.prediction_id: str | None = prediction_id
        self.deadline_s = deadline_s


_BY_CODE: dict[str, type[VidgateError]] = {
    "invalid_api_key": AuthenticationError,
    "budget_exceeded": BudgetExceeded,
    "rate_limited": RateLimited,
    "concurrency_limited": RateLimited,
    "idempotency_key_in_flight": Conflict,
    "idempotency_key_reused": InvalidRequest,
    "validation_error": InvalidRequest,
    "upstream_rejected": InvalidRequest,
    "payload_too_large": InvalidRequest,
}
_BY_STATUS: dict[int, type[VidgateError]] = {
    401: AuthenticationError,
    402: BudgetExceeded,
    404: NotFound,
    409: Conflict,
    413: InvalidRequest,
    422: InvalidRequest,
    429: RateLimited,
}


def error_for(status: int, problem: dict[str, Any], retry_after: float | None) -> VidgateError:
    code = problem.get("code")
    code = code if isinstance(code, str) else None
    detail = problem.get("detail")
    detail = detail if isinstance(detail, str) else f"the gateway answered {status}"
    cls = _BY_CODE.get(code or "") or _BY_STATUS.get(status)
    if cls is None:
        cls = UpstreamError if status >= 500 else VidgateError
    if cls is RateLimited:
        if retry_after is None and isinstance(problem.get("retryAfter"), int | float):
            retry_after = float(problem["retryAfter"])
        return RateLimited(detail, retry_after=retry_after, status=status, code=code, problem=problem)
    return cls(detail, status=status, code=code, problem=problem)
