"""Where rehosted outputs live: a local directory (the default) or an S3-compatible bucket, both through
obstore, both streamed in and out in chunks.

Atomic writes: obstore's local store writes to a staging file beside the target and renames it when
complete, and an S3 object (single PUT or multipart upload) only appears once its upload completes, so
a reader never sees half a file; an interrupted upload leaves no object under the key."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import obstore
from obstore.exceptions import NotFoundError
from obstore.store import LocalStore, S3Store

from app.core.settings import DEFAULT_OUTPUTS_DIR, Settings

if TYPE_CHECKING:
    from obstore import GetOptions
    from obstore.store import ObjectStore

# Parts of a streamed upload. S3 needs at least 5 MiB per part; two in flight bound memory per copy.
PART_BYTES = 8 * 1024 * 1024
PARTS_IN_FLIGHT = 2
READ_CHUNK = 256 * 1024


@dataclass(frozen=True)
class OutputStore:
    store: ObjectStore
    description: str  # for logs: never carries credentials

    async def put(self, key: str, chunks: AsyncIterable[bytes]) -> None:
        await obstore.put_async(
            self.store, key, chunks, chunk_size=PART_BYTES, max_concurrency=PARTS_IN_FLIGHT, use_multipart=None
        )

    async def read(self, key: str, start: int, end: int) -> AsyncIterator[bytes]:
        """Bytes [start, end) of the object, in chunks."""
        options: GetOptions = {"range": (start, end)}
        result = await obstore.get_async(self.store, key, options=options)
        async for chunk in result.stream(min_chunk_size=READ_CHUNK):
            yield bytes(chunk)

    async def delete(self, key: str) -> None:
        try:
            await obstore.delete_async(self.store, key)
        except (NotFoundError, FileNotFoundError):
            return  # already gone: deleting is idempotent


def _s3(location: str, endpoint_url: str | None) -> S3Store:
    bucket, _, prefix = location.removeprefix("s3://").partition("/")
    # Credentials and region come from the usual AWS_* variables, which obstore reads itself.
    config: dict[str, Any] = {}
    client_options: dict[str, Any] = {}
    if endpoint_url:
        config.update(endpoint=endpoint_url, virtual_hosted_style_request=False)
        if endpoint_url.startswith("http://"):
            client_options["allow_http"] = True
    return S3Store(bucket, prefix=prefix.strip("/") or None, config=config, client_options=client_options)  # type: ignore[arg-type]


@lru_cache(maxsize=8)
def _open(location: str, endpoint_url: str | None) -> OutputStore:
    if location.startswith("s3://"):
        return OutputStore(_s3(location, endpoint_url), location)
    directory = Path(location.removeprefix("file://")) if location else DEFAULT_OUTPUTS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    return OutputStore(LocalStore(directory, mkdir=True), str(directory))


def open_store(settings: Settings) -> OutputStore:
    """The store VIDGATE_OUTPUTS_STORE names (one per process and location)."""
    return _open(settings.outputs_store, settings.outputs_s3_endpoint_url)
