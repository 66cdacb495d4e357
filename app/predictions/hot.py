"""The two routes callers hammer, submit and GET of a prediction, served as bare ASGI handlers (issue 25).

Why bare: FastAPI's routing and dependency solving cost about 0.26 ms of CPU per submit (py-spy, 32
concurrent), as much as the rest of the GET: a `Request`, the dependency graph solved per request, every
parameter validated through its own field, a response class. Here the headers are read in one pass over
the ASGI scope, the body is parsed and validated by pydantic-core in one call
(`GenerateRequest.model_validate_json`), and the answer goes out as two ASGI messages.

What stays: the FastAPI declarations in app/predictions/router.py are still the one declaration of these
routes' interface (their OpenAPI, unchanged: tests/test_hot_routes.py compares it), and their bodies call
the same `submit_answer` and `prediction_answer` as these handlers (FastAPI serves a request the
dispatcher passes on: one under a root_path). `HotRoutes` (app/main.py) dispatches an exact method and
path match only, inside RequestMiddleware (request id, guard, admission, metrics by route template,
access log, budget headers, Server-Timing), so a 405, a trailing slash or any other route is FastAPI's
as before.

What FastAPI did, in its order, done by hand (tests/test_hot_routes.py checks every answer, good and bad,
against ones recorded from the FastAPI routes):
1. the body is read; a body that is not JSON is refused before the key is checked (422 JSON decode error
   at its position, or 400 for one the parser cannot read at all, e.g. nested too deep);
2. the dependencies: the key check (401, 403) with the balance for the headers, then the public base URL
   (400 invalid_host);
3. the path, header and body parameters, all their errors in one 422 (path, then header, then body).
An error is rendered by the same functions as FastAPI's handlers (app/core/errors.py); an unexpected
exception propagates, as from a FastAPI route, to the outermost handler that logs it and answers 500.
"""

from __future__ import annotations

import contextlib
import email.message
import json
import re
from datetime import datetime
from typing import Annotated, Any

from fastapi import Path
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import TypeAdapter, ValidationError
from starlette.types import Receive, Scope, Send

from app.budgets import balances
from app.budgets import service as budgets_service
from app.budgets.deps import authenticate, current_caller
from app.budgets.headers import note_balance, note_charge
from app.core import clock
from app.core.database import read_connection, transaction
from app.core.errors import (
    AppError,
    DatabaseUnavailable,
    InvalidRequest,
    app_error_response,
    http_error_response,
    validation_problem,
)
from app.core.public_url import base_url_of
from app.core.responses import dumps, send_json_bytes
from app.core.retry_after import retry_after_value
from app.core.types import Line
from app.outputs import service as outputs_service
from app.predictions import failover, reads
from app.predictions import service as predictions_service
from app.predictions.cache import FINAL
from app.predictions.schemas import GenerateRequest
from app.runtime import Runtime
from app.tenants import service as tenants_service
from app.tenants.deps import Caller, bearer_credentials, cached_caller

SUBMIT_PATH = "/api/v1/models/{modelId}/generate"
GET_PATH = "/api/v1/predictions/{predictionId}"
IDEMPOTENCY_KEY_MAX = 255
MODEL_ID_MAX = 100

# The parameters as the FastAPI declarations type them (same constraints, so the same messages).
_MODEL_ID: TypeAdapter[str] = TypeAdapter(Annotated[Line, Path(max_length=MODEL_ID_MAX)])
_LINE: TypeAdapter[str] = TypeAdapter(Line)
_BODY: TypeAdapter[GenerateRequest] = TypeAdapter(GenerateRequest)


def _prefer_wait(prefer: str | None, cap_s: float) -> float | None:
    if not prefer:
        return None
    match = re.search(r"(?:^|[,;\s])wait\s*=\s*(\d+)", prefer)
    return min(float(match.group(1)), cap_s) if match else None


def retry_after(next_poll_at: datetime | None) -> str:
    """Seconds until the gateway's next poll of a processing prediction: asking earlier learns nothing."""
    if next_poll_at is None:
        return "1"
    return retry_after_value(max(1.0, (next_poll_at - clock.now()).total_seconds()))


# ---------------------------------------------------------------- the implementation both ways share


