"""The event-stream response and the checks every stream view makes first."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse

from ssechat.api import json_error

from .hub import get_hub
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
        # A free generator, not a method: an open stream keeps only it, not this response.
        self.frames = _frames(self.source, self.stream, self.retry_ms, label, user_id)
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


async def _frames(source, stream, retry_ms: int, label: str, user_id) -> AsyncIterator[bytes]:
    started = time.monotonic()
    logger.info("stream open %s user=%s", label, user_id)
    frames = 0
    reason = "ended"
    try:
        yield encode_retry(retry_ms)
        async for item in source:
            frame = item if item.__class__ is bytes else item.frame
            if frame:
                frames += 1
                yield frame
    except BaseException as exc:
        reason = (
            "client gone"
            if exc.__class__.__name__ in {"CancelledError", "GeneratorExit"}
            else repr(exc)
        )
        raise
    finally:
        closer = getattr(source, "aclose", None)
        if closer is not None:
            await closer()
        release = getattr(stream, "close", None)
        if release is not None:
            release()
        connection = getattr(stream, "connection", None)
        if connection is not None and connection.close_reason:
            reason = connection.close_reason
        logger.info(
                "stream closed %s user=%s after %.1fs, %d frame(s), %s",
                label, user_id, time.monotonic() - started, frames, reason,
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
