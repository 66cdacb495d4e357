"""A TCP proxy for tests that cut a server away and bring it back (the Toxiproxy shape).

`drop()` closes every proxied connection and stops listening, so new connections are refused, as
they are while a database restarts; `restore()` listens again on the same port.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.host = "127.0.0.1"
        self.port = 0
        self.connections = 0  # accepted since the start
        self.sent = 0  # chunks forwarded from clients to the server: about one per round trip
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def up(self) -> bool:
        return self._server is not None

    async def drop(self) -> None:
        """Refuse new connections and cut the established ones, as a server going away does."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            # An abortive close (RST), like a server process that is killed.
            writer.transport.abort()
        for pipe in list(self._pipes):
            pipe.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    async def restore(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._accept, self.host, self.port, reuse_address=True)

    async def close(self) -> None:
        await self.drop()

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        if self._server is None:
            client_writer.transport.abort()
            return
        self.connections += 1
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.transport.abort()
            return
        if self._server is None:  # dropped while this connection was being made
            client_writer.transport.abort()
            server_writer.transport.abort()
            return
        for writer in (client_writer, server_writer):
            self._writers.add(writer)
            with contextlib.suppress(OSError):
                writer.transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pipes = [
            asyncio.create_task(self._pipe(client_reader, server_writer, upstream=True)),
            asyncio.create_task(self._pipe(server_reader, client_writer, upstream=False)),
        ]
        self._pipes.update(pipes)
        try:
            await asyncio.gather(*pipes, return_exceptions=True)
        finally:
            self._pipes.difference_update(pipes)
            for writer in (client_writer, server_writer):
                self._writers.discard(writer)
                writer.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, upstream: bool) -> None:
        try:
            while data := await reader.read(65536):
                self.sent += upstream
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            # One side ended: end the other, so neither end waits on a half-open connection.
            writer.transport.abort()
