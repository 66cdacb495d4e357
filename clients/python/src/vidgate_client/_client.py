"""`Vidgate` and `AsyncVidgate`: the same methods, one blocking and one awaited (SPEC §9)."""

from __future__ import annotations

import asyncio
import math
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote as quote_path

import httpx

from vidgate_client import _retry
from vidgate_client.errors import (
    APIConnectionError,
    AuthenticationError,
    PredictionTimeout,
    RateLimited,
    UpstreamError,
    VidgateError,
)
from vidgate_client.models import Prediction, PredictionPage, Quote, Status, Usage

__version__ = "0.1.0"

PREFER_WAIT_MAX_S = 60  # the gateway holds a submit at most this long (SPEC §2)
DEFAULT_POLL_S = 1.0  # when an answer carries no Retry-After
CONNECT_TIMEOUT_S = 10.0
LIST_PAGE_SIZE = 100
# While waiting on a prediction that exists, these are weather: keep polling until the deadline.
_TRANSIENT = (APIConnectionError, UpstreamError, RateLimited)


def _generate_body(
    image: str,
    prompt: str,
    resolution: str | None,
    duration: int | None,
    seed: int | None,
    webhook: str | None,
    webhook_events_filter: list[str] | None,
    metadata: dict[str, Any] | None,
) -> dict[str, Any]:
    optional = {
        "resolution": resolution,
        "duration": duration,
        "seed": seed,
        "webhook": webhook,
        "webhookEventsFilter": webhook_events_filter,
        "metadata": metadata,
    }
    return {"image": image, "prompt": prompt, **{k: v for k, v in optional.items() if v is not None}}


def _quote_body(body: dict[str, Any]) -> dict[str, Any]:
    renamed = {"webhook_events_filter": "webhookEventsFilter"}
    return {renamed.get(k, k): v for k, v in body.items() if v is not None}


def _model_path(model: str, action: str) -> str:
    return f"/api/v1/models/{quote_path(model, safe='')}/{action}"


def _prediction_path(prediction_id: str) -> str:
    return f"/api/v1/predictions/{quote_path(prediction_id, safe='')}"


def _submitted(response: httpx.Response, model: str) -> Prediction:
    return Prediction.model_validate({"modelId": model, **response.json()})


def _poll_delay(response: httpx.Response, remaining: float) -> float:
    delay = _retry.parse_retry_after(response.headers.get("Retry-After"))
    return min(DEFAULT_POLL_S if delay is None else delay, remaining)


def _tag(exc: VidgateError, prediction_id: str | None, idempotency_key: str | None) -> VidgateError:
    """Errors raised by generate say what the caller needs to find its prediction again."""
    exc.prediction_id = exc.prediction_id or prediction_id
    exc.idempotency_key = exc.idempotency_key or idempotency_key
    return exc


class _Settings:
    def __init__(
        self, api_key: str | None, base_url: str | None, timeout: float, max_retries: int, max_connections: int
    ) -> None:
        api_key = api_key or os.environ.get("VIDGATE_API_KEY")
        base_url = base_url or os.environ.get("VIDGATE_BASE_URL")
        if not api_key:
            raise AuthenticationError("No API key: pass api_key= or set VIDGATE_API_KEY.")
        if not base_url:
            raise VidgateError("No gateway URL: pass base_url= or set VIDGATE_BASE_URL.")
        if max_retries < 0:
            raise ValueError("max_retries must be 0 or more")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.max_retries = max_retries
        self.headers = {"Authorization": f"Bearer {api_key}", "User-Agent": f"vidgate-client/{__version__}"}
        # keepalive_expiry below uvicorn's 5 s: a connection the server is closing is not reused.
        self.limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections, keepalive_expiry=4.0
        )

    def timeout_for(self, wait_s: int | None) -> httpx.Timeout:
        """Reads outlast the Prefer: wait sent, so a held answer is never cut off by our own timeout."""
        longest = self.timeout + (wait_s or 0)
        return httpx.Timeout(longest, connect=min(CONNECT_TIMEOUT_S, self.timeout), read=longest, pool=longest)

    def new_idempotency_key(self) -> str:
        return f"vgc_{uuid.uuid4().hex}"

    def prefer_wait(self, deadline_s: float) -> int:
        return max(1, min(PREFER_WAIT_MAX_S, math.ceil(deadline_s)))


# ---------------------------------------------------------------- sync


