"""The load generator: raw asyncio sockets, thousands of SSE streams, open-loop publishing.

Everything here talks to 127.0.0.1 only, and every wait has a deadline.

Subscribers are ``asyncio.Protocol`` objects (no StreamReader, no HTTP client
library): one process on one core can hold 10,000+ streams and read 100,000+
events a second. Publishers stamp each event with ``~S<seq>:<monotonic ns>~``
inside its payload; CLOCK_MONOTONIC is the same clock in every process of the
machine, so a subscriber computes publish-to-receive latency from the frame
itself. The publisher is open loop: event ``n`` is due at ``t0 + n / rate``
and carries that due time, whether or not the server has answered the
previous publishes, so a slow server is not flattered (no coordinated omission).

Run as a helper process (several are needed for 20,000 streams: one process
may hold at most RLIMIT_NOFILE sockets)::

    python -m bench.load hold --port P --path /stream --count 10000 [--headers-file F]

prints one JSON line when its streams are open, keeps them until its stdin
closes (or ``--max-seconds``), then closes them and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import sys
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

HOST = "127.0.0.1"
MARK = re.compile(rb"~S(\d+):(\d+)~")
monotonic_ns = time.monotonic_ns


def marker(seq: int, t_ns: int, size: int = 0) -> str:
    """The stamp a subscriber looks for, padded with ``.`` to ``size`` characters."""
    text = f"~S{seq}:{t_ns}~"
    return text + "." * (size - len(text)) if size > len(text) else text


def stream_request(path: str, port: int, extra_headers: str = "") -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nAccept: text/event-stream\r\n"
        f"{extra_headers}\r\n"
    ).encode("latin1")


def post_request(path: str, port: int, body: bytes, extra_headers: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra_headers}\r\n"
    ).encode("latin1") + body


# -- subscribers ---------------------------------------------------------------

IDLE, LATENCY, COUNT = "idle", "latency", "count"


class Sub(asyncio.Protocol):
    """One SSE stream. Ready once the status line, the headers and the first body bytes are in."""

    __slots__ = (
        "closing", "count", "group", "head", "index", "pending", "ready", "seen", "status",
        "transport",
    )  # fmt: skip

    def __init__(self, group: Subscribers, index: int = 0):
        self.group = group
        self.index = index
        self.closing = False
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.status = 0
        self.ready: asyncio.Future = group.loop.create_future()
        self.pending = b""
        self.count = 0
        self.seen: bytearray | None = None

    def connection_made(self, transport):
        self.transport = transport
        transport.write(self.group.request_for(self))

    def data_received(self, data: bytes) -> None:
        if self.status == 0:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            line = self.head[: self.head.find(b"\r\n")]
            try:
                self.status = int(line.split()[1])
            except (IndexError, ValueError):
                self.status = -1
            data, self.head = self.head[end + 4 :], b""
            if self.status != 200:
                self._fail(f"HTTP {self.status}")
                return
            if not data:
                return
        if not self.ready.done():
            self.ready.set_result(monotonic_ns())
        group = self.group
        mode = group.mode
        if mode is IDLE:
            return
        buf = self.pending + data if self.pending else data
        end = buf.rfind(b"\n\n")
        if end < 0:
            self.pending = buf
            return
        self.pending = buf[end + 2 :]
        if mode is COUNT:
            n = buf.count(b"~S", 0, end)
            self.count += n
            group.delivered += n
            return
        now = monotonic_ns()
        seen = self.seen
        limit = len(seen)
        for match in MARK.finditer(buf, 0, end):
            seq = int(match[1])
            if seq >= limit:
                continue
            if seen[seq]:
                group.duplicates += 1
                continue
            seen[seq] = 1
            self.count += 1
            group.delivered += 1
            group.latencies.append(now - int(match[2]))

    def _fail(self, reason: str) -> None:
        if not self.closing:  # not a stream this client gave up on itself
            self.group.errors[reason] = self.group.errors.get(reason, 0) + 1
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(reason))
            self.ready.exception()  # retrieved: no "never retrieved" warning
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc):
        if self.ready.done():
            if not self.closing and self.ready.exception() is None:
                self.group.lost += 1  # the server ended a stream that was open
        else:
            reason = f"closed before ready ({exc.__class__.__name__ if exc else 'EOF'})"
            self._fail(reason)

    def close(self) -> None:
        self.closing = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


class Subscribers:
    """A group of streams to one server, sharing counters."""

    def __init__(
        self,
        port: int,
        path: str,
        headers: Sequence[str] = ("",),
        *,
        mode: str = IDLE,
        events: int = 0,
    ):
        self.loop = asyncio.get_running_loop()
        self.port = port
        self.requests = [stream_request(path, port, h) for h in headers]
        self.mode = mode
        self.subs: list[Sub] = []
        self.errors: dict[str, int] = {}
        self.lost = 0
        self.delivered = 0
        self.duplicates = 0
        self.latencies = array("q")
        self.events = events

    def request_for(self, sub: Sub) -> bytes:
        return self.requests[sub.index % len(self.requests)]

    async def connect(
        self, count: int, *, window: int = 500, timeout: float = 120.0, offset: int = 0
    ) -> dict:
        """Open ``count`` streams, at most ``window`` being set up at once.

        Returns ``{"seconds", "ok", "failed", "errors"}``: seconds until every
        stream that succeeded got its first body bytes.
        """
        slots = asyncio.Semaphore(window)
        deadline = self.loop.time() + timeout
        ok = failed = 0
        started = monotonic_ns()
        last_ready = started

        async def one(index: int) -> None:
            nonlocal ok, failed, last_ready
            async with slots:
                remaining = deadline - self.loop.time()
                if remaining <= 0:
                    failed += 1
                    self.errors["timeout"] = self.errors.get("timeout", 0) + 1
                    return
                sub = Sub(self, index + offset)
                if self.mode is LATENCY:
                    sub.seen = bytearray(self.events)
                try:
                    await asyncio.wait_for(
                        self.loop.create_connection(lambda: sub, HOST, self.port), remaining
                    )
                    self.subs.append(sub)
                    ready_at = await asyncio.wait_for(
                        asyncio.shield(sub.ready), deadline - self.loop.time()
                    )
                    ok += 1
                    last_ready = max(last_ready, ready_at)
                except (OSError, ConnectionError, TimeoutError) as exc:
                    failed += 1
                    key = (
                        exc.__class__.__name__ if not isinstance(exc, ConnectionError) else str(exc)
                    )
                    if isinstance(exc, OSError) and exc.errno is not None:
                        key = f"{exc.__class__.__name__} errno {exc.errno}"
                    self.errors[key] = self.errors.get(key, 0) + 1
                    sub.close()

        await asyncio.gather(*(one(i) for i in range(count)))
        return {
            "seconds": (last_ready - started) / 1e9,
            "ok": ok,
            "failed": failed,
            "errors": dict(self.errors),
        }

    @property
    def open_count(self) -> int:
        return sum(1 for s in self.subs if s.transport and not s.transport.is_closing())

    def losses(self, seqs: Sequence[int]) -> tuple[int, int]:
        """(subscribers that missed something, events missed in total) among ``seqs``."""
        missing_subs = missing = 0
        for sub in self.subs:
            if sub.seen is None or not sub.ready.done() or sub.ready.exception() is not None:
                continue
            seen = sub.seen
            lacking = sum(1 for seq in seqs if not seen[seq])
            if lacking:
                missing_subs += 1
                missing += lacking
        return missing_subs, missing

    def reset_counters(self) -> None:
        self.latencies = array("q")
        self.delivered = 0
        self.duplicates = 0

    def close(self) -> None:
        for sub in self.subs:
            sub.close()
        self.subs = []


# -- publishers ----------------------------------------------------------------


class HttpConn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; one request at a time."""

    def __init__(self):
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.waiter: asyncio.Future | None = None
        self.need: int | None = None
        self.status = 0
        self.broken = False

    def connection_made(self, transport):
        self.transport = transport

    def request(self, data: bytes) -> asyncio.Future:
        self.waiter = asyncio.get_running_loop().create_future()
        self.buf, self.need, self.status = b"", None, 0
        self.transport.write(data)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.need is None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].decode("latin1").lower()
            self.status = int(head.split(None, 2)[1])
            length = 0
            match = re.search(r"\r\ncontent-length:\s*(\d+)", head)
            if match:
                length = int(match[1])
            elif "transfer-encoding: chunked" in head:
                length = -1
            self.buf = self.buf[end + 4 :]
            self.need = length
        if self.need == -1:
            if not self.buf.endswith(b"0\r\n\r\n"):
                return
        elif len(self.buf) < self.need:
            return
        body, self.buf = self.buf, b""
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result((self.status, body))

    def connection_lost(self, exc):
        self.broken = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("publisher connection lost"))


