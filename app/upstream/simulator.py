"""A simulator of one provider: sandbox mode, tests and benchmarks talk to it over real HTTP.

It speaks the three wire formats of SPEC §11 at once (vibedream's /api/v1, wavespeed's /api/v3 and
fal's queue under any other path), each in the shapes its provider documents, and adds controls under
/_sim for fault injection and counting (in flight, submits by format), which no provider has. One
simulator stands for one provider: tests and the sandbox start one per provider.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import math
import random
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from app.core import clock
from app.upstream.schemas import GenerateParams

SANDBOX_MP4 = Path(__file__).parent / "assets" / "sandbox.mp4"
MODEL_NAMES = {"ltx-2-19b": "LTX-2 19B"}


def _iso(ts: float) -> str:
    return clock.iso(datetime.fromtimestamp(ts, UTC))


@dataclass
class SimConfig:
    completion_s: float = 6.0
    failure_ratio: float = 0.0
    estimated_time: str = "5-20s"
    price_multiplier: float = 1.0
    output_base_url: str | None = None
    # When set, completed predictions point at a generated output of this many bytes instead of the clip.
    output_bytes: int | None = None


@dataclass
class SimPrediction:
    id: str
    model_id: str
    created: float
    done_at: float
    fails: bool


@dataclass
class Faults:
    """Answer the next N submits or polls with this status (0 = drop the connection)."""

    submit_status: int = 500
    submit_count: int = 0
    poll_status: int = 500
    poll_count: int = 0
    poll_delay_s: float = 0.0
    # Submits: `submit_retry_after` goes with the faulted answers (429s); `submit_delay_s` holds every
    # submit's answer that long after reading its body (a read timeout on the gateway's side).
    submit_retry_after: str | None = None
    submit_delay_s: float = 0.0
    # VibeDream submits (in-process simulator only): each sets `submit_arrived`, then waits for
    # `submit_gate`, so a test can act while the gateway's upstream call is in flight.
    submit_arrived: asyncio.Event | None = None
    submit_gate: asyncio.Event | None = None
    # Outputs: answer the next N downloads with this status (0 = drop the connection); `output_gone`
    # answers 404 for good (the vendor deleted its files); `output_stall_s` sends half the file and
    # then nothing for that long; `output_content_type` overrides the type; `output_redirect`
    # answers 302 to that URL; `output_chunked` sends no Content-Length; `output_chunk_delay_s` paces
    # each 64 KiB (a slow vendor, so a copy can be interrupted half way).
    output_status: int = 500
    output_count: int = 0
    output_gone: bool = False
    output_stall_s: float = 0.0
    output_content_type: str | None = None
    output_redirect: str | None = None
    output_chunked: bool = False
    output_chunk_delay_s: float = 0.0


@dataclass
class SimState:
    config: SimConfig
    predictions: dict[str, SimPrediction] = field(default_factory=dict)
    faults: Faults = field(default_factory=Faults)
    submits: int = 0
    polls: int = 0
    polls_by_id: dict[str, int] = field(default_factory=dict)
    poll_times: dict[str, list[float]] = field(default_factory=dict)
    bodies: list[dict[str, Any]] = field(default_factory=list)
    output_fetches: int = 0
    output_bytes_sent: int = 0
    submits_by_format: dict[str, int] = field(default_factory=dict)
    # Every Authorization header the provider API was called with, counted (which key reached it).
    auths: dict[str, int] = field(default_factory=dict)
    accepted: int = 0
    max_in_flight: int = 0
    # (done_at, id) of the accepted predictions not known to be done, a heap: counting those in flight
    # costs a submit O(log n), where a walk over every prediction made a long benchmark quadratic (the
    # simulator's submits fell to about 1,000/s, below what the gateway serves). /_sim/finish rebuilds
    # it; a done_at lowered by hand elsewhere counts until the time it was accepted with.
    live: list[tuple[float, str]] = field(default_factory=list)

    def in_flight(self) -> int:
        now = time.time()
        live = self.live
        while live and live[0][0] <= now:
            heapq.heappop(live)
        return len(live)


STATE = web.AppKey("state", SimState)


def price_cents(resolution: str, duration: int, multiplier: float) -> int:
    factor = {"480p": 1.0, "720p": (1280 * 720) / (854 * 480), "1080p": (1920 * 1080) / (854 * 480)}[resolution]
    return math.ceil(9 / 5 * factor * duration * multiplier - 1e-9)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def _submit_fault(state: SimState, fmt: str, error: Any) -> web.Response | None:
    """Count the submit; the faulted answer, if one is due (`error(status, message, headers)` in the format's shape)."""
    state.submits += 1
    state.submits_by_format[fmt] = state.submits_by_format.get(fmt, 0) + 1
    faults = state.faults
    if faults.submit_count > 0:
        faults.submit_count -= 1
        if faults.submit_status == 0:
            raise ConnectionResetError("simulated drop")
        headers = {"Retry-After": faults.submit_retry_after} if faults.submit_retry_after else None
        response: web.Response = error(faults.submit_status, "simulated failure", headers)
        return response
    return None


def _accept(state: SimState, pred_id: str) -> SimPrediction:
    config = state.config
    now = time.time()
    pred = SimPrediction(
        id=pred_id,
        model_id="ltx-2-19b",
        created=now,
        done_at=now + config.completion_s,
        fails=random.random() < config.failure_ratio,
    )
    state.predictions[pred.id] = pred
    heapq.heappush(state.live, (pred.done_at, pred.id))
    state.accepted += 1
    state.max_in_flight = max(state.max_in_flight, state.in_flight())
    return pred


def _outcome(state: SimState, request: web.Request, pred: SimPrediction) -> tuple[str, str | None]:
    """("processing" | "completed" | "failed", its output URL when completed)."""
    done = time.time() >= pred.done_at
    status = "processing" if not done else ("failed" if pred.fails else "completed")
    base = (state.config.output_base_url or f"{request.scheme}://{request.host}").rstrip("/")
    output = f"{base}/sandbox/outputs/{pred.id}.mp4"
    if state.config.output_bytes is not None:
        output = f"{base}/sandbox/generated/{state.config.output_bytes}/{pred.id}.mp4"
    return status, output if status == "completed" else None


FAILURE_MESSAGE = "Content moderation: the prompt was flagged (simulated)"


async def _generate(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    if state.faults.submit_arrived is not None:
        state.faults.submit_arrived.set()
    if state.faults.submit_gate is not None:
        await state.faults.submit_gate.wait()
    if not request.headers.get("Authorization", "").startswith("Bearer "):
        state.submits += 1
        return _error(401, "missing API key")
    fault = _submit_fault(state, "vibedream", _error)
    if fault is not None:
        return fault
    model_id = request.match_info["model_id"]
    if model_id not in MODEL_NAMES:
        return _error(404, f"model {model_id} not found")
    try:
        body = await request.json()
        params = GenerateParams.model_validate(body)
    except (ValueError, ValidationError):
        return _error(400, "invalid request body")
    state.bodies.append(body)
    if state.faults.submit_delay_s:
        await asyncio.sleep(state.faults.submit_delay_s)
    config = state.config
    pred = _accept(state, "vd_" + secrets.token_hex(8))
    pred.model_id = model_id
    now = pred.created
    base = f"{request.scheme}://{request.host}"
    cost = price_cents(params.resolution or "720p", params.duration or 5, config.price_multiplier)
    return web.json_response(
        {
            "id": pred.id,
            "status": "processing",
            "statusUrl": f"{base}/api/v1/predictions/{pred.id}",
            "estimatedTime": config.estimated_time,
            "costCents": cost,
            "createdAt": _iso(now),
        }
    )


async def _prediction(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    state.polls += 1
    pred_id = request.match_info["prediction_id"]
    state.polls_by_id[pred_id] = state.polls_by_id.get(pred_id, 0) + 1
    state.poll_times.setdefault(pred_id, []).append(time.time())
    faults = state.faults
    if faults.poll_delay_s:
        await asyncio.sleep(faults.poll_delay_s)
    if faults.poll_count > 0:
        faults.poll_count -= 1
        return _error(faults.poll_status, "simulated failure")
    pred = state.predictions.get(pred_id)
    if pred is None:
        return _error(404, "prediction not found")
    now = time.time()
    done = now >= pred.done_at
    status = "processing" if not done else ("failed" if pred.fails else "completed")
    base = (state.config.output_base_url or f"{request.scheme}://{request.host}").rstrip("/")
    output = f"{base}/sandbox/outputs/{pred.id}.mp4"
    if state.config.output_bytes is not None:
        output = f"{base}/sandbox/generated/{state.config.output_bytes}/{pred.id}.mp4"
    return web.json_response(
        {
            "id": pred.id,
            "modelId": pred.model_id,
            "modelName": MODEL_NAMES[pred.model_id],
            "status": status,
            "outputs": [output] if status == "completed" else None,
            "error": "Content moderation: the prompt was flagged (simulated)" if status == "failed" else None,
            "createdAt": _iso(pred.created),
            "completedAt": _iso(pred.done_at) if done else None,
        }
    )


# ---------------------------------------------------------------- wavespeed (/api/v3)


def _ws_error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"code": status, "message": message}, status=status, headers=headers)


def _ws_data(state: SimState, request: web.Request, pred: SimPrediction) -> dict[str, Any]:
    status, output = _outcome(state, request, pred)
    if status == "processing" and time.time() - pred.created < 0.5:
        status = "created"
    base = f"{request.scheme}://{request.host}"
    return {
        "id": pred.id,
        "model": "wavespeed-ai/ltx-2-19b/image-to-video",
        "outputs": [output] if output else [],
        "urls": {"get": f"{base}/api/v3/predictions/{pred.id}/result"},
        "has_nsfw_contents": [],
        "status": status,
        "created_at": _iso(pred.created),
        "error": FAILURE_MESSAGE if status == "failed" else "",
        "timings": {"inference": None},
    }


async def _ws_submit(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    if not request.headers.get("Authorization", "").startswith("Bearer "):
        state.submits += 1
        return _ws_error(401, "Unauthorized")
    fault = _submit_fault(state, "wavespeed", _ws_error)
    if fault is not None:
        return fault
    try:
        body = await request.json()
        GenerateParams.model_validate(body)
    except (ValueError, ValidationError):
        return _ws_error(400, "invalid request body")
    state.bodies.append(body)
    if state.faults.submit_delay_s:
        await asyncio.sleep(state.faults.submit_delay_s)
    pred = _accept(state, "ws_" + secrets.token_hex(8))
    return web.json_response({"code": 200, "message": "success", "data": _ws_data(state, request, pred)})


async def _ws_result(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    pred_id = request.match_info["prediction_id"]
    fault = _poll_fault(state, pred_id)
    if fault is not None:
        return _ws_error(fault, "simulated failure")
    if not request.headers.get("Authorization", "").startswith("Bearer "):
        return _ws_error(401, "Unauthorized")
    pred = state.predictions.get(pred_id)
    if pred is None:
        return _ws_error(404, "prediction not found")
    return web.json_response({"code": 200, "message": "success", "data": _ws_data(state, request, pred)})


# ---------------------------------------------------------------- fal's queue (any other path)


def _fal_error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"detail": message}, status=status, headers=headers)


def _fal_urls(request: web.Request, app_id: str, request_id: str) -> dict[str, str]:
    base = f"{request.scheme}://{request.host}/{app_id}/requests/{request_id}"
    return {"response_url": base, "status_url": f"{base}/status", "cancel_url": f"{base}/cancel"}


async def _fal_submit(request: web.Request) -> web.StreamResponse:
    if request.method != "POST":
        return _error(404, "not found")
    state = request.app[STATE]
    if not request.headers.get("Authorization", "").startswith("Key "):
        state.submits += 1
        return _fal_error(401, "No user found for Key ID and Secret")
    fault = _submit_fault(state, "fal", _fal_error)
    if fault is not None:
        return fault
    try:
        body = await request.json()
        assert isinstance(body, dict)
        assert isinstance(body.get("image_url"), str) and isinstance(body.get("prompt"), str) and body["prompt"]
        assert 9 <= int(body.get("num_frames", 121)) <= 481
    except (ValueError, AssertionError, TypeError):
        return _fal_error(422, "invalid input")
    state.bodies.append(body)
    if state.faults.submit_delay_s:
        await asyncio.sleep(state.faults.submit_delay_s)
    pred = _accept(
        state, f"{secrets.token_hex(4)}-{secrets.token_hex(2)}-{secrets.token_hex(2)}-{secrets.token_hex(6)}"
    )
    app_id = "/".join(request.match_info["app_path"].split("/")[:2])
    return web.json_response({"request_id": pred.id, **_fal_urls(request, app_id, pred.id), "queue_position": 0})


async def _fal_status(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    pred_id = request.match_info["request_id"]
    fault = _poll_fault(state, pred_id)
    if fault is not None:
        return _fal_error(fault, "simulated failure")
    if not request.headers.get("Authorization", "").startswith("Key "):
        return _fal_error(401, "No user found for Key ID and Secret")
    pred = state.predictions.get(pred_id)
    if pred is None:
        return _fal_error(404, "Request not found")
    status, _ = _outcome(state, request, pred)
    app_id = f"{request.match_info['owner']}/{request.match_info['app']}"
    if status == "processing":
        return web.json_response(
            {
                "status": "IN_PROGRESS",
                "response_url": _fal_urls(request, app_id, pred_id)["response_url"],
                "logs": None,
            },
            status=202,
        )
    return web.json_response(
        {"status": "COMPLETED", "response_url": _fal_urls(request, app_id, pred_id)["response_url"], "logs": None}
    )


async def _fal_response(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    pred_id = request.match_info["request_id"]
    fault = _poll_fault(state, pred_id)
    if fault is not None:
        return _fal_error(fault, "simulated failure")
    pred = state.predictions.get(pred_id)
    if pred is None:
        return _fal_error(404, "Request not found")
    status, output = _outcome(state, request, pred)
    if status == "processing":
        return _fal_error(400, "Request is still in progress")
    if status == "failed":
        return _fal_error(422, FAILURE_MESSAGE)
    return web.json_response(
        {
            "video": {"url": output, "content_type": "video/mp4", "file_name": f"{pred_id}.mp4", "file_size": None},
            "seed": 42,
        }
    )


def _poll_fault(state: SimState, pred_id: str) -> int | None:
    """Count a poll (any format); the status of a faulted answer, if one is due."""
    state.polls += 1
    state.polls_by_id[pred_id] = state.polls_by_id.get(pred_id, 0) + 1
    state.poll_times.setdefault(pred_id, []).append(time.time())
    if state.faults.poll_count > 0:
        state.faults.poll_count -= 1
        return state.faults.poll_status
    return None


GENERATED_CHUNK = 64 * 1024


def generated_chunks(seed: str, size: int) -> Iterator[bytes]:
    """The bytes of a generated output, 64 KiB at a time: never the whole file in memory, and the
    same bytes for the same seed and size, so a copy can be compared with what was served."""
    for index, offset in enumerate(range(0, size, GENERATED_CHUNK)):
        block = hashlib.sha256(f"{seed}:{index}".encode()).digest() * (GENERATED_CHUNK // 32)
        yield block[: min(GENERATED_CHUNK, size - offset)]


async def _output_fault(request: web.Request) -> web.StreamResponse | None:
    state = request.app[STATE]
    state.output_fetches += 1
    faults = state.faults
    if faults.output_redirect:
        raise web.HTTPFound(faults.output_redirect)
    if faults.output_gone:
        return _error(404, "output not found")
    if faults.output_count > 0:
        faults.output_count -= 1
        if faults.output_status == 0:
            raise ConnectionResetError("simulated drop")
        return _error(faults.output_status, "simulated failure")
    return None


async def _send(request: web.Request, chunks: Iterator[bytes], size: int, content_type: str) -> web.StreamResponse:
    faults = request.app[STATE].faults
    response = web.StreamResponse(headers={"Content-Type": faults.output_content_type or content_type})
    if faults.output_chunked:
        response.enable_chunked_encoding()
    else:
        response.content_length = size
    await response.prepare(request)
    sent = 0
    try:
        for chunk in chunks:
            if faults.output_stall_s and sent >= size // 2:
                await asyncio.sleep(faults.output_stall_s)
                return response  # the connection closes short of Content-Length
            if faults.output_chunk_delay_s:
                await asyncio.sleep(faults.output_chunk_delay_s)
            await response.write(chunk)
            sent += len(chunk)
            request.app[STATE].output_bytes_sent += len(chunk)
        await response.write_eof()
    except ConnectionResetError:
        pass  # the downloader went away (a killed worker, a stall it gave up on): nothing to tell
    return response


async def _output(request: web.Request) -> web.StreamResponse:
    fault = await _output_fault(request)
    if fault is not None:
        return fault
    data = SANDBOX_MP4.read_bytes()
    pieces = (data[i : i + GENERATED_CHUNK] for i in range(0, len(data), GENERATED_CHUNK))
    return await _send(request, pieces, len(data), "video/mp4")


async def _generated(request: web.Request) -> web.StreamResponse:
    """/sandbox/generated/{size}/{name}: `size` deterministic bytes, generated as they are sent."""
    fault = await _output_fault(request)
    if fault is not None:
        return fault
    size = int(request.match_info["size"])
    return await _send(request, generated_chunks(request.match_info["name"], size), size, "video/mp4")


async def _root(_request: web.Request) -> web.StreamResponse:
    return web.json_response({"service": "vibedream-simulator"})


async def _get_stats(request: web.Request) -> web.StreamResponse:
    """Counts; with ?detail=1 also when each prediction was polled (to check that no two processes
    polled one prediction within the same interval)."""
    state = request.app[STATE]
    body: dict[str, Any] = {
        "submits": state.submits,
        "polls": state.polls,
        "pollsById": state.polls_by_id,
        "predictions": len(state.predictions),
        "outputFetches": state.output_fetches,
        "outputBytesSent": state.output_bytes_sent,
        "submitsByFormat": state.submits_by_format,
        "accepted": state.accepted,
        "inFlight": state.in_flight(),
        "maxInFlight": state.max_in_flight,
        "auths": state.auths,
    }
    if request.query.get("detail"):
        body["pollTimes"] = state.poll_times
        body["doneAt"] = {p.id: p.done_at for p in state.predictions.values()}
    return web.json_response(body)


async def _set_faults(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = await request.json()
    for name, value in body.items():
        if hasattr(state.faults, name):
            setattr(state.faults, name, value)
    return web.json_response({"ok": True})


async def _set_config(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = await request.json()
    for name, value in body.items():
        if hasattr(state.config, name):
            setattr(state.config, name, value)
    return web.json_response({"ok": True})


async def _finish(request: web.Request) -> web.StreamResponse:
    """Make every prediction terminal now (tests that should not wait for the clock)."""
    state = request.app[STATE]
    now = time.time()
    for pred in state.predictions.values():
        pred.done_at = min(pred.done_at, now)
    state.live.clear()
    return web.json_response({"ok": True})


@web.middleware
async def _count_auth(request: web.Request, handler: Any) -> web.StreamResponse:
    if not request.path.startswith(("/_sim", "/sandbox")):
        auths = request.app[STATE].auths
        header = request.headers.get("Authorization", "")
        auths[header] = auths.get(header, 0) + 1
    response: web.StreamResponse = await handler(request)
    return response


def create_simulator(config: SimConfig | None = None) -> web.Application:
    app = web.Application(middlewares=[_count_auth])
    app[STATE] = SimState(config=config or SimConfig())
    app.router.add_get("/", _root)
    app.router.add_post("/api/v1/models/{model_id}/generate", _generate)
    app.router.add_get("/api/v1/predictions/{prediction_id}", _prediction)
    app.router.add_get("/sandbox/outputs/{name}", _output)
    app.router.add_get(r"/sandbox/generated/{size:\d{1,12}}/{name}", _generated)
    app.router.add_get("/_sim/stats", _get_stats)
    app.router.add_post("/_sim/faults", _set_faults)
    app.router.add_post("/_sim/config", _set_config)
    app.router.add_post("/_sim/finish", _finish)
    app.router.add_post("/api/v3/{model:.+}", _ws_submit)
    app.router.add_get("/api/v3/predictions/{prediction_id}/result", _ws_result)
    app.router.add_get("/api/v3/predictions/{prediction_id}", _ws_result)
    # fal's queue last: its submit path is any app id (owner/app[/sub-path]).
    app.router.add_get("/{owner}/{app}/requests/{request_id}/status", _fal_status)
    app.router.add_get("/{owner}/{app}/requests/{request_id}", _fal_response)
    # Any method: a GET of an unknown path is then a 404 (from the handler), not a 405.
    app.router.add_route("*", "/{app_path:.+}", _fal_submit)
    return app


async def start_simulator(
    host: str = "127.0.0.1", port: int = 0, config: SimConfig | None = None
) -> tuple[web.AppRunner, str]:
    """Start the simulator on this event loop; returns the runner and its base URL."""
    runner = web.AppRunner(create_simulator(config), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    server = site._server
    assert server is not None
    bound_port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    return runner, f"http://{host}:{bound_port}"


def run_simulator(host: str, port: int, config: SimConfig) -> None:
    web.run_app(create_simulator(config), host=host, port=port, access_log=None, print=None)
