"""The VibeDream API client. It never sees a tenant's key: only the operator's vendor key."""

from __future__ import annotations

import time

import aiohttp
import orjson
from pydantic import ValidationError

from app.core import clock, metrics, timing
from app.core.retry_after import parse_retry_after
from app.upstream.schemas import UpstreamPrediction, UpstreamSubmitted


class UpstreamRefused(Exception):
    """The vendor answered 4xx (not 429): resending the same request will not help."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"upstream refused with {status}: {message}")
        self.status = status
        self.message = message


class UpstreamUnavailable(Exception):
    """5xx, 429, a timeout or no connection: worth retrying later."""

    def __init__(self, reason: str, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


class UpstreamClient:
    def __init__(
        self, session: aiohttp.ClientSession, base_url: str, api_key: str, provider: str = "vibedream"
    ) -> None:
        self.provider = provider  # its name in metrics (SPEC §11)
        self._session = session
        self._base = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}", "Accept": "application/json"}
        self._json_headers = {**self._headers, "Content-Type": "application/json"}

    async def submit(self, model_id: str, body: dict[str, object]) -> UpstreamSubmitted:
        url = f"{self._base}/api/v1/models/{model_id}/generate"
        payload = await self._call("submit", "POST", url, body)
        try:
            return UpstreamSubmitted.model_validate(payload)
        except ValidationError as exc:
            raise UpstreamUnavailable("upstream answered an unexpected submit shape") from exc

    async def get_prediction(self, upstream_id: str) -> UpstreamPrediction:
        payload = await self._call("poll", "GET", f"{self._base}/api/v1/predictions/{upstream_id}", None)
        try:
            return UpstreamPrediction.model_validate(payload)
        except ValidationError as exc:
            raise UpstreamUnavailable("upstream answered an unexpected prediction shape") from exc

    async def ping(self) -> bool:
        started = time.perf_counter()
        try:
            async with self._session.get(self._base, timeout=aiohttp.ClientTimeout(total=2)) as response:
                return response.status < 500
        except (aiohttp.ClientError, TimeoutError):
            return False
        finally:
            timing.add_upstream(time.perf_counter() - started)

    async def _call(self, op: str, method: str, url: str, body: dict[str, object] | None) -> object:
        started = time.perf_counter()
        outcome = "error"
        try:
            # orjson both ways: aiohttp's json= and .json() use the standard library's, several times slower.
            data, headers = (None, self._headers) if body is None else (orjson.dumps(body), self._json_headers)
            async with self._session.request(method, url, data=data, headers=headers) as response:
                outcome = str(response.status)
                if response.status == 429 or response.status >= 500:
                    raise UpstreamUnavailable(
                        f"upstream answered {response.status}",
                        parse_retry_after(response.headers.get("Retry-After"), clock.now()),
                    )
                try:
                    raw = await response.read()
                    payload = orjson.loads(raw) if raw.strip() else None  # as aiohttp's .json(): empty is None
                except ValueError as exc:
                    raise UpstreamUnavailable(f"upstream answered {response.status} without JSON") from exc
                if response.status >= 400:
                    raise UpstreamRefused(response.status, _message(payload, response.status))
                return payload
        except (aiohttp.ClientError, TimeoutError) as exc:
            outcome = "timeout" if isinstance(exc, TimeoutError) else "connection_error"
            raise UpstreamUnavailable(f"upstream unreachable ({type(exc).__name__})") from exc
        finally:
            elapsed = time.perf_counter() - started
            timing.add_upstream(elapsed)  # Server-Timing's `upstream`, when a request made the call
            metrics.observe_upstream(self.provider, op, outcome, elapsed)


def _message(payload: object, status: int) -> str:
    if isinstance(payload, dict):
        for field in ("error", "message", "detail"):
            value = payload.get(field)
            if isinstance(value, str) and value:
                return value
    return f"upstream answered {status}"