async def submit_answer(
    runtime: Runtime,
    caller: Caller,
    base_url: str,
    body: GenerateRequest,
    model_id: str,
    idempotency_key: str | None,
    prefer: str | None,
) -> tuple[bytes, dict[str, str]]:
    """The submit once its caller, body and parameters are checked: the JSON answer and its headers."""
    if idempotency_key is not None and not (0 < len(idempotency_key) <= IDEMPOTENCY_KEY_MAX):
        raise InvalidRequest(f"Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_MAX} characters.", field="Idempotency-Key")
    result = await failover.submit(
        runtime,
        caller.tenant,
        caller.key,
        model_id,
        body,
        idempotency_key=idempotency_key,
        status_url_base=f"{base_url}/api/v1/predictions",
        public_base_url=base_url,
    )
    headers = {"Idempotent-Replayed": "true"} if result.replayed else {}
    content: dict[str, Any] = result.body
    if not result.replayed:
        note_charge(content.get("costCents") or 0)
    wait_s = _prefer_wait(prefer, runtime.settings.prefer_wait_max_s)
    next_poll_at = result.next_poll_at
    if wait_s is not None:
        prediction = await predictions_service.wait_until_terminal(
            runtime, caller.tenant.id, result.prediction_id, wait_s
        )
        if prediction is not None:
            content = predictions_service.present_submit(prediction, content["statusUrl"], extended=True)
            if content["status"] == "completed" and content["outputs"]:
                # The links stored at completion are the current ones unless they expired meanwhile:
                # a database away now is no reason to answer a recorded submit with an error.
                with contextlib.suppress(DatabaseUnavailable):
                    async with transaction(runtime.sessions, readonly=True) as session:
                        await outputs_service.show_current_links(session, runtime.settings, [content])
            next_poll_at = prediction.next_poll_at
        headers["Preference-Applied"] = f"wait={int(wait_s)}"
    if content["status"] == "processing":
        headers["Retry-After"] = retry_after(next_poll_at)
    return dumps(content), headers


async def prediction_answer(
    runtime: Runtime, credentials: HTTPAuthorizationCredentials | None, prediction_id: str
) -> tuple[bytes, dict[str, str] | None]:
    """GET of a prediction once its parameters are checked: the JSON answer and its headers."""
    # The route callers poll: the key check from the cache; a final prediction (terminal, never
    # rehosted) from memory with the balance snapshot, else one statement reads the prediction, its
    # links and the balance for the headers (on a bare connection: no ORM session).
    caller = cached_caller(credentials)
    if caller is not None:
        tenants_service.require_scope(caller.key, "read")
        final = FINAL.get(caller.tenant.id, prediction_id)
        snapshot = balances.BALANCES.get(caller.tenant.id) if final is not None else None
        if final is not None and snapshot is not None:
            note_balance(snapshot)
            return final, None
    reader = reads.batched(runtime.sessions, runtime.settings) if caller is not None else None
    if reader is not None and caller is not None:
        # The common case on PostgreSQL: the key from the cache, the read in the batch of those arriving
        # meanwhile (app/predictions/reads.py); a connection of its own only for what is rare.
        tenant = caller.tenant
        now = clock.now()
        period_start = budgets_service.period_of(tenant.budget_period, now).start
        key = (prediction_id, tenant.id, balances.counter_scope(tenant), period_start)
        read = await reads.read_with_balance(reader, key)
        if read is None or (read.body.get("queued") and runtime.queue is not None):
            async with read_connection(runtime.sessions) as connection:
                if read is None:
                    balance = await balances.read_balance(connection, tenant)
                else:
                    assert runtime.queue is not None
                    read.body["queuePosition"] = await runtime.queue.position(connection, tenant.id, prediction_id)
        if read is not None:
            balance = balances.balance_of(tenant, read.spent_cents, read.reserved_cents, now)
    else:
        async with read_connection(runtime.sessions) as connection:
            if caller is None:
                caller = await authenticate(connection, credentials, runtime=runtime)
                tenants_service.require_scope(caller.key, "read")
            tenant = caller.tenant
            now = clock.now()
            period_start = budgets_service.period_of(tenant.budget_period, now).start
            read = await predictions_service.read_with_balance(
                connection, runtime.settings, tenant.id, prediction_id, balances.counter_scope(tenant), period_start
            )
            if read is None:
                balance = await balances.read_balance(connection, tenant)
            else:
                balance = balances.balance_of(tenant, read.spent_cents, read.reserved_cents, now)
                if read.body.get("queued") and runtime.queue is not None:
                    read.body["queuePosition"] = await runtime.queue.position(connection, tenant.id, prediction_id)
    balances.BALANCES.put(tenant.id, balance, runtime.settings.balance_ttl_s)
    note_balance(balance)
    if read is None:
        raise predictions_service.not_found(prediction_id)
    body = dumps(read.body)
    if read.final:
        FINAL.put(tenant.id, prediction_id, body)
    processing = read.body["status"] == "processing"
    return body, {"Retry-After": retry_after(read.next_poll_at)} if processing else None


# ---------------------------------------------------------------- the bare handlers

_SUBMIT_HEADERS = frozenset(
    {
        b"authorization",
        b"content-type",
        b"idempotency-key",
        b"prefer",
        b"host",
        b"x-forwarded-proto",
        b"x-forwarded-host",
    }
)
_MISSING: Any = object()  # no body at all (FastAPI's Undefined)


