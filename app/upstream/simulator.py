"""A simulator of the VibeDream API: sandbox mode, tests and benchmarks talk to it over real HTTP.

It follows the vendor's documented shapes (SPEC section 1) and adds controls under /_sim for fault
injection and counting, which the real vendor does not have.
"""

from __future__ import annotations

import asyncio
import hashlib
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
    # Submits (in-process simulator only): each sets `submit_arrived`, then waits for `submit_gate`, so a
    # test can act while the gateway's upstream call is in flight.
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


STATE = web.AppKey("state", SimState)


def price_cents(resolution: str, duration: int, multiplier: float) -> int:
    factor = {"480p": 1.0, "720p": (1280 * 720) / (854 * 480), "1080p": (1920 * 1080) / (854 * 480)}[resolution]
    return math.ceil(9 / 5 * factor * duration * multiplier - 1e-9)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def _generate(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    state.submits += 1
    if state.faults.submit_arrived is not None:
        state.faults.submit_arrived.set()
    if state.faults.submit_gate is not None:
        await state.faults.submit_gate.wait()
    if not request.headers.get("Authorization", "").startswith("Bearer "):
        return _error(401, "missing API key")
    if state.faults.submit_count > 0:
        state.faults.submit_count -= 1
        if state.faults.submit_status == 0:
            raise ConnectionResetError("simulated drop")
        return _error(state.faults.submit_status, "simulated failure")
    model_id = request.match_info["model_id"]
    if model_id not in MODEL_NAMES:
        return _error(404, f"model {model_id} not found")
    try:
        body = await request.json()
        params = GenerateParams.model_validate(body)
    except (ValueError, ValidationError):
        return _error(400, "invalid request body")
    state.bodies.append(body)
    config = state.config
    now = time.time()
    pred = SimPrediction(
        id="vd_" + secrets.token_hex(8),
        model_id=model_id,
        created=now,
        done_at=now + config.completion_s,
        fails=random.random() < config.failure_ratio,
    )
    state.predictions[pred.id] = pred
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
    return web.json_response({"ok": True})


def create_simulator(config: SimConfig | None = None) -> web.Application:
    app = web.Application()
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
