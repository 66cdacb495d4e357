"""Each adapter against the simulator's format, and against fixtures written from the providers' own
documented answers (success, failure, 401, 429 with Retry-After, malformed JSON)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from app.providers.adapters import ADAPTERS, Adapter
from app.upstream.client import UpstreamRefused, UpstreamUnavailable
from app.upstream.fal import fal_input
from app.upstream.simulator import STATE, SimConfig, SimState, start_simulator

BODY: dict[str, object] = {
    "image": "https://example.com/cat.png",
    "prompt": "a cat waves",
    "resolution": "480p",
    "duration": 5,
}
MODELS = {
    "vibedream": "",
    "wavespeed": "wavespeed-ai/ltx-2-19b/image-to-video",
    "fal": "fal-ai/ltx-2-19b/image-to-video",
}
KINDS = list(MODELS)


@pytest.fixture
async def simulator() -> AsyncIterator[tuple[str, SimState]]:
    runner, url = await start_simulator(config=SimConfig(completion_s=0.2, estimated_time="0-1s"))
    yield url, runner.app[STATE]
    await runner.cleanup()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2, connect=1)) as session:
        yield session


def adapter(kind: str, http: aiohttp.ClientSession, url: str, key: str = "k") -> Adapter:
    return ADAPTERS[kind](http, url, key, MODELS[kind])


async def finished(client: Adapter, upstream_id: str, ref: dict[str, Any] | None) -> Any:
    for _ in range(200):
        seen = await client.get_prediction(upstream_id, ref)
        if seen.status != "processing":
            return seen
        await asyncio.sleep(0.05)
    raise AssertionError("never finished")


# ---------------------------------------------------------------- against the simulator


@pytest.mark.parametrize("kind", KINDS)
async def test_submit_poll_and_result_against_the_simulator(
    kind: str, simulator: tuple[str, SimState], http: aiohttp.ClientSession
) -> None:
    url, state = simulator
    client = adapter(kind, http, url, key="the-key")
    submitted = await client.submit("ltx-2-19b", dict(BODY))
    assert submitted.status == "processing" and submitted.id
    # Only vibedream's answer carries a cost; the others are priced by the providers file.
    assert (submitted.cost_cents is not None) == (kind == "vibedream")
    assert state.submits_by_format == {kind: 1}
    if kind == "fal":
        assert submitted.ref is not None and submitted.ref["status"].startswith(url)
        assert state.bodies[-1] == fal_input(BODY)
    else:
        assert state.bodies[-1] == BODY
    seen = await finished(client, submitted.id, submitted.ref)
    assert seen.status == "completed" and seen.outputs and seen.outputs[0].endswith(".mp4")
    expected_auth = "Key the-key" if kind == "fal" else "Bearer the-key"
    assert set(state.auths) == {expected_auth}


@pytest.mark.parametrize("kind", KINDS)
async def test_a_failed_prediction_carries_the_providers_error(
    kind: str, simulator: tuple[str, SimState], http: aiohttp.ClientSession
) -> None:
    url, state = simulator
    state.config.failure_ratio = 1.0
    client = adapter(kind, http, url)
    submitted = await client.submit("ltx-2-19b", dict(BODY))
    seen = await finished(client, submitted.id, submitted.ref)
    assert seen.status == "failed" and seen.error and "moderation" in seen.error


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("status", "retry_after", "error", "cause"),
    [
        (429, "7", UpstreamUnavailable, "rate_limited"),
        (503, None, UpstreamUnavailable, "server_error"),
        (401, None, UpstreamRefused, None),
        (400, None, UpstreamRefused, None),
    ],
)
async def test_submit_errors_against_the_simulator(
    kind: str,
    status: int,
    retry_after: str | None,
    error: type[Exception],
    cause: str | None,
    simulator: tuple[str, SimState],
    http: aiohttp.ClientSession,
) -> None:
    url, state = simulator
    state.faults.submit_status, state.faults.submit_count, state.faults.submit_retry_after = status, 1, retry_after
    with pytest.raises(error) as raised:
        await adapter(kind, http, url).submit("ltx-2-19b", dict(BODY))
    if isinstance(raised.value, UpstreamUnavailable):
        assert raised.value.cause == cause and raised.value.moves_on
        assert raised.value.retry_after_s == (7.0 if retry_after else None)
    else:
        assert isinstance(raised.value, UpstreamRefused) and raised.value.status == status
        assert raised.value.bad_credentials == (status == 401)


@pytest.mark.parametrize("kind", KINDS)
async def test_a_refused_connection_moves_on_and_a_read_timeout_never_does(
    kind: str, simulator: tuple[str, SimState], http: aiohttp.ClientSession
) -> None:
    with pytest.raises(UpstreamUnavailable) as refused:
        await adapter(kind, http, "http://127.0.0.1:9").submit("ltx-2-19b", dict(BODY))
    assert refused.value.cause == "unreachable" and refused.value.moves_on
    url, state = simulator
    state.faults.submit_delay_s = 5.0  # past the session's 2 s: the body was sent, no answer came
    with pytest.raises(UpstreamUnavailable) as timed_out:
        await adapter(kind, http, url).submit("ltx-2-19b", dict(BODY))
    assert timed_out.value.cause == "ambiguous" and not timed_out.value.moves_on
    assert state.accepted == 0 and len(state.bodies) == 1  # the body did arrive


# ---------------------------------------------------------------- against the documented answers


@dataclass
class Canned:
    """A provider's documented answers, by (method, path)."""

    answers: dict[tuple[str, str], tuple[int, dict[str, str], bytes]] = field(default_factory=dict)
    seen: list[tuple[str, str, str]] = field(default_factory=list)


