"""A minimal async SSE client on raw sockets, for tests that open thousands of streams."""

from __future__ import annotations

import asyncio

from .sse import EventStreamParser


class RawStream:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.status = 0
        self.headers: dict[str, str] = {}
        self.parser = EventStreamParser()
        self._chunked = False

    @classmethod
    async def open(
        cls, host: str, port: int, path: str, headers: dict[str, str] | None = None
    ) -> RawStream:
        reader, writer = await asyncio.open_connection(host, port)
        lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}", "Accept: text/event-stream"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        stream = cls(reader, writer)
        status_line = await reader.readline()
        stream.status = int(status_line.split()[1])
        while True:
            line = (await reader.readline()).decode("latin1").strip()
            if not line:
                break
            key, _, value = line.partition(":")
            stream.headers[key.strip().lower()] = value.strip()
        stream._chunked = stream.headers.get("transfer-encoding") == "chunked"
        return stream

    async def read_chunk(self) -> bytes:
        if not self._chunked:
            return await self.reader.read(65536)
        size_line = await self.reader.readline()
        if not size_line:
            return b""
        size = int(size_line.strip() or b"0", 16)
        if size == 0:
            await self.reader.readline()
            return b""
        data = await self.reader.readexactly(size)
        await self.reader.readexactly(2)
        return data

    async def until(self, predicate, timeout: float = 10.0):
        """Read until predicate(parser) is true; False if the stream ends first."""

        async def loop():
            while not predicate(self.parser):
                chunk = await self.read_chunk()
                if not chunk:
                    return False
                self.parser.feed(chunk)
            return True

        return await asyncio.wait_for(loop(), timeout)

    def close(self) -> None:
        self.writer.close()
