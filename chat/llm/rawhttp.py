"""A lean HTTP/1.1 client for one streamed POST to a model server on plain ``http://``.

Reading a streamed answer through httpx costs about 150 µs of CPU per network
read on a small VM (h11's event per HTTP chunk, httpcore's and anyio's layers,
a cancel scope per read), and a local model writes every few milliseconds: with
100 answers at once that alone is more than a core. This client is an
``asyncio.Protocol`` that feeds each read to httptools' C parser (llhttp, as
uvicorn uses), which de-chunks the body, and splits its lines per read: the
reading task wakes once per read and gets every line that read completed. Its
errors are httpx's exception classes, so callers map them exactly as they map
httpx's own.

It is used only where it can stand in for httpx without a difference a user
would see: plain ``http://`` (no TLS, so nothing is lost by not pooling
connections: a local server), no proxy from the environment, no custom
transport. Each request has its own connection (``Connection: close``).
"""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.request
from collections.abc import AsyncIterator, Callable
from typing import Any

import httptools
import httpx

from .base import next_take

MAX_HEAD = 64 * 1024  # bytes of status line and headers
HIGH_WATER = 4 * 1024 * 1024  # body bytes buffered before reading pauses
# The reading task is woken at most once per this interval while the body streams:
# a model writing every few milliseconds then costs one wake-up (and one parse of
# its lines) per interval, not per network read. The answer's chunks are stored
# every SSECHAT_CHAT_FLUSH_MS (25 ms) anyway; the end and errors wake it at once.
READ_INTERVAL = 0.01
# With base.next_take set (an answer's generation), the task is woken this long
# before the text's next flush tick instead: what came since the last wake-up makes
# that tick, in one wake-up a tick. A timer due earlier fires first, so the reading
# task runs before the tick even when the loop is late.
TAKE_LEAD = 0.001


def usable(url: str) -> bool:
    """True when :func:`post_stream` may be used for ``url`` instead of httpx."""
    try:
        parsed = httpx.URL(url)
    except Exception:
        return False
    if parsed.scheme != "http" or not parsed.host:
        return False
    proxies = urllib.request.getproxies()
    if proxies.get("http") or proxies.get("all"):
        return bool(urllib.request.proxy_bypass(parsed.host))
    return True


