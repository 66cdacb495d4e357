"""Log lines of one turn of the event loop go out in one write (app/core/logging.py, TurnHandler); a warning
or an error at once, after the lines before it; off the loop, every line at once; none is lost at exit."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import orjson
import pytest

from app.core.logging import JsonFormatter, TurnHandler, configure_logging


class Stream:
    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> None:
        self.writes.append(text)

    def flush(self) -> None:
        pass


@pytest.fixture
def logged() -> Iterator[tuple[logging.Logger, Stream, TurnHandler]]:
    stream = Stream()
    handler = TurnHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("vidgate.test_log_writes")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield logger, stream, handler
    finally:
        logger.removeHandler(handler)
        logger.propagate = True


def messages(text: str) -> list[str]:
    return [orjson.loads(line)["msg"] for line in text.splitlines()]


async def test_the_lines_of_one_turn_are_one_write_at_its_end(
    logged: tuple[logging.Logger, Stream, TurnHandler],
) -> None:
    logger, stream, _ = logged
    for n in range(3):
        logger.info("access %d", n)
    assert stream.writes == []
    await asyncio.sleep(0)
    assert [messages(w) for w in stream.writes] == [["access 0", "access 1", "access 2"]]
    logger.info("next turn")
    await asyncio.sleep(0)
    assert [messages(w) for w in stream.writes][1:] == [["next turn"]]


async def test_a_warning_goes_at_once_after_the_lines_before_it(
    logged: tuple[logging.Logger, Stream, TurnHandler],
) -> None:
    logger, stream, _ = logged
    logger.info("before")
    logger.error("confirm abandoned")
    assert [messages(w) for w in stream.writes] == [["before", "confirm abandoned"]]
    await asyncio.sleep(0)
    assert len(stream.writes) == 1  # nothing left to write twice


def test_off_the_loop_every_line_goes_at_once(logged: tuple[logging.Logger, Stream, TurnHandler]) -> None:
    logger, stream, _ = logged
    logger.info("a command's line")
    assert [messages(w) for w in stream.writes] == [["a command's line"]]


async def test_lines_pending_at_exit_are_written(logged: tuple[logging.Logger, Stream, TurnHandler]) -> None:
    logger, stream, handler = logged
    logger.info("last words")
    handler.flush()  # what logging.shutdown() does at exit
    assert [messages(w) for w in stream.writes] == [["last words"]]


def test_configured_logging_gathers_nothing_no_line_shows() -> None:
    """configure_logging turns off the caller's frame walk and the thread and process lookups (issue 25):
    a record then carries none of them, and the line is as before."""
    switches = (logging.logThreads, logging.logProcesses, logging.logMultiprocessing, logging._srcfile)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    records: list[logging.LogRecord] = []
    capture = logging.Handler()
    capture.emit = records.append  # type: ignore[method-assign,assignment]
    try:
        configure_logging("INFO")
        root.addHandler(capture)
        logging.getLogger("vidgate.test_log_writes").info("gathered %s", "nothing", extra={"route": "/x"})
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        logging.logThreads, logging.logProcesses, logging.logMultiprocessing, logging._srcfile = switches
    (record,) = records
    assert (record.lineno, record.funcName, record.thread, record.process) == (0, "(unknown function)", None, None)
    line = orjson.loads(JsonFormatter().format(record))
    assert (line["msg"], line["route"], line["level"]) == ("gathered nothing", "/x", "info")