class Predictions:
    def __init__(self, client: Vidgate) -> None:
        self._client = client

    def get(self, prediction_id: str) -> Prediction:
        return Prediction.model_validate(self._client._send("GET", _prediction_path(prediction_id)).json())

    def list(self, status: Status | None = None, *, page_size: int = LIST_PAGE_SIZE) -> Iterator[Prediction]:
        """Every prediction of the tenant, newest first, fetching page after page as you iterate."""
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"limit": page_size}
            if status:
                params["status"] = status
            if cursor:
                params["cursor"] = cursor
            page = PredictionPage.model_validate(self._client._send("GET", "/api/v1/predictions", params=params).json())
            yield from page.data
            if not page.next_cursor:
                return
            cursor = page.next_cursor


class Vidgate:
    """A blocking client. One connection pool per client: make one and share it; close it (or use `with`)."""

    def __init__(
        self,
        api_key: str | None = None,
        base_url: str | None = None,
        *,
        timeout: float = 60.0,
        max_retries: int = 4,
        max_connections: int = 100,
    ) -> None:
        self._settings = _Settings(api_key, base_url, timeout, max_retries, max_connections)
        self._http = httpx.Client(
            base_url=self._settings.base_url,
            headers=self._settings.headers,
            timeout=self._settings.timeout_for(None),
            limits=self._settings.limits,
        )
        self.predictions = Predictions(self)

    def _send(
        self,
        method: str,
        path: str,
        *,
        wait_s: int | None = None,
        deadline: float | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        settings = self._settings
        for attempt in range(settings.max_retries + 1):
            last = attempt == settings.max_retries
            try:
                response = self._http.request(method, path, timeout=settings.timeout_for(wait_s), **kwargs)
            except _retry.RETRYABLE_TRANSPORT as exc:
                delay = _retry.backoff_s(attempt, None)
                if last or (deadline is not None and time.monotonic() + delay > deadline):
                    raise APIConnectionError(f"{method} {path}: no answer from the gateway ({exc!r})") from exc
                time.sleep(delay)
                continue
            if response.is_success:
                return response
            error = _retry.error_from(response)
            if not _retry.is_retryable(response) or last:
                raise error
            delay = _retry.backoff_s(attempt, _retry.parse_retry_after(response.headers.get("Retry-After")))
            if deadline is not None and time.monotonic() + delay > deadline:
                raise error
            time.sleep(delay)
        raise AssertionError("unreachable")

    def generate(
        self,
        model: str,
        *,
        image: str,
        prompt: str,
        resolution: str | None = None,
        duration: int | None = None,
        seed: int | None = None,
        webhook: str | None = None,
        webhook_events_filter: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        wait: bool = True,
        deadline_s: float = 600.0,
        idempotency_key: str | None = None,
    ) -> Prediction:
        """Submit a prediction; with `wait`, return it terminal or raise PredictionTimeout after `deadline_s`.

        Every attempt of this call carries the same Idempotency-Key, so retries never make a second
        prediction or charge."""
        settings = self._settings
        key = idempotency_key or settings.new_idempotency_key()
        deadline = time.monotonic() + deadline_s
        body = _generate_body(image, prompt, resolution, duration, seed, webhook, webhook_events_filter, metadata)
        headers = {"Idempotency-Key": key}
        wait_s = settings.prefer_wait(deadline_s) if wait else None
        if wait_s is not None:
            headers["Prefer"] = f"wait={wait_s}"
        try:
            response = self._send(
                "POST", _model_path(model, "generate"), json=body, headers=headers, wait_s=wait_s, deadline=deadline
            )
        except VidgateError as exc:
            raise _tag(exc, None, key) from None
        prediction = _submitted(response, model)
        while wait and not prediction.done:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _tag(PredictionTimeout(prediction.id, deadline_s), prediction.id, key)
            time.sleep(_poll_delay(response, remaining))
            try:
                response = self._send("GET", _prediction_path(prediction.id), deadline=deadline)
            except _TRANSIENT:
                continue
            except VidgateError as exc:
                raise _tag(exc, prediction.id, key) from None
            prediction = Prediction.model_validate(response.json())
        return prediction

    def usage(self) -> Usage:
        return Usage.model_validate(self._send("GET", "/api/v1/usage").json())

    def quote(self, model: str, **body: Any) -> Quote:
        """What `generate(model, **body)` would hold now, and whether it would pass the limits."""
        return Quote.model_validate(self._send("POST", _model_path(model, "quote"), json=_quote_body(body)).json())

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# ---------------------------------------------------------------- async


class AsyncPredictions:
    def __init__(self, client: AsyncVidgate) -> None:
        self._client = client

    async def get(self, prediction_id: str) -> Prediction:
        return Prediction.model_validate((await self._client._send("GET", _prediction_path(prediction_id))).json())

    async def list(self, status: Status | None = None, *, page_size: int = LIST_PAGE_SIZE) -> AsyncIterator[Prediction]:
        """Every prediction of the tenant, newest first: `async for p in client.predictions.list(): ...`."""
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"limit": page_size}
            if status:
                params["status"] = status
            if cursor:
                params["cursor"] = cursor
            response = await self._client._send("GET", "/api/v1/predictions", params=params)
            page = PredictionPage.model_validate(response.json())
            for prediction in page.data:
                yield prediction
            if not page.next_cursor:
                return
            cursor = page.next_cursor