class _Protocol(asyncio.Protocol):
    """Feeds one response to httptools' parser; the body's bytes go to ``chunks``."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, take_at: Callable[[], float] | None = None
    ) -> None:
        self.loop = loop
        self.take_at = take_at  # see base.next_take
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.head: asyncio.Future = loop.create_future()
        self.head_size = 0
        self.reason = b""
        self.header_list: list[tuple[bytes, bytes]] = []
        self.until_close = False  # the body ends where the connection does
        self.chunks: list[bytes] = []
        self.size = 0
        self.waiter: asyncio.Future | None = None
        self.error: Exception | None = None
        self.finished = False  # the body ended as its framing says
        self.closed = False
        self.last_data = loop.time()
        self.paused = False
        self.woken_at = -1.0  # loop time of the last wake-up of the reading task
        self.wake_handle: asyncio.TimerHandle | None = None

    # -- asyncio callbacks ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.last_data = self.loop.time()
        if self.finished:
            return  # whatever follows the response is not ours
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._abort(httpx.RemoteProtocolError("The server switched protocols."))
            return
        except httptools.HttpParserError as exc:
            if not self.finished:  # data after the response's end is ignored
                self._abort(httpx.RemoteProtocolError(f"Invalid HTTP response: {exc}"))
                return
        if not self.head.done():
            self.head_size += len(data)
            if self.head_size > MAX_HEAD:
                self._abort(httpx.RemoteProtocolError("The response head is too long."))
                return
        if self.finished or not self.head.done():
            self._wake()
        elif self.wake_handle is None:
            due = self.woken_at + READ_INTERVAL
            if self.take_at is not None:
                take = self.take_at() - TAKE_LEAD
                if take > self.last_data:  # else the tick is due or running: as usual
                    due = take
            if self.last_data >= due:
                self._wake()
            else:
                self.wake_handle = self.loop.call_at(due, self._wake_later)
        if self.size > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool | None:
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.head.done():
            error: Exception = httpx.RemoteProtocolError(
                "Server disconnected without sending a response."
            )
            if exc is not None:
                error = httpx.ReadError(str(exc) or "connection lost")
            self.head.set_exception(error)
            return
        # httptools has no call for the end of the input (llhttp_finish), and
        # should_keep_alive() is False for any response with "Connection: close": so a
        # body delimited by the close (per its headers) is complete here, any other cut.
        if self.until_close:
            self.finished = True
        elif not self.finished and self.error is None:
            self.error = httpx.RemoteProtocolError(
                "peer closed connection without sending complete message body"
            )
        self._wake()

    # -- httptools callbacks --------------------------------------------------------

    def on_status(self, status: bytes) -> None:
        self.reason += status  # may come in pieces

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.head.done():  # not a trailer
            self.header_list.append((name, value))

    def on_headers_complete(self) -> None:
        if self.head.done():
            return
        status = self.parser.get_status_code()
        if status < 200:  # an interim response: the real one follows
            self.reason, self.header_list = b"", []
            return
        headers = httpx.Headers(self.header_list)
        # Framing as llhttp reads it: chunked if that is the last transfer coding,
        # else to the close if there is a transfer coding or no Content-Length.
        encoding = headers.get("transfer-encoding")
        if encoding is not None:
            self.until_close = encoding.rsplit(",", 1)[-1].strip().lower() != "chunked"
        else:
            self.until_close = "content-length" not in headers
        reason = self.reason.decode("ascii", errors="ignore").strip()
        self.head.set_result((status, headers, reason))

    def on_body(self, body: bytes) -> None:
        if not self.finished:
            self.chunks.append(body)
            self.size += len(body)

    def on_message_complete(self) -> None:
        if self.head.done():  # not the end of an interim response
            self.finished = True

    # -- errors and wake-ups ----------------------------------------------------------

    def _abort(self, exc: Exception) -> None:
        if not self.head.done():
            self.head.set_exception(exc)
        elif self.error is None:
            self.error = exc
        self._wake()
        if self.transport is not None:
            self.transport.close()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
            self.woken_at = self.loop.time()

    def _wake_later(self) -> None:
        self.wake_handle = None
        self._wake()

    # -- the reading side ---------------------------------------------------------

    def take(self) -> bytes:
        data = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
        self.chunks.clear()
        self.size = 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return data


def _expire(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


class RawResponse:
    """The part of ``httpx.Response`` the backends use, over :class:`_Protocol`."""

    def __init__(
        self,
        protocol: _Protocol,
        status: int,
        headers: httpx.Headers,
        reason: str,
        read_timeout: float | None,
    ) -> None:
        self._protocol = protocol
        self.status_code = status
        self.headers = headers
        self.reason_phrase = reason or httpx.codes.get_reason_phrase(status)
        self._read_timeout = read_timeout
        charset = httpx.Response(status, headers=headers).charset_encoding
        self.encoding = charset if charset and _known(charset) else "utf-8"

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        """The body, de-chunked, in whatever pieces have arrived at each wake-up."""
        protocol = self._protocol
        loop = protocol.loop
        timeout = self._read_timeout
        while True:
            if protocol.chunks:
                yield protocol.take()
                continue
            if protocol.error is not None:
                raise protocol.error
            if protocol.finished or protocol.closed:
                return
            # One timer per wait (a wait is a network read or more), re-armed only
            # when it fires early: data came meanwhile, so silence restarts there.
            protocol.waiter = waiter = loop.create_future()
            handle = None
            if timeout is not None:
                handle = loop.call_at(protocol.last_data + timeout, _expire, waiter)
            try:
                await waiter
            finally:
                protocol.waiter = None
                if handle is not None:
                    handle.cancel()
            if (
                timeout is not None
                and not protocol.chunks
                and not (protocol.finished or protocol.closed or protocol.error)
                and loop.time() - protocol.last_data >= timeout
            ):
                raise httpx.ReadTimeout("The read operation timed out")

    def close(self) -> None:
        transport = self._protocol.transport
        if transport is not None and not transport.is_closing():
            transport.close()


def _known(encoding: str) -> bool:
    import codecs

    try:
        codecs.lookup(encoding)
    except LookupError:
        return False
    return True


class PostStream:
    """``async with post_stream(...) as response``: POST ``payload`` as JSON to ``url``
    and hand back the response once its head has arrived (the body is streamed)."""

    def __init__(
        self,
        url: str,
        payload: Any,
        headers: dict[str, str],
        *,
        connect_timeout: float | None,
        read_timeout: float | None,
    ) -> None:
        self.url = httpx.URL(url)
        self.payload = payload
        self.headers = headers
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.response: RawResponse | None = None
        self.transport: asyncio.Transport | None = None

    async def __aenter__(self) -> RawResponse:
        loop = asyncio.get_running_loop()
        url = self.url
        host, port = url.host, url.port or 80
        protocol = _Protocol(loop, next_take.get())
        try:
            async with asyncio.timeout(self.connect_timeout):
                transport, _ = await loop.create_connection(lambda: protocol, host, port)
        except TimeoutError:
            raise httpx.ConnectTimeout("timed out") from None
        except (OSError, socket.gaierror) as exc:
            raise httpx.ConnectError(str(exc) or type(exc).__name__) from exc
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        body = json.dumps(self.payload).encode()
        target = url.raw_path.decode("ascii")
        authority = host if port == 80 else f"{host}:{port}"
        if ":" in host:  # IPv6 literal
            authority = f"[{host}]" if port == 80 else f"[{host}]:{port}"
        lines = [
            f"POST {target} HTTP/1.1",
            f"Host: {authority}",
            "Accept: */*",
            "Accept-Encoding: identity",
            "Connection: close",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
        ]
        lines += [f"{name}: {value}" for name, value in self.headers.items()]
        transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        try:
            if self.read_timeout is None:
                status, headers, reason = await protocol.head
            else:
                try:
                    async with asyncio.timeout(self.read_timeout):
                        status, headers, reason = await protocol.head
                except TimeoutError:
                    raise httpx.ReadTimeout("The read operation timed out") from None
        except BaseException:
            transport.close()
            raise
        self.response = RawResponse(protocol, status, headers, reason, self.read_timeout)
        return self.response

    async def __aexit__(self, *exc_info: object) -> None:
        if self.transport is not None:
            self.transport.close()


post_stream = PostStream
