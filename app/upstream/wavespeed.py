"""The `wavespeed` wire format (SPEC §11; wavespeed.ai/docs/docs-api/wavespeed-ai/ltx-2-19b-image-to-video,
/docs/what-are-predictions, /docs/get-result): the §1 body under Bearer auth, answers wrapped in
`{"code","message","data"}`, statuses created/processing/completed/failed, no cost in the answer."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import aiohttp
from pydantic import BaseModel, ConfigDict, ValidationError

from app.upstream.client import JsonCaller, UpstreamRefused, UpstreamUnavailable
from app.upstream.schemas import UpstreamPrediction, UpstreamSubmitted

STATUSES = {"created": "processing", "processing": "processing", "completed": "completed", "failed": "failed"}


class _Data(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str
    status: str
    outputs: list[str] | None = None
    error: str | None = None
    urls: dict[str, str] | None = None
    created_at: str | None = None


class WaveSpeedClient:
    def __init__(
        self, session: aiohttp.ClientSession, base_url: str, api_key: str, model: str, provider: str = ""
    ) -> None:
        self._base = base_url.rstrip("/")
        self._host = urlsplit(self._base).netloc.lower()
        self._model = model
        self._http = JsonCaller(session, {"Authorization": f"Bearer {api_key}"}, provider or "wavespeed")

    def _data(self, payload: object, what: str) -> _Data:
        if isinstance(payload, dict):
            code = payload.get("code")
            # The envelope may carry an error under a 200: its own code says so.
            if isinstance(code, int) and code >= 400 and code != 429:
                message = payload.get("message")
                raise UpstreamRefused(code, message if isinstance(message, str) and message else f"code {code}")
        try:
            assert isinstance(payload, dict)
            data = _Data.model_validate(payload.get("data"))
        except (AssertionError, ValidationError) as exc:
            raise UpstreamUnavailable(f"upstream answered an unexpected {what} shape") from exc
        if data.status not in STATUSES:
            raise UpstreamUnavailable(f"upstream answered an unknown status {data.status[:40]!r}")
        return data

    async def submit(self, model_id: str, body: dict[str, object]) -> UpstreamSubmitted:
        _, payload = await self._http.call("submit", "POST", f"{self._base}/api/v3/{self._model}", body)
        data = self._data(payload, "submit")
        ref: dict[str, str] | None = None
        get_url = (data.urls or {}).get("get")
        # Some of its pages show urls.get ending in /result: follow what it gives, on its own host only.
        if isinstance(get_url, str) and urlsplit(get_url).netloc.lower() == self._host:
            ref = {"get": get_url}
        return UpstreamSubmitted.model_validate(
            {"id": data.id, "status": "processing", "createdAt": data.created_at, "_vidgateRef": ref}
        )

    async def get_prediction(self, upstream_id: str, ref: dict[str, Any] | None = None) -> UpstreamPrediction:
        url = (ref or {}).get("get") or f"{self._base}/api/v3/predictions/{upstream_id}"
        _, payload = await self._http.call("poll", "GET", str(url), None)
        data = self._data(payload, "prediction")
        status = STATUSES[data.status]
        return UpstreamPrediction.model_validate(
            {
                "id": data.id,
                "status": status,
                "outputs": data.outputs if status == "completed" else None,
                "error": (data.error or "the provider reported a failure") if status == "failed" else None,
            }
        )

    async def ping(self) -> bool:
        return await self._http.ping(self._base)