class AsyncVidgate:
    """The awaited client. One connection pool per client, however many tasks share it."""

    def __init__(
        self,
        api_key: str | None = None,
        base_url: str | None = None,
        *,
        timeout: float = 60.0,
        max_retries: int = 4,
        max_connections: int = 100,
    ) -> None:
        self._settings = _Settings(api_key, base_url, timeout, max_retries, max_connections)
        self._http = httpx.AsyncClient(
            base_url=self._settings.base_url,
            headers=self._settings.headers,
            timeout=self._settings.timeout_for(None),
            limits=self._settings.limits,
        )
        self.predictions = AsyncPredictions(self)

    async def _send(
        self,
        method: str,
        path: str,
        *,
        wait_s: int | None = None,
        deadline: float | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        settings = self._settings
        for attempt in range(settings.max_retries + 1):
            last = attempt == settings.max_retries
            try:
                response = await self._http.request(method, path, timeout=settings.timeout_for(wait_s), **kwargs)
            except _retry.RETRYABLE_TRANSPORT as exc:
                delay = _retry.backoff_s(attempt, None)
                if last or (deadline is not None and time.monotonic() + delay > deadline):
                    raise APIConnectionError(f"{method} {path}: no answer from the gateway ({exc!r})") from exc
                await asyncio.sleep(delay)
                continue
            if response.is_success:
                return response
            error = _retry.error_from(response)
            if not _retry.is_retryable(response) or last:
                raise error
            delay = _retry.backoff_s(attempt, _retry.parse_retry_after(response.headers.get("Retry-After")))
            if deadline is not None and time.monotonic() + delay > deadline:
                raise error
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def generate(
        self,
        model: str,
        *,
        image: str,
        prompt: str,
        resolution: str | None = None,
        duration: int | None = None,
        seed: int | None = None,
        webhook: str | None = None,
        webhook_events_filter: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        wait: bool = True,
        deadline_s: float = 600.0,
        idempotency_key: str | None = None,
    ) -> Prediction:
        """See Vidgate.generate."""
        settings = self._settings
        key = idempotency_key or settings.new_idempotency_key()
        deadline = time.monotonic() + deadline_s
        body = _generate_body(image, prompt, resolution, duration, seed, webhook, webhook_events_filter, metadata)
        headers = {"Idempotency-Key": key}
        wait_s = settings.prefer_wait(deadline_s) if wait else None
        if wait_s is not None:
            headers["Prefer"] = f"wait={wait_s}"
        try:
            response = await self._send(
                "POST", _model_path(model, "generate"), json=body, headers=headers, wait_s=wait_s, deadline=deadline
            )
        except VidgateError as exc:
            raise _tag(exc, None, key) from None
        prediction = _submitted(response, model)
        while wait and not prediction.done:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _tag(PredictionTimeout(prediction.id, deadline_s), prediction.id, key)
            await asyncio.sleep(_poll_delay(response, remaining))
            try:
                response = await self._send("GET", _prediction_path(prediction.id), deadline=deadline)
            except _TRANSIENT:
                continue
            except VidgateError as exc:
                raise _tag(exc, prediction.id, key) from None
            prediction = Prediction.model_validate(response.json())
        return prediction

    async def usage(self) -> Usage:
        return Usage.model_validate((await self._send("GET", "/api/v1/usage")).json())

    async def quote(self, model: str, **body: Any) -> Quote:
        response = await self._send("POST", _model_path(model, "quote"), json=_quote_body(body))
        return Quote.model_validate(response.json())

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