CANNED = web.AppKey("canned", Canned)


async def _canned(request: web.Request) -> web.Response:
    canned = request.app[CANNED]
    canned.seen.append((request.method, request.path, request.headers.get("Authorization", "")))
    status, headers, body = canned.answers.get((request.method, request.path), (404, {}, b'{"detail":"nope"}'))
    return web.Response(status=status, headers={"Content-Type": "application/json", **headers}, body=body)


@pytest.fixture
async def documented() -> AsyncIterator[tuple[str, Canned]]:
    app = web.Application()
    app[CANNED] = Canned()
    app.router.add_route("*", "/{tail:.*}", _canned)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}", app[CANNED]
    await runner.cleanup()


def j(value: object) -> bytes:
    return orjson.dumps(value)


def documented_answers(kind: str, url: str, outcome: str) -> dict[tuple[str, str], tuple[int, dict[str, str], bytes]]:
    """Submit and result answers in each provider's published shapes (SPEC §1 and §11; vendors.md sources)."""
    if kind == "vibedream":
        done = (
            {"status": "completed", "outputs": ["https://assets.vibedream.ai/o/1.mp4"], "error": None}
            if outcome == "completed"
            else {"status": "failed", "outputs": None, "error": "Content moderation: flagged"}
        )
        return {
            ("POST", "/api/v1/models/ltx-2-19b/generate"): (
                200,
                {},
                j(
                    {
                        "id": "vd_1",
                        "status": "processing",
                        "statusUrl": f"{url}/api/v1/predictions/vd_1",
                        "estimatedTime": "5-20s",
                        "costCents": 9,
                        "createdAt": "2025-01-15T12:00:00.000Z",
                    }
                ),
            ),
            ("GET", "/api/v1/predictions/vd_1"): (
                200,
                {},
                j(
                    {
                        "id": "vd_1",
                        "modelId": "ltx-2-19b",
                        "modelName": "LTX-2 19B",
                        "createdAt": "2025-01-15T12:00:00.000Z",
                        "completedAt": "2025-01-15T12:00:09.000Z",
                        **done,
                    }
                ),
            ),
        }
    if kind == "wavespeed":
        data = {
            "id": "ws_1",
            "model": "wavespeed-ai/ltx-2-19b/image-to-video",
            "outputs": [],
            "urls": {"get": f"{url}/api/v3/predictions/ws_1/result"},
            "has_nsfw_contents": [],
            "status": "created",
            "created_at": "2025-01-15T12:00:00.000Z",
            "error": "",
            "timings": {"inference": 0},
        }
        final = (
            {"status": "completed", "outputs": ["https://d1q70pf5vjeyhc.cloudfront.net/o/1.mp4"]}
            if outcome == "completed"
            else {"status": "failed", "error": "NSFW content detected"}
        )
        return {
            ("POST", "/api/v3/wavespeed-ai/ltx-2-19b/image-to-video"): (
                200,
                {},
                j({"code": 200, "message": "success", "data": data}),
            ),
            ("GET", "/api/v3/predictions/ws_1/result"): (
                200,
                {},
                j({"code": 200, "message": "success", "data": {**data, **final}}),
            ),
        }
    base = f"{url}/fal-ai/ltx-2-19b/requests/req_1"
    result = (
        (
            200,
            {},
            j(
                {
                    "video": {
                        "url": "https://v3.fal.media/files/o/1.mp4",
                        "content_type": "video/mp4",
                        "file_name": "1.mp4",
                        "file_size": 1234,
                    },
                    "seed": 7,
                }
            ),
        )
        if outcome == "completed"
        else (422, {}, j({"detail": "The image could not be downloaded"}))
    )
    return {
        ("POST", "/fal-ai/ltx-2-19b/image-to-video"): (
            200,
            {},
            j(
                {
                    "request_id": "req_1",
                    "response_url": base,
                    "status_url": f"{base}/status",
                    "cancel_url": f"{base}/cancel",
                }
            ),
        ),
        ("GET", "/fal-ai/ltx-2-19b/requests/req_1/status"): (
            200,
            {},
            j({"status": "COMPLETED", "response_url": base, "logs": None}),
        ),
        ("GET", "/fal-ai/ltx-2-19b/requests/req_1"): result,
    }


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("outcome", ["completed", "failed"])
async def test_documented_success_and_failure(
    kind: str, outcome: str, documented: tuple[str, Canned], http: aiohttp.ClientSession
) -> None:
    url, canned = documented
    canned.answers = documented_answers(kind, url, outcome)
    client = adapter(kind, http, url, key="doc-key")
    submitted = await client.submit("ltx-2-19b", dict(BODY))
    seen = await client.get_prediction(submitted.id, submitted.ref)
    assert seen.status == outcome
    if outcome == "completed":
        assert seen.outputs and seen.outputs[0].endswith("1.mp4")
    else:
        assert seen.error in (
            "Content moderation: flagged",
            "NSFW content detected",
            "The image could not be downloaded",
        )
    # Polls went where the answer said, with this provider's own key.
    assert {auth for _, _, auth in canned.seen} == {"Key doc-key" if kind == "fal" else "Bearer doc-key"}


