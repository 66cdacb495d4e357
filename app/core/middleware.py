"""The one ASGI middleware: request id, sandbox and nosniff headers, the request guard, headers a domain notes for the
answer (the budget's), `Server-Timing`, metrics and the access log.

One plain ASGI layer rather than one per concern: each layer costs a coroutine and a wrapped `send` per
message on every request, and three of them held a third of the gateway's CPU per submit (issue 13).
The rules stay in their own modules (app/core/guard.py, app/core/timing.py, the domains' header slots);
this only calls them in order.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from typing import Any, Generic, TypeVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core import guard, lifecycle, metrics, timing
from app.core.logging import access_fields_var, request_id_var, tenant_id_var

access_log = logging.getLogger("vidgate.access")

_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# The method is the client's to choose: any other is counted as "OTHER", so the label set stays finite.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

T = TypeVar("T")
Headers = list[tuple[bytes, bytes]]
# Answers given before any route could note its headers (a method not allowed, a body too large or not
# JSON, an unknown path): `unnoted` is asked for theirs. Not after a refused credential (401, 403), a
# limit (429) or an outage (5xx): those either noted theirs or must not cost another lookup.
_UNNOTED = frozenset({400, 404, 405, 406, 411, 413, 415, 422, 431})


class HeaderSlot(Generic[T]):
    """A value a request's handler notes (the caller's balance) that the middleware renders as headers
    on the app's answer. One mutable slot per request, opened by the middleware: a value noted inside a
    dependency that ran in a copied context still reaches the middleware through the shared list."""

    def __init__(self, name: str, render: Callable[[T], Headers]) -> None:
        self._var: ContextVar[list[T] | None] = ContextVar(name, default=None)
        self.render = render

    def note(self, value: T) -> None:
        slot = self._var.get()
        if slot is not None:
            slot[:] = [value]

    def current(self) -> T | None:
        slot = self._var.get()
        return slot[0] if slot else None

    def open(self) -> tuple[list[T], Any]:
        slot: list[T] = []
        return slot, self._var.set(slot)

    def close(self, token: Any) -> None:
        self._var.reset(token)


class RequestMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        sandbox: bool,
        max_body_bytes: int = guard.MAX_BODY_BYTES,
        header_slots: Sequence[HeaderSlot[Any]] = (),
        unnoted: Callable[[Scope], Awaitable[Headers]] | None = None,
        admission: lifecycle.Admission | None = None,
    ) -> None:
        self.app = app
        self.admission = admission
        self.sandbox = sandbox
        self.max_body_bytes = max_body_bytes
        self.header_slots = tuple(header_slots)
        self.unnoted = unnoted
        # Bounded: route templates (or "unmatched"), methods and status codes are all finite sets.
        self._metrics: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = b""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                given = value  # the last one wins, as a dict of the headers would have it
        given_id = given.decode("latin-1")
        # A correlation id, not a secret: the process's PRNG, not a getrandom() system call per request.
        request_id = given_id if _VALID_REQUEST_ID.match(given_id) else f"{random.getrandbits(96):024x}"
        token = request_id_var.set(request_id)
        tenant_token = tenant_id_var.set(None)
        access_fields: dict[str, Any] = {}
        fields_token = access_fields_var.set(access_fields)
        started = time.perf_counter()
        spent, timing_token = timing.start()
        opened = [(slot, *slot.open()) for slot in self.header_slots]
        status = 500
        # nosniff on every answer (JSON, problems, outputs, pages): a browser never reads one as another type.
        extra = [(b"x-request-id", request_id.encode()), (b"x-content-type-options", b"nosniff")]
        if self.sandbox:
            extra.append((b"x-vidgate-sandbox", b"true"))
        max_body = self.max_body_bytes
        received = 0
        refused = False  # the guard answered while the body streamed in
        app_started = False  # the app had begun its own answer

        async def unnoted_headers(message: Message, noted: bool) -> Headers:
            if self.unnoted is None or message["status"] not in _UNNOTED:
                return []
            if noted and any(values for _, values, _ in opened):
                return []
            try:
                return await self.unnoted(scope)
            except Exception:  # a header is not worth turning a 4xx into a 500
                return []

        def decorate(message: Message, noted: bool, more: Headers) -> None:
            nonlocal status
            status = message["status"]
            headers = list(message.get("headers", []))
            if noted:
                for slot, values, _ in opened:
                    if values:
                        headers += slot.render(values[0])
            headers += more
            headers += extra
            headers.append((b"server-timing", timing.header(spent, time.perf_counter() - started)))
            if lifecycle.draining() and not any(name == b"connection" for name, _ in headers):
                # Leaving: a client keeping this connection comes back through its balancer to another one.
                headers.append((b"connection", b"close"))
            message["headers"] = headers

        async def send_refusal(message: Message) -> None:
            # The guard's own answer: a request id, Server-Timing and a metric, but nothing the app noted.
            if message["type"] == "http.response.start":
                decorate(message, False, await unnoted_headers(message, False))
            await send(message)

        async def guarded_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_body:
                    # A chunked body (or one longer than its Content-Length) passed the limit: answer now
                    # and tell the app the client is gone, so it stops reading and its answer is dropped.
                    refused = True
                    if not app_started:
                        await guard.refuse(send_refusal, guard.too_large(max_body))
                    return {"type": "http.disconnect"}
            return message

        async def app_send(message: Message) -> None:
            nonlocal app_started
            if refused and not app_started:
                return
            if message["type"] == "http.response.start":
                app_started = True
                decorate(message, True, await unnoted_headers(message, True))
            await send(message)

        admission = self.admission if scope["path"] not in lifecycle.OPEN_PATHS else None
        admitted = False
        try:
            if admission is not None:
                admitted = admission.enter()
                if not admitted:
                    # Its body, if any, is left to the server to discard: the connection stays usable.
                    await guard.refuse(send_refusal, lifecycle.Overloaded(admission.limit), close=False)
                    return
            refusal = guard.check_headers(scope["headers"], max_body)
            if refusal is not None:
                await guard.refuse(send_refusal, refusal)
            else:
                await self.app(scope, guarded_receive, app_send)
        finally:
            if admitted:
                assert admission is not None
                admission.leave()
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            method = scope["method"] if scope["method"] in _METHODS else "OTHER"
            counted = (path, method, status)
            children = self._metrics.get(counted)
            if children is None:
                # labels() hashes and validates its arguments on every call: look each child up once.
                children = (
                    metrics.REQUESTS.labels(route=path, method=method, status=str(status)),
                    metrics.REQUEST_LATENCY.labels(route=path),
                )
                self._metrics[counted] = children
            children[0].inc()
            children[1].observe(elapsed)
            # The route template, never the raw path or query string: those can carry ids and tokens.
            if access_log.isEnabledFor(logging.INFO):
                access_log.info(
                    "request",
                    extra={
                        **access_fields,
                        "method": method,
                        "route": path,
                        "status": status,
                        "ms": round(elapsed * 1000, 1),
                    },
                )
            for slot, _, slot_token in reversed(opened):
                slot.close(slot_token)
            timing.stop(timing_token)
            access_fields_var.reset(fields_token)
            tenant_id_var.reset(tenant_token)
            request_id_var.reset(token)
