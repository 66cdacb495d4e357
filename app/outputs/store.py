"""Where rehosted outputs live: a local directory (the default) or an S3-compatible bucket. Both are
streamed in and out in chunks; neither ever holds a whole file.

Atomic writes: the local store writes a staging file beside the target, fsyncs it, renames it over
the target and fsyncs the directory (so the rename is on disk before the file is recorded as stored);
an S3 object (single PUT or multipart upload, by obstore) only appears once its upload completes. A
reader never sees half a file, and an interrupted copy leaves nothing under the key.

The local store is plain Python file I/O in threads rather than obstore's local store: obstore runs a
Tokio runtime whose threads can abort the interpreter at exit (SIGABRT after the work is done), and
the default configuration should not carry that."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import secrets
from collections.abc import AsyncIterable, AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol, TypeVar

from app.core.settings import Settings

if TYPE_CHECKING:
    from obstore import GetOptions
    from obstore.store import ObjectStore

READ_CHUNK = 256 * 1024
WRITE_BYTES = 1024 * 1024  # local writes are gathered to this size: one thread hop per MiB
# Parts of a streamed S3 upload: at least 5 MiB each (S3's minimum); two in flight bound memory per copy.
PART_BYTES = 8 * 1024 * 1024
PARTS_IN_FLIGHT = 2
STAGING_SUFFIX = ".partial"
# Writes and fsyncs run in threads of their own: a slow disk then holds up other copies at most,
# never the default executor that the rest of the process (DNS, serving reads) shares.
WRITER_THREADS = 8

T = TypeVar("T")


@functools.cache
def _writers() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(WRITER_THREADS, thread_name_prefix="vidgate-store")


async def _off_loop(fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.get_running_loop().run_in_executor(_writers(), functools.partial(fn, *args))


class OutputStore(Protocol):
    description: str  # for logs: never carries credentials

    async def put(self, key: str, chunks: AsyncIterable[bytes]) -> None: ...

    def read(self, key: str, start: int, end: int) -> AsyncIterator[bytes]:
        """Bytes [start, end) of the object, in chunks."""
        ...

    async def delete(self, key: str) -> None:
        """Idempotent: deleting what is gone is fine."""
        ...


def _fsync_dir(path: Path) -> None:
    """A rename or a new entry is durable only once its directory is synced (POSIX; Windows has no
    directory handles to sync)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_staging(target: Path, staging: Path) -> IO[bytes]:
    if not target.parent.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        _fsync_dir(target.parent.parent)  # the new directory's entry (one per prediction)
    # A copy killed half way left its staging file: the new holder of the job clears it.
    for stale in target.parent.glob(f".{target.name}.*{STAGING_SUFFIX}"):
        stale.unlink(missing_ok=True)
    return staging.open("wb")


def _finish(handle: IO[bytes] | None, rest: bytes | bytearray, staging: Path, target: Path) -> None:
    """The last bytes, the fsync and the rename in one hop to a thread; an output that fit in one write
    buffer is opened here too, so it costs that one hop (each hop waits for a thread and then for the
    event loop again, which in a burst of small copies is most of a copy's time)."""
    if handle is None:
        handle = _open_staging(target, staging)
    try:
        _commit(handle, rest, staging, target)
    except BaseException:
        handle.close()
        raise


def _commit(handle: IO[bytes], rest: bytes | bytearray, staging: Path, target: Path) -> None:
    if rest:
        handle.write(rest)
    handle.flush()
    os.fsync(handle.fileno())
    handle.close()
    os.replace(staging, target)
    # Recorded as stored once this returns: without it a power loss could lose the rename.
    _fsync_dir(target.parent)


class LocalStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.description = str(root)

    def _path(self, key: str) -> Path:
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"not a store key: {key!r}")
        return self.root / key

    async def put(self, key: str, chunks: AsyncIterable[bytes]) -> None:
        target = self._path(key)
        staging = target.with_name(f".{target.name}.{secrets.token_hex(6)}{STAGING_SUFFIX}")
        handle: IO[bytes] | None = None  # opened with the first full buffer, or by _finish
        try:
            buffer = bytearray()
            async for chunk in chunks:
                buffer += chunk
                if len(buffer) >= WRITE_BYTES:
                    if handle is None:
                        handle = await _off_loop(_open_staging, target, staging)
                    await _off_loop(handle.write, buffer)
                    buffer = bytearray()
            await _off_loop(_finish, handle, buffer, staging, target)
        except BaseException:
            if handle is not None:
                handle.close()
            staging.unlink(missing_ok=True)
            raise

    async def read(self, key: str, start: int, end: int) -> AsyncIterator[bytes]:
        handle = await asyncio.to_thread(self._path(key).open, "rb")
        try:
            await asyncio.to_thread(handle.seek, start)
            remaining = end - start
            while remaining > 0:
                chunk = await asyncio.to_thread(handle.read, min(READ_CHUNK, remaining))
                if not chunk:
                    return
                remaining -= len(chunk)
                yield chunk
        finally:
            handle.close()

    async def delete(self, key: str) -> None:
        path = self._path(key)
        await asyncio.to_thread(path.unlink, missing_ok=True)
        with contextlib.suppress(OSError):  # not empty (another output of it) or already gone
            await asyncio.to_thread(path.parent.rmdir)


class S3Store:
    """Any S3-compatible bucket through obstore (no S3 signing of our own)."""

    def __init__(self, location: str, endpoint_url: str | None) -> None:
        from obstore.store import S3Store as ObstoreS3

        bucket, _, prefix = location.removeprefix("s3://").partition("/")
        # Credentials and region come from the usual AWS_* variables, which obstore reads itself.
        config: dict[str, Any] = {}
        client_options: dict[str, Any] = {}
        if endpoint_url:
            config.update(endpoint=endpoint_url, virtual_hosted_style_request=False)
            if endpoint_url.startswith("http://"):
                client_options["allow_http"] = True
        self.store: ObjectStore = ObstoreS3(
            bucket,
            prefix=prefix.strip("/") or None,
            config=config,  # type: ignore[arg-type]
            client_options=client_options,  # type: ignore[arg-type]
        )
        self.description = location

    async def put(self, key: str, chunks: AsyncIterable[bytes]) -> None:
        import obstore

        await obstore.put_async(self.store, key, chunks, chunk_size=PART_BYTES, max_concurrency=PARTS_IN_FLIGHT)

    async def read(self, key: str, start: int, end: int) -> AsyncIterator[bytes]:
        import obstore

        options: GetOptions = {"range": (start, end)}
        result = await obstore.get_async(self.store, key, options=options)
        async for chunk in result.stream(min_chunk_size=READ_CHUNK):
            yield bytes(chunk)

    async def delete(self, key: str) -> None:
        import obstore
        from obstore.exceptions import NotFoundError

        with contextlib.suppress(NotFoundError):
            await obstore.delete_async(self.store, key)


@lru_cache(maxsize=8)
def _open(location: str, endpoint_url: str | None, data_dir: Path) -> OutputStore:
    if location.startswith("s3://"):
        return S3Store(location, endpoint_url)
    return LocalStore(Path(location.removeprefix("file://")) if location else data_dir / "outputs")


def open_store(settings: Settings) -> OutputStore:
    """The store VIDGATE_OUTPUTS_STORE names (one per process and location)."""
    return _open(settings.outputs_store, settings.outputs_s3_endpoint_url, settings.data_dir)
