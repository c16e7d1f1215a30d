"""The event-stream response and the checks every stream view makes first."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterable, Awaitable, Callable
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse

from ssechat.api import json_error

from .hub import get_hub
from .stream import END, PENDING
from .wire import encode_retry

logger = logging.getLogger("ssechat.streams")

CONTENT_TYPE = "text/event-stream; charset=utf-8"


def accepts_event_stream(request: HttpRequest) -> bool:
    """False only when an ``Accept`` header is present and admits no event stream."""
    header = request.META.get("HTTP_ACCEPT", "").strip()
    if not header:
        return True
    for media_range in header.split(","):
        media_type, *params = (part.strip() for part in media_range.split(";"))
        if media_type.lower() not in ("text/event-stream", "text/*", "*/*"):
            continue
        quality = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if quality > 0:
            return True
    return False


class EventStreamResponse(StreamingHttpResponse):
    """``text/event-stream`` over an async iterable of frames.

    Items are ``bytes`` or objects with a ``frame`` attribute (``StoredEvent``,
    ``Reset``, ``Keepalive``, ...); empty frames are skipped. The ``retry:`` line
    goes out first, before any event exists, so the client knows at once that
    the stream is open.
    """

    def __init__(
        self,
        source: AsyncIterable[Any],
        *,
        retry_ms: int | None = None,
        label: str = "",
        user_id: int | None = None,
        stream: Any = None,
        status: int = 200,
        headers: dict[str, str] | None = None,
    ):
        self.source = source
        # The EventStream behind ``source`` when a view wraps it: released here for sure.
        self.stream = stream if stream is not None else source
        self.retry_ms = settings.SSECHAT_RETRY_MS if retry_ms is None else retry_ms
        self.label = label
        self.user_id = user_id
        # Not a method of this response: an open stream keeps only its frames.
        self.frames = Frames(self.source, self.stream, self.retry_ms, label, user_id)
        super().__init__(self.frames, content_type=CONTENT_TYPE, status=status, headers=headers)
        self["Cache-Control"] = "no-cache"
        self["X-Accel-Buffering"] = "no"

    def start_message(self) -> dict:
        """The ASGI ``http.response.start`` message for this response."""
        headers = [(k.encode("ascii"), v.encode("latin1")) for k, v in self.items()]
        for cookie in self.cookies.values():
            headers.append((b"Set-Cookie", cookie.output(header="").encode("ascii").strip()))
        return {"type": "http.response.start", "status": self.status_code, "headers": headers}

    async def aclose(self) -> None:
        """Close the frames without sending ``request_finished`` (already sent)."""
        await self.frames.aclose()


async def _ended() -> None:
    return None


def _frame_of(item: Any) -> bytes:
    return item if item.__class__ is bytes else item.frame


class Frames:
    """The body of an event stream: the ``retry:`` line, then the source's frames.

    It is an async iterator of ``bytes`` (what Django's StreamingHttpResponse and
    its test client read), and it has a leaner interface for the ASGI handler:
    ``pull()`` joins every frame that is ready now into one chunk (one write to
    the client however many events were waiting), ``wait()`` is what to await
    when nothing is. A source with ``poll()``/``wait()`` (an EventStream, the
    notification feed) is read through those, with no async generator per
    layer; any other async iterable is read item by item.
    """

    # No bound methods are kept (of the source's or its own): each would be one more
    # object per open stream for the garbage collector to walk.
    __slots__ = (
        "_armable",
        "_iterator",
        "_pending",
        "_polled",
        "count",
        "ended",
        "error",
        "label",
        "retry_ms",
        "source",
        "started",
        "stream",
        "user_id",
    )

    def __init__(self, source: Any, stream: Any, retry_ms: int, label: str, user_id: Any):
        self.source = source
        self.stream = stream
        self.retry_ms = retry_ms
        self.label = label
        self.user_id = user_id
        self.started = 0.0  # monotonic time of the first read; 0: not started
        self.count = 0
        self.ended = False
        self.error: str | None = None
        self._polled = hasattr(source, "poll")  # read through poll()/wait()
        self._armable = self._polled and hasattr(source, "arm")
        self._iterator = None
        self._pending: list[bytes] | None = None  # read by _next(), not yet pulled

    def _start(self) -> bytes:
        self.started = time.monotonic()
        # Logged here, not in a generator: logging materialises its caller's frame object,
        # which a suspended generator would keep for the stream's life.
        logger.info("stream open %s user=%s", self.label, self.user_id)
        return encode_retry(self.retry_ms)

    def pull(self) -> bytes | None:
        """Every frame ready now, joined (``b""``: none yet, await ``wait()``; None: the end)."""
        if not self.started:
            return self._start()
        chunks = self._pending
        if chunks is not None:
            self._pending = None
        source = self.source
        if self._polled and source is not None:
            poll = source.poll
            try:
                while True:
                    item = poll()
                    if item is PENDING:
                        break
                    if item is END:
                        self.ended = True
                        break
                    frame = item if item.__class__ is bytes else item.frame
                    if frame:
                        self.count += 1
                        if chunks is None:
                            chunks = [frame]
                        else:
                            chunks.append(frame)
            except BaseException as exc:
                self.error = repr(exc)
                raise
        if chunks is None:
            return None if self.ended else b""
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def arm(self, waker: Any) -> bool:
        """If nothing is ready, have the source's next item call ``waker.set_result(None)``
        (see EventStream.arm). False: pull, or await ``wait()``."""
        source = self.source
        if not self._armable or self._pending is not None or self.ended or source is None:
            return False
        return source.arm(waker)

    def wait(self) -> Awaitable[Any]:
        """What to await before pulling again (done at once if something is ready)."""
        source = self.source
        if source is None:
            return _ended()
        return source.wait() if self._polled else self._next()

    async def _next(self) -> None:
        """Read one item of a source without ``poll()`` (its ``wait``)."""
        if self._pending is not None or self.ended:
            return
        if self._iterator is None:
            self._iterator = aiter(self.source)
        try:
            item = await anext(self._iterator)
        except StopAsyncIteration:
            self.ended = True
            return
        except BaseException as exc:
            if exc.__class__ is not asyncio.CancelledError:
                self.error = repr(exc)
            raise
        frame = _frame_of(item)
        if frame:
            self.count += 1
            self._pending = [frame]

    def __aiter__(self) -> Frames:
        return self

    async def __anext__(self) -> bytes:
        while True:
            chunk = self.pull()
            if chunk is None:
                raise StopAsyncIteration
            if chunk:
                return chunk
            try:
                await self.wait()
            except BaseException as exc:
                if self.error is None and exc.__class__ is not asyncio.CancelledError:
                    self.error = repr(exc)
                raise

    async def aclose(self) -> None:
        """Release the source and its stream, and log how the stream ended. Idempotent."""
        source, stream, self.source, self.stream = self.source, self.stream, None, None
        if source is None:
            return
        try:
            iterator, self._iterator = self._iterator, None
            if iterator is not None and iterator is not source:
                closer = getattr(iterator, "aclose", None)
                if closer is not None:
                    await closer()
            closer = getattr(source, "aclose", None)
            if closer is not None:
                await closer()
        finally:
            release = getattr(stream, "close", None)
            if release is not None:
                release()
            reason = "ended" if self.ended else (self.error or "client gone")
            connection = getattr(stream, "connection", None)
            if connection is not None and connection.close_reason:
                reason = connection.close_reason
            if self.started:
                logger.info(
                    "stream closed %s user=%s after %.1fs, %d frame(s), %s",
                    self.label, self.user_id, time.monotonic() - self.started, self.count, reason,
                )  # fmt: skip


View = Callable[..., Awaitable[HttpResponse]]


def event_stream_view(
    view: View | None = None, *, login_required: bool = True
) -> View | Callable[[View], View]:
    """Decorate an async view returning an :class:`EventStreamResponse`.

    Answers 405 for methods other than GET, 401 JSON to an anonymous client
    (never a redirect), 406 when ``Accept`` admits no event stream, and 429
    when the user already has ``SSECHAT_MAX_STREAMS_PER_USER`` streams open here.
    """

    def decorator(view: View) -> View:
        @functools.wraps(view)
        async def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            if request.method != "GET":
                response = json_error(405, "method_not_allowed", "Streams are read with GET.")
                response["Allow"] = "GET"
                return response
            if login_required:
                request.user = user = await request.auser()
                if not user.is_authenticated:
                    return json_error(401, "not_authenticated", "Log in or send a Bearer token.")
            if not accepts_event_stream(request):
                return json_error(406, "not_acceptable", "This URL serves text/event-stream only.")
            if login_required:
                limit = settings.SSECHAT_MAX_STREAMS_PER_USER
                if limit > 0 and get_hub().open_count(user.pk) >= limit:
                    return json_error(
                        429, "too_many_streams",
                        f"You already have {limit} streams open; close one first.",
                    )  # fmt: skip
            return await view(request, *args, **kwargs)

        wrapper.event_stream = True  # type: ignore[attr-defined]
        return wrapper

    if view is not None:
        return decorator(view)
    return decorator
