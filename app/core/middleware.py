"""A plain ASGI middleware (cheaper than BaseHTTPMiddleware): request id, sandbox header, metrics."""

from __future__ import annotations

import logging
import re
import secrets
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core import metrics, timing
from app.core.logging import request_id_var, tenant_id_var

access_log = logging.getLogger("vidgate.access")

_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# The method is the client's to choose: any other is counted as "OTHER", so the label set stays finite.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, *, sandbox: bool) -> None:
        self.app = app
        self.sandbox = sandbox
        # Bounded: route templates (or "unmatched"), methods and status codes are all finite sets.
        self._metrics: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _VALID_REQUEST_ID.match(given) else secrets.token_hex(12)
        token = request_id_var.set(request_id)
        tenant_token = tenant_id_var.set(None)
        started = time.perf_counter()
        spent, timing_token = timing.start()
        status = 500
        extra = [(b"x-request-id", request_id.encode())]
        if self.sandbox:
            extra.append((b"x-vidgate-sandbox", b"true"))

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                server_timing = (b"server-timing", timing.header(spent, time.perf_counter() - started))
                message["headers"] = [*message.get("headers", []), *extra, server_timing]
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
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
            access_log.info(
                "request",
                extra={"method": method, "route": path, "status": status, "ms": round(elapsed * 1000, 1)},
            )
            timing.stop(timing_token)
            tenant_id_var.reset(tenant_token)
            request_id_var.reset(token)
