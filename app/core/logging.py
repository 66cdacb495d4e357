"""One JSON line per event, with the request id, tenant and prediction when known."""

from __future__ import annotations

import asyncio
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

import orjson

from app.core import clock

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)
tenant_id_var: ContextVar[str | None] = ContextVar("tenant_id", default=None)
# What a request's handler adds to its access log line (app/core/middleware.py opens it per request).
access_fields_var: ContextVar[dict[str, Any] | None] = ContextVar("access_fields", default=None)


def note_access(**fields: Any) -> bool:
    """Add `fields` to this request's access log line: one line a request rather than one more of its
    own (a log line costs a record, its JSON and a write). False outside a request: the caller logs."""
    noted = access_fields_var.get()
    if noted is None:
        return False
    noted.update(fields)
    return True


_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": clock.iso(datetime.fromtimestamp(record.created, UTC)),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = request_id_var.get()
        if request_id:
            entry["request_id"] = request_id
        tenant_id = tenant_id_var.get()
        if tenant_id:
            entry["tenant_id"] = tenant_id
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        # Tracebacks are deliberately left out: they can carry URLs, keys and request bodies.
        if record.exc_info and record.exc_info[0] is not None:
            entry["error_type"] = record.exc_info[0].__name__
        return orjson.dumps(entry, default=str).decode()


class TurnHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Lines logged in one turn of the event loop go out in one write, at the end of that turn.

    Why: a request's access line was a write(2) of its own, as costly as the answer's send (bench/FINDINGS.md,
    issue 25); at 32 concurrent requests many end in one turn. A warning or an error goes out at once,
    after the lines before it: what an operator acts on (a confirm abandoned, an outage) does not wait,
    and a crash loses at most one turn's informational lines. Off the loop's thread, every line at once."""

    _MAX_PENDING = 64 * 1024

    def __init__(self, stream: Any = None) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._pending_size = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        loop = _running_loop() if record.levelno < logging.WARNING else None
        if loop is None:
            self._pending.append(line)
            self._write_pending()
            return
        if not self._pending:
            loop.call_soon(self.flush)
        self._pending.append(line)
        self._pending_size += len(line)
        if self._pending_size > self._MAX_PENDING:
            self._write_pending()

    def flush(self) -> None:
        self.acquire()
        try:
            self._write_pending()
        finally:
            self.release()

    def _write_pending(self) -> None:
        if not self._pending:
            return
        text, self._pending, self._pending_size = "".join(self._pending), [], 0
        try:
            self.stream.write(text)
            self.stream.flush()
        except Exception:
            return  # a closed or broken stream: logging must not take the process down


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def configure_logging(level: str = "INFO", json_lines: bool = True) -> None:
    # What no line shows is not gathered: the caller's file, line and function (a frame walk per record)
    # and the thread and process (a lookup and a system call). Each access line cost 2.5 µs less (of 11),
    # the gateway's CPU per submit about 2 % (issue 25). The logging HOWTO's "Optimization" section names
    # these switches; a plain-text format that wanted them would turn them back on.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None
    handler = TurnHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("uvicorn.access", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
