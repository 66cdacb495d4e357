"""Talking to providers: the one JSON-over-HTTP call every wire format uses (errors classified the way
routing needs them, SPEC §11), and the VibeDream format itself (SPEC §1). It never sees a tenant's
key: only the operator's key for that provider."""

from __future__ import annotations

import time
from typing import Literal

import aiohttp
import orjson
from pydantic import ValidationError

from app.core import clock, metrics, timing
from app.core.retry_after import parse_retry_after
from app.upstream.schemas import UpstreamPrediction, UpstreamSubmitted

# Why a call did not give an answer, as routing sees it:
# - "rate_limited" (429), "server_error" (5xx), "unreachable" (refused, no route, connect timeout):
#   nothing was accepted, the next provider may be tried;
# - "ambiguous": the body was sent but no complete answer came (read timeout, dropped connection, an
#   answer that does not parse): the provider may have accepted and billed it, so never move on.
Cause = Literal["rate_limited", "server_error", "unreachable", "ambiguous"]


class UpstreamRefused(Exception):
    """The provider answered 4xx (not 429): resending the same request will not help."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"upstream refused with {status}: {message}")
        self.status = status
        self.message = message

    @property
    def bad_credentials(self) -> bool:
        return self.status in (401, 403)


class UpstreamUnavailable(Exception):
    """5xx, 429, a timeout or no connection: worth retrying later."""

    def __init__(self, reason: str, retry_after_s: float | None = None, cause: Cause = "ambiguous") -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s
        self.cause: Cause = cause

    @property
    def moves_on(self) -> bool:
        """Whether a submit may go to the next provider: only when this one cannot have accepted it."""
        return self.cause != "ambiguous"


class JsonCaller:
    """One provider's calls through the shared aiohttp session (app/core/http.py)."""

    def __init__(self, session: aiohttp.ClientSession, headers: dict[str, str], provider: str = "vibedream") -> None:
        self.session = session
        self.provider = provider  # its name on metrics (SPEC §11)
        self._headers = {**headers, "Accept": "application/json"}
        self._json_headers = {**self._headers, "Content-Type": "application/json"}

    async def call(
        self, op: str, method: str, url: str, body: dict[str, object] | None, *, error_statuses: bool = False
    ) -> tuple[int, object]:
        """(status, JSON payload). 429 and 5xx raise UpstreamUnavailable, other 4xx UpstreamRefused, unless
        `error_statuses` (the caller reads error answers itself, as fal's response_url needs)."""
        started = time.perf_counter()
        outcome = "error"
        try:
            # orjson both ways: aiohttp's json= and .json() use the standard library's, several times slower.
            data, headers = (None, self._headers) if body is None else (orjson.dumps(body), self._json_headers)
            async with self.session.request(method, url, data=data, headers=headers) as response:
                outcome = str(response.status)
                if response.status == 429 or (response.status >= 500 and not error_statuses):
                    raise UpstreamUnavailable(
                        f"upstream answered {response.status}",
                        parse_retry_after(response.headers.get("Retry-After"), clock.now()),
                        "rate_limited" if response.status == 429 else "server_error",
                    )
                try:
                    raw = await response.read()
                    payload = orjson.loads(raw) if raw.strip() else None  # as aiohttp's .json(): empty is None
                except ValueError as exc:
                    if response.status >= 400 and not error_statuses:
                        raise UpstreamRefused(response.status, f"upstream answered {response.status}") from exc
                    raise UpstreamUnavailable(f"upstream answered {response.status} without JSON") from exc
                if response.status >= 400 and not error_statuses:
                    raise UpstreamRefused(response.status, error_message(payload, response.status))
                return response.status, payload
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            # Never connected (refused, no route, connect timeout, no free connection in time): not sent.
            outcome = "connection_error"
            raise UpstreamUnavailable(f"upstream unreachable ({type(exc).__name__})", None, "unreachable") from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            outcome = "timeout" if isinstance(exc, TimeoutError) else "connection_error"
            raise UpstreamUnavailable(f"upstream unreachable ({type(exc).__name__})") from exc
        finally:
            elapsed = time.perf_counter() - started
            timing.add_upstream(elapsed)  # Server-Timing's `upstream`, when a request made the call
            metrics.observe_upstream(self.provider, op, outcome, elapsed)

    async def ping(self, url: str) -> bool:
        started = time.perf_counter()
        try:
            async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as response:
                return response.status < 500
        except (aiohttp.ClientError, TimeoutError):
            return False
        finally:
            timing.add_upstream(time.perf_counter() - started)


class UpstreamClient:
    """The `vibedream` wire format (SPEC §1): Bearer key, the body as is, costCents in the answer."""

    def __init__(
        self, session: aiohttp.ClientSession, base_url: str, api_key: str, model: str = "", provider: str = "vibedream"
    ) -> None:
        self._base = base_url.rstrip("/")
        self._model = model
        self._http = JsonCaller(session, {"Authorization": f"Bearer {api_key}"}, provider)

    async def submit(self, model_id: str, body: dict[str, object]) -> UpstreamSubmitted:
        url = f"{self._base}/api/v1/models/{self._model or model_id}/generate"
        _, payload = await self._http.call("submit", "POST", url, body)
        try:
            submitted = UpstreamSubmitted.model_validate(payload)
        except ValidationError as exc:
            raise UpstreamUnavailable("upstream answered an unexpected submit shape") from exc
        if submitted.cost_cents is None:
            raise UpstreamUnavailable("upstream answered a submit without costCents")
        return submitted

    async def get_prediction(self, upstream_id: str, ref: dict[str, object] | None = None) -> UpstreamPrediction:
        _, payload = await self._http.call("poll", "GET", f"{self._base}/api/v1/predictions/{upstream_id}", None)
        try:
            return UpstreamPrediction.model_validate(payload)
        except ValidationError as exc:
            raise UpstreamUnavailable("upstream answered an unexpected prediction shape") from exc

    async def ping(self) -> bool:
        return await self._http.ping(self._base)


def error_message(payload: object, status: int) -> str:
    if isinstance(payload, dict):
        for field in ("error", "message", "detail"):
            value = payload.get(field)
            if isinstance(value, str) and value:
                return value
            if field == "detail" and isinstance(value, list) and value:
                return str(value[0].get("msg", value[0]) if isinstance(value[0], dict) else value[0])[:500]
    return f"upstream answered {status}"