class Pool:
    """Keep-alive connections for POSTs; a new one when all are busy (up to ``size``)."""

    def __init__(self, port: int, size: int = 64):
        self.port = port
        self.size = size
        self.idle: list[HttpConn] = []
        self.total = 0
        self.free = asyncio.Condition()

    async def _get(self) -> HttpConn:
        async with self.free:
            while True:
                while self.idle:
                    conn = self.idle.pop()
                    if not conn.broken:
                        return conn
                    self.total -= 1
                if self.total < self.size:
                    self.total += 1
                    break
                await self.free.wait()
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(HttpConn, HOST, self.port)
        except OSError:
            async with self.free:
                self.total -= 1
            raise
        return conn

    async def _put(self, conn: HttpConn) -> None:
        async with self.free:
            if conn.broken:
                self.total -= 1
            else:
                self.idle.append(conn)
            self.free.notify()

    async def post(self, data: bytes, timeout: float = 30.0) -> tuple[int, bytes]:
        conn = await self._get()
        try:
            return await asyncio.wait_for(conn.request(data), timeout)
        except BaseException:
            conn.broken = True
            if conn.transport is not None:
                conn.transport.close()
            raise
        finally:
            await self._put(conn)

    def close(self) -> None:
        for conn in self.idle:
            if conn.transport is not None:
                conn.transport.close()
        self.idle = []


