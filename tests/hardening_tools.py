"""Helpers for the hardening tests (tests/test_hardening_*.py); this module holds no tests.

- ``record(case, **figures)``: print a case's figures (see them with ``-s``) and append
  them to ``test-artifacts/hardening-figures.jsonl``; docs/HARDENING.md is filled from them.
- ``open_stream``: a raw SSE connection (tests/rawsse.py) with socket options, for
  clients that stall, reset or hang up half-way.
- ``Frames``: a fast frame splitter for streams that carry megabytes (the spec parser in
  tests/sse.py reads character by character; our server ends lines with LF only).
- ``start_servers``: several uvicorn servers on the test database, started side by side.
- PostgreSQL: ``other_backends``, ``terminate_backends`` (sparing the test process's own).
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from django.db import connection

from .conftest import ARTIFACTS
from .live import LiveServer, uvicorn_server
from .rawsse import RawStream

FIGURES = ARTIFACTS / "hardening-figures.jsonl"
HOST = "127.0.0.1"


def record(case: str, **figures) -> dict:
    """Print the figures of a case and keep them for docs/HARDENING.md."""
    row = {"case": case, "database": connection.vendor, **figures}
    print(f"\nHARDENING {case} [{connection.vendor}]: " + ", ".join(
        f"{k}={v}" for k, v in figures.items()
    ))  # fmt: skip
    FIGURES.parent.mkdir(parents=True, exist_ok=True)
    with FIGURES.open("a") as out:
        out.write(json.dumps(row) + "\n")
    return row


# -- raw connections -----------------------------------------------------------------


async def connect(port: int, *, rcvbuf: int | None = None, linger0: bool = False):
    """An asyncio (reader, writer) pair on a socket with the given options."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if linger0:  # close() sends RST instead of FIN: a client that vanishes
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_connect(sock, (HOST, port))
    except BaseException:
        sock.close()
        raise
    # A small reader limit: a client that stops reading stops the TCP window soon.
    limit = 4096 if rcvbuf is not None else 2**16
    return await asyncio.open_connection(sock=sock, limit=limit)


def request_bytes(port: int, path: str, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {HOST}:{port}", "Accept: text/event-stream"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin1")


async def open_stream(
    port: int,
    path: str,
    headers: dict[str, str] | None = None,
    *,
    rcvbuf: int | None = None,
    linger0: bool = False,
) -> RawStream:
    """Like ``RawStream.open``, with socket options."""
    reader, writer = await connect(port, rcvbuf=rcvbuf, linger0=linger0)
    writer.write(request_bytes(port, path, headers))
    stream = RawStream(reader, writer)
    try:
        status_line = await reader.readline()
        if not status_line:
            raise ConnectionResetError("closed before the status line")
        stream.status = int(status_line.split()[1])
        while True:
            line = (await reader.readline()).decode("latin1").strip()
            if not line:
                break
            key, _, value = line.partition(":")
            stream.headers[key.strip().lower()] = value.strip()
    except BaseException:
        writer.close()
        raise
    stream._chunked = stream.headers.get("transfer-encoding") == "chunked"
    return stream


async def open_many(
    port: int, paths: list[str], headers: list[dict] | None = None, *, batch: int = 100
) -> list[RawStream]:
    """Open streams in parallel batches; each has its first bytes (``retry:``) read."""
    streams: list[RawStream] = []
    for start in range(0, len(paths), batch):
        chunk = paths[start : start + batch]
        hdrs = (headers or [None] * len(paths))[start : start + batch]
        opened = await asyncio.gather(
            *[open_stream(port, p, h) for p, h in zip(chunk, hdrs, strict=True)]
        )
        streams.extend(opened)
        bad = [s.status for s in opened if s.status != 200]
        assert not bad, f"streams refused: {bad[:5]}"
        await asyncio.gather(*[s.until(lambda p: p.retry is not None) for s in opened])
    return streams


class Frames:
    """Split a stream into frames fast; keeps (id, event, data) of each event."""

    def __init__(self) -> None:
        self.buffer = b""
        self.events: list[tuple[str, str, bytes]] = []
        self.retry = False

    def feed(self, chunk: bytes) -> int:
        self.buffer += chunk
        *frames, self.buffer = self.buffer.split(b"\n\n")
        before = len(self.events)
        for frame in frames:
            event_id, kind, data = "", "message", []
            for line in frame.split(b"\n"):
                if line.startswith(b"id: "):
                    event_id = line[4:].decode()
                elif line.startswith(b"event: "):
                    kind = line[7:].decode()
                elif line.startswith(b"data: "):
                    data.append(line[6:])
                elif line.startswith(b"retry: "):
                    self.retry = True
            if data:
                self.events.append((event_id, kind, b"\n".join(data)))
        return len(self.events) - before

    @property
    def last_id(self) -> str | None:
        return self.events[-1][0] if self.events else None

    def ids(self, kind: str | None = None) -> list[int]:
        return [int(i) for i, k, _ in self.events if kind is None or k == kind]


async def pump(stream: RawStream, frames: Frames, until: Callable[[Frames], bool]) -> bool:
    """Read ``stream`` into ``frames`` until ``until(frames)``; False when the stream ends."""
    while not until(frames):
        chunk = await stream.read_chunk()
        if not chunk:
            return False
        frames.feed(chunk)
    return True


# -- servers ---------------------------------------------------------------------------


@pytest.fixture
def start_servers(django_db_blocker, log_dir):
    """``start_servers(n, **env)``: n uvicorn servers on the test database, started side
    by side (a server takes seconds to start on a busy machine); stopped after the test."""
    servers: list[LiveServer] = []

    def start(count: int, **env) -> list[LiveServer]:
        with django_db_blocker.unblock():
            made = [uvicorn_server(log_dir, **env) for _ in range(count)]
        servers.extend(made)
        with ThreadPoolExecutor(count) as pool:
            list(pool.map(lambda s: s.start(timeout=60), made))
        return made

    yield start
    for server in servers:
        server.stop()


def rss_kib(pid: int) -> int:
    """Resident memory of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def settle(
    read: Callable[[], dict], done: Callable[[dict], bool], timeout: float = 20.0
) -> dict:
    """Poll ``read()`` (a server's stats) until ``done(value)`` or the timeout; the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = await asyncio.to_thread(read)
        if done(value) or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.2)


# -- PostgreSQL ------------------------------------------------------------------------


def own_client_ports() -> list[int]:
    """Local ports of this (test) process's connections to the database server.

    They are spared when connections are terminated: pytest-django flushes through them,
    and Django keeps one per thread and per context (Playwright's greenlets too), so a
    backend pid noted at one moment does not cover them all. (TCP connections only.)
    """
    import psutil

    port = int(connection.settings_dict.get("PORT") or 5432)
    return sorted(
        c.laddr.port
        for c in psutil.Process().net_connections(kind="tcp")
        if c.raddr and c.raddr.port == port
    )


_NOT_OURS = (
    "datname = current_database() AND pid <> pg_backend_pid()"
    " AND NOT (coalesce(client_port, -1) = ANY(%s))"
)


def other_backends() -> int:
    """Connections to the test database that are not the test process's own."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT count(*) FROM pg_stat_activity WHERE {_NOT_OURS}",  # noqa: S608
            [own_client_ports()],
        )
        return cursor.fetchone()[0]


def terminate_backends() -> int:
    """End every connection to the test database except the test process's own."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE {_NOT_OURS}",  # noqa: S608
            [own_client_ports()],
        )
        return cursor.fetchone()[0]