@pytest.mark.parametrize("kind", KINDS)
async def test_documented_401_and_429(kind: str, documented: tuple[str, Canned], http: aiohttp.ClientSession) -> None:
    url, canned = documented
    (submit_path,) = [key for key in documented_answers(kind, url, "completed") if key[0] == "POST"]
    unauthorized = {
        "vibedream": {"error": "Invalid API key"},
        "wavespeed": {"code": 401, "message": "Unauthorized"},
        "fal": {"detail": "No user found for Key ID and Secret"},
    }[kind]
    canned.answers = {submit_path: (401, {}, j(unauthorized))}
    with pytest.raises(UpstreamRefused) as refused:
        await adapter(kind, http, url).submit("ltx-2-19b", dict(BODY))
    assert refused.value.bad_credentials
    assert refused.value.message in ("Invalid API key", "Unauthorized", "No user found for Key ID and Secret")
    canned.answers = {submit_path: (429, {"Retry-After": "12"}, j({"code": 429, "message": "Too Many Requests"}))}
    with pytest.raises(UpstreamUnavailable) as limited:
        await adapter(kind, http, url).submit("ltx-2-19b", dict(BODY))
    assert limited.value.cause == "rate_limited" and limited.value.retry_after_s == 12.0


@pytest.mark.parametrize("kind", KINDS)
async def test_documented_malformed_json_is_never_taken_for_an_answer(
    kind: str, documented: tuple[str, Canned], http: aiohttp.ClientSession
) -> None:
    url, canned = documented
    answers = documented_answers(kind, url, "completed")
    (submit_path,) = [key for key in answers if key[0] == "POST"]
    canned.answers = {submit_path: (200, {}, b'{"id": "x", "status": ')}
    with pytest.raises(UpstreamUnavailable) as raised:
        await adapter(kind, http, url).submit("ltx-2-19b", dict(BODY))
    # A 200 that does not parse may have been accepted: never another provider.
    assert not raised.value.moves_on
    canned.answers = {**answers, **{k: (200, {}, b"<html>") for k in answers if k[0] == "GET"}}
    client = adapter(kind, http, url)
    submitted = await client.submit("ltx-2-19b", dict(BODY))
    with pytest.raises(UpstreamUnavailable):
        await client.get_prediction(submitted.id, submitted.ref)


async def test_fal_urls_are_followed_only_on_the_base_urls_host(
    documented: tuple[str, Canned], http: aiohttp.ClientSession
) -> None:
    url, canned = documented
    canned.answers = documented_answers("fal", url, "completed")
    elsewhere = "https://evil.example.com/fal-ai/ltx-2-19b/requests/req_1"
    canned.answers[("POST", "/fal-ai/ltx-2-19b/image-to-video")] = (
        200,
        {},
        j({"request_id": "req_1", "response_url": elsewhere, "status_url": f"{elsewhere}/status"}),
    )
    with pytest.raises(UpstreamUnavailable, match="another host"):
        await adapter("fal", http, url).submit("ltx-2-19b", dict(BODY))
    client = adapter("fal", http, url)
    with pytest.raises(UpstreamUnavailable, match="another host"):
        await client.get_prediction("req_1", {"status": f"{elsewhere}/status", "response": elsewhere})
    assert all(path.startswith("/fal-ai/") for _, path, _ in canned.seen)


def test_fal_mapping_of_duration_resolution_and_seed() -> None:
    mapped = fal_input({"image": "https://x/i.png", "prompt": "p", "resolution": "1080p", "duration": 20, "seed": 5})
    assert mapped == {
        "image_url": "https://x/i.png",
        "prompt": "p",
        "num_frames": 481,  # fal's maximum: 20 s at 24 fps, 8 k + 1 frames
        "fps": 24,
        "video_size": {"width": 1920, "height": 1080},
        "seed": 5,
    }
    defaults = fal_input({"image": "https://x/i.png", "prompt": "p", "seed": -1})
    assert defaults["num_frames"] == 121 and defaults["video_size"] == {"width": 1280, "height": 720}
    assert "seed" not in defaults  # -1 is "random": fal picks one
    for duration in range(5, 21):
        frames = int(fal_input({"image": "i", "prompt": "p", "duration": duration})["num_frames"])  # type: ignore[call-overload]
        assert 9 <= frames <= 481 and (frames - 1) % 8 == 0