def _first_headers(scope: Scope, wanted: frozenset[bytes]) -> dict[bytes, str]:
    """The first value of each wanted header, as Starlette's `Headers.get` gives it (latin-1)."""
    found: dict[bytes, str] = {}
    for name, value in scope["headers"]:
        if name in wanted and name not in found:
            found[name] = value.decode("latin-1")
    return found


def _is_json(content_type: str) -> bool:
    """FastAPI's test: application/json or application/*+json, parameters allowed."""
    if content_type == "application/json":
        return True
    message = email.message.Message()
    message["content-type"] = content_type
    if message.get_content_maintype() != "application":
        return False
    subtype = message.get_content_subtype()
    return subtype == "json" or subtype.endswith("+json")


class _Unparsable(Exception):
    """A body declared as JSON that Python's parser could not read: FastAPI's 400."""


async def _read_body(receive: Receive) -> bytes | None:
    """The whole body, or None if the client went away (or the guard refused it: app/core/middleware.py)."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        if message["type"] == "http.request":
            chunk = message.get("body", b"")
            if chunk:
                chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _errors_at(exc: ValidationError, *prefix: str) -> list[dict[str, Any]]:
    return [{**error, "loc": (*prefix, *error["loc"])} for error in exc.errors()]


async def _generate(scope: Scope, receive: Receive, send: Send, runtime: Runtime, model_id: str) -> None:
    headers = _first_headers(scope, _SUBMIT_HEADERS)
    body = await _read_body(receive)
    if body is None:
        # What FastAPI answers when the body cannot be read; the guard's 413 (or nobody) gets it instead.
        await http_error_response(400, "There was an error parsing the body")(scope, receive, send)
        return
    parsed: GenerateRequest | None = None
    raw: Any = _MISSING
    if body:
        content_type = headers.get(b"content-type")
        if content_type and _is_json(content_type):
            try:
                parsed = GenerateRequest.model_validate_json(body)
            except ValidationError:
                # Refused: the errors as FastAPI gave them, from Python's JSON parser and a validation of
                # what it read (a refusal may take the slow way; messages and positions stay the same).
                try:
                    raw = json.loads(body)
                except json.JSONDecodeError as exc:
                    raise validation_problem(
                        [{"type": "json_invalid", "loc": ("body", exc.pos), "msg": "JSON decode error"}]
                    ) from exc
                except Exception as exc:  # not UTF-8, nested deeper than the parser recurses
                    raise _Unparsable from exc
        else:
            raw = body  # not declared as JSON: validated as the bytes it is, and refused
    credentials = bearer_credentials(headers.get(b"authorization"))
    caller = await current_caller(runtime, credentials)
    base_url = base_url_of(
        scope,
        runtime.settings,
        headers.get(b"host"),
        headers.get(b"x-forwarded-proto"),
        headers.get(b"x-forwarded-host"),
    )
    errors: list[dict[str, Any]] = []
    try:
        _MODEL_ID.validate_python(model_id)
    except ValidationError as exc:
        errors += _errors_at(exc, "path", "modelId")
    idempotency_key = headers.get(b"idempotency-key")
    if idempotency_key is not None:
        try:
            _LINE.validate_python(idempotency_key)
        except ValidationError as exc:
            errors += _errors_at(exc, "header", "Idempotency-Key")
    if parsed is None:
        if raw is _MISSING:
            errors.append({"type": "missing", "loc": ("body",), "msg": "Field required"})
        else:
            try:
                parsed = _BODY.validate_python(raw, from_attributes=True)
            except ValidationError as exc:
                errors += _errors_at(exc, "body")
    if errors:
        raise validation_problem(errors)
    assert parsed is not None
    content, answer_headers = await submit_answer(
        runtime, caller, base_url, parsed, model_id, idempotency_key, headers.get(b"prefer")
    )
    await send_json_bytes(send, content, answer_headers)


async def generate(scope: Scope, receive: Receive, send: Send, runtime: Runtime, model_id: str) -> None:
    """POST /api/v1/models/{modelId}/generate."""
    try:
        await _generate(scope, receive, send, runtime, model_id)
    except AppError as exc:
        await app_error_response(exc)(scope, receive, send)
    except _Unparsable:
        await http_error_response(400, "There was an error parsing the body")(scope, receive, send)


async def get_prediction(scope: Scope, receive: Receive, send: Send, runtime: Runtime, prediction_id: str) -> None:
    """GET /api/v1/predictions/{predictionId}."""
    try:
        authorization = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
                break
        credentials = bearer_credentials(authorization)
        try:
            _LINE.validate_python(prediction_id)
        except ValidationError as exc:
            raise validation_problem(_errors_at(exc, "path", "predictionId")) from None
        body, headers = await prediction_answer(runtime, credentials, prediction_id)
    except AppError as exc:
        await app_error_response(exc)(scope, receive, send)
        return
    await send_json_bytes(send, body, headers)