@dataclass
class PublishStats:
    sent: int = 0
    ok: int = 0
    failed: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    # Seconds from an event's due time to the server's answer.
    answer_seconds: list[float] = field(default_factory=list)
    seconds: float = 0.0
    first_body: bytes = b""
    ok_seqs: list[int] = field(default_factory=list)

    def as_dict(self) -> dict:
        answers = sorted(self.answer_seconds)
        return {
            "sent": self.sent,
            "ok": self.ok,
            "failed": self.failed,
            "statuses": {str(k): v for k, v in self.statuses.items()},
            "seconds": round(self.seconds, 3),
            "answer_p50_ms": round(percentile(answers, 50) * 1e3, 2) if answers else None,
            "answer_p99_ms": round(percentile(answers, 99) * 1e3, 2) if answers else None,
        }


RequestFor = Callable[[int, int], tuple[int, bytes]]  # (seq, due ns) -> (port, raw request)


async def _post_one(
    pools: dict[int, Pool], stats: PublishStats, port: int, data: bytes, due: int, seq: int
):
    try:
        status, body = await pools[port].post(data)
    except (OSError, ConnectionError, TimeoutError) as exc:
        stats.failed += 1
        key = -1 if not isinstance(exc, TimeoutError) else -2
        stats.statuses[key] = stats.statuses.get(key, 0) + 1
        return
    stats.statuses[status] = stats.statuses.get(status, 0) + 1
    if 200 <= status < 300:
        stats.ok += 1
        stats.ok_seqs.append(seq)
        stats.answer_seconds.append((monotonic_ns() - due) / 1e9)
    else:
        stats.failed += 1
        if not stats.first_body:
            stats.first_body = body[:300]


