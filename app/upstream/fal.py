"""The `fal` wire format: its queue API (docs.fal.ai/documentation/model-apis/inference/queue) in front of
`fal-ai/ltx-2-19b/image-to-video` (fal.ai/models/fal-ai/ltx-2-19b/image-to-video/llms.txt).

The app's own fields, mapped onto the gateway's (README, "Providers"):
- `image` -> `image_url`, `prompt` -> `prompt`;
- `duration` d s -> `num_frames` = 24 d + 1 at `fps` 24 (its default 121 frames is 5 s; its maximum, 481, is
  20 s; 24 d + 1 is always of the 8 k + 1 form LTX-2 generates);
- `resolution` -> `video_size` {width, height}: 480p 848x480, 720p 1280x720, 1080p 1920x1080;
- `seed` -> `seed`, except -1 (random), which is left out (fal then picks one).
Status and response URLs from its answers are followed only on the base_url's host."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import aiohttp

from app.upstream.client import JsonCaller, UpstreamRefused, UpstreamUnavailable, error_message
from app.upstream.schemas import UpstreamPrediction, UpstreamSubmitted

FPS = 24
VIDEO_SIZES = {"480p": (848, 480), "720p": (1280, 720), "1080p": (1920, 1080)}
DEFAULT_RESOLUTION = "720p"
DEFAULT_DURATION_S = 5


def fal_input(body: dict[str, object]) -> dict[str, object]:
    """The gateway's (SPEC §1) body as the fal app's input."""
    resolution = str(body.get("resolution") or DEFAULT_RESOLUTION)
    duration = int(body.get("duration") or DEFAULT_DURATION_S)  # type: ignore[call-overload]
    width, height = VIDEO_SIZES[resolution]
    payload: dict[str, object] = {
        "image_url": body["image"],
        "prompt": body["prompt"],
        "num_frames": FPS * duration + 1,
        "fps": FPS,
        "video_size": {"width": width, "height": height},
    }
    seed = body.get("seed")
    if isinstance(seed, int) and seed >= 0:
        payload["seed"] = seed
    return payload


class FalClient:
    def __init__(
        self, session: aiohttp.ClientSession, base_url: str, api_key: str, model: str, provider: str = ""
    ) -> None:
        self._base = base_url.rstrip("/")
        self._host = urlsplit(self._base).netloc.lower()
        self._model = model.strip("/")
        self._http = JsonCaller(session, {"Authorization": f"Key {api_key}"}, provider or "fal")

    def _own(self, url: object, what: str) -> str:
        """A URL from an answer, if it is on the base_url's host (else the answer is not trusted)."""
        if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https"):
            raise UpstreamUnavailable(f"upstream answered without a {what}")
        if urlsplit(url).netloc.lower() != self._host:
            raise UpstreamUnavailable(f"upstream answered a {what} on another host")
        return url

    def _requests_url(self, request_id: str) -> str:
        # The request URLs use the app id without its sub-path: fal-ai/ltx-2-19b/requests/{id}.
        app_id = "/".join(self._model.split("/")[:2])
        return f"{self._base}/{app_id}/requests/{request_id}"

    async def submit(self, model_id: str, body: dict[str, object]) -> UpstreamSubmitted:
        _, payload = await self._http.call("submit", "POST", f"{self._base}/{self._model}", fal_input(body))
        if not isinstance(payload, dict) or not isinstance(payload.get("request_id"), str) or not payload["request_id"]:
            raise UpstreamUnavailable("upstream answered an unexpected submit shape")
        request_id = payload["request_id"]
        ref = {
            "status": self._own(payload.get("status_url") or f"{self._requests_url(request_id)}/status", "status_url"),
            "response": self._own(payload.get("response_url") or self._requests_url(request_id), "response_url"),
        }
        return UpstreamSubmitted.model_validate({"id": request_id, "status": "processing", "_vidgateRef": ref})

    async def get_prediction(self, upstream_id: str, ref: dict[str, Any] | None = None) -> UpstreamPrediction:
        ref = ref or {}
        status_url = self._own(ref.get("status") or f"{self._requests_url(upstream_id)}/status", "status_url")
        _, payload = await self._http.call("poll", "GET", status_url, None)
        status = payload.get("status") if isinstance(payload, dict) else None
        if status in ("IN_QUEUE", "IN_PROGRESS"):
            return UpstreamPrediction(id=upstream_id, status="processing")
        if status != "COMPLETED":
            raise UpstreamUnavailable("upstream answered an unexpected status shape")
        return await self.result(upstream_id, ref)

    async def result(self, upstream_id: str, ref: dict[str, Any]) -> UpstreamPrediction:
        """A COMPLETED request's outcome: 200 {"video": {"url"}} or an error status with {"detail"}."""
        response_url = self._own(ref.get("response") or self._requests_url(upstream_id), "response_url")
        code, payload = await self._http.call("result", "GET", response_url, None, error_statuses=True)
        if code >= 400:
            if not isinstance(payload, dict) or "detail" not in payload:
                raise UpstreamUnavailable(f"upstream answered {code} for a result")
            return UpstreamPrediction(id=upstream_id, status="failed", error=error_message(payload, code))
        video = payload.get("video") if isinstance(payload, dict) else None
        url = video.get("url") if isinstance(video, dict) else None
        if not isinstance(url, str) or not url:
            raise UpstreamUnavailable("upstream answered a result without a video")
        return UpstreamPrediction(id=upstream_id, status="completed", outputs=[url])

    async def ping(self) -> bool:
        return await self._http.ping(self._base)


__all__ = ["FalClient", "UpstreamRefused", "fal_input"]