async def publish_open_loop(
    request_for: RequestFor,
    ports: Sequence[int],
    rate: float,
    count: int,
    *,
    first: int = 0,
    pool_size: int = 64,
) -> PublishStats:
    """Publish events first..first+count-1, the i-th due at start + i / rate, stamped with it."""
    pools = {port: Pool(port, pool_size) for port in ports}
    stats = PublishStats()
    loop = asyncio.get_running_loop()
    tasks = []
    start = monotonic_ns()
    step = 1e9 / rate
    try:
        for i in range(count):
            seq = first + i
            due = start + int(i * step)
            delay = (due - monotonic_ns()) / 1e9
            if delay > 0:
                await asyncio.sleep(delay)
            port, data = request_for(seq, due)
            stats.sent += 1
            tasks.append(loop.create_task(_post_one(pools, stats, port, data, due, seq)))
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
    finally:
        for task in tasks:
            task.cancel()
        for pool in pools.values():
            pool.close()
    stats.seconds = (monotonic_ns() - start) / 1e9
    return stats


async def publish_closed_loop(
    request_for: RequestFor, ports: Sequence[int], seconds: float, *, concurrency: int = 8
) -> PublishStats:
    """As fast as the server answers: ``concurrency`` publishers back to back for ``seconds``."""
    pools = {port: Pool(port, concurrency) for port in ports}
    stats = PublishStats()
    seq = 0
    start = monotonic_ns()
    stop = start + int(seconds * 1e9)

    async def worker():
        nonlocal seq
        while monotonic_ns() < stop:
            n, seq = seq, seq + 1
            due = monotonic_ns()
            port, data = request_for(n, due)
            stats.sent += 1
            await _post_one(pools, stats, port, data, due, n)

    try:
        await asyncio.wait_for(
            asyncio.gather(*(worker() for _ in range(concurrency))), seconds + 60
        )
    finally:
        for pool in pools.values():
            pool.close()
    stats.seconds = (monotonic_ns() - start) / 1e9
    return stats


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, round(pct / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


# -- helper process: hold idle streams ----------------------------------------------


async def _hold(args) -> None:
    headers = [""]
    if args.headers_file:
        with open(args.headers_file) as f:
            headers = json.load(f)
        headers = headers[args.offset :] + headers[: args.offset]
    group = Subscribers(args.port, args.path, headers, mode=IDLE)
    result = await group.connect(args.count, window=args.window, timeout=args.timeout)
    result["open"] = group.open_count
    print(json.dumps(result), flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(reader.readline(), args.max_seconds)
    print(json.dumps({"open_at_end": group.open_count, "lost": group.lost}), flush=True)
    group.close()
    await asyncio.sleep(0.5)


def raise_nofile() -> int:
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover
        return asyncio.new_event_loop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.load")
    sub = parser.add_subparsers(dest="command", required=True)
    hold = sub.add_parser("hold", help="open idle streams and keep them until stdin closes")
    hold.add_argument("--port", type=int, required=True)
    hold.add_argument("--path", required=True)
    hold.add_argument("--count", type=int, required=True)
    hold.add_argument("--headers-file", default="")
    hold.add_argument("--offset", type=int, default=0)
    hold.add_argument("--window", type=int, default=500)
    hold.add_argument("--timeout", type=float, default=180.0)
    hold.add_argument("--max-seconds", type=float, default=300.0)
    hold.add_argument("--cpu", type=int, default=-1)
    args = parser.parse_args(argv)
    if args.cpu >= 0 and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.cpu})
    raise_nofile()
    loop = new_loop()
    try:
        loop.run_until_complete(_hold(args))
    finally:
        loop.close()


if __name__ == "__main__":
    main()
