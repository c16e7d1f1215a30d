"""The live feed: ``GET /api/notifications/stream/?topics=a,b&format=json|html``.

One EventStream over the user's channel and the broadcast channel. A client gets:

- ``notification``: the Notification JSON (``"read": false``), or with
  ``format=html`` a rendered ``<li>`` fragment for htmx's ``sse-swap``. The
  fragment is rendered once per event per process, whoever receives it.
- ``unread`` ``{"count": n}``: when the backlog is sent (id = the stream's
  position), after every notification that reaches the user (own or
  broadcast, whatever ``topics`` says), and when the user's read state changed
  in another tab or process.

How the count stays exact without a query per notification: at each sync
point (going live, a stored ``unread``/``recount`` event) the feed counts in
the database the unread rows whose latest event id is at or below the event
it is at; every later ``notification`` event adds one. Rows published later
are not in that count, and they arrive as events.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable
from datetime import datetime
from typing import Any

from django.http import HttpRequest, HttpResponse
from django.template.loader import render_to_string

from ssechat.api import json_error
from ssechat.streams.db import run_db
from ssechat.streams.hub import StoredEvent
from ssechat.streams.response import EventStreamResponse, event_stream_view
from ssechat.streams.stream import (
    LIVE,
    PENDING,
    READY,
    EventStream,
    iterate_polled,
    resume_id,
)
from ssechat.streams.wire import encode_event, encode_json_event

from .models import is_valid_topic
from .presenters import fragment_context
from .services import BROADCAST_CHANNEL, count_for, feed_prefetch, user_channel

logger = logging.getLogger("notifications")

FORMATS = ("json", "html")
MAX_TOPICS = 50
FRAGMENT_TEMPLATE = "notifications/_item.html"


class BadParam(ValueError):
    def __init__(self, field: str, detail: str):
        super().__init__(detail)
        self.field = field
        self.detail = detail


def parse_topics(raw: str | None) -> frozenset[str] | None:
    """``a,b`` -> {"a", "b"}; None or empty: every topic."""
    if raw is None or not raw.strip():
        return None
    names = [name.strip() for name in raw.split(",") if name.strip()]
    if len(names) > MAX_TOPICS:
        raise BadParam("topics", f"At most {MAX_TOPICS} topics.")
    for name in names:
        if not is_valid_topic(name):
            raise BadParam(
                "topics",
                f"{name[:40]!r} is not a topic name: use letters, digits, '_', '.', ':' or '-', "
                "separated by commas.",
            )
    return frozenset(names)


def parse_format(raw: str | None) -> str:
    value = (raw or "json").strip().lower()
    if value not in FORMATS:
        raise BadParam("format", f"format must be json or html, not {raw[:20]!r}.")
    return value


def _created(item: StoredEvent) -> datetime | None:
    created = item.cache.get("created")
    if created is None:
        try:
            created = datetime.fromisoformat(item.payload()["created_at"])
        except (KeyError, TypeError, ValueError):
            created = False
        item.cache["created"] = created
    return created or None


def html_frame(item: StoredEvent) -> bytes:
    """The ``notification`` event as an HTML fragment, rendered once per process."""
    frame = item.cache.get("html_frame")
    if frame is None:
        context = {"item": fragment_context(item.payload(), live=True)}
        html = render_to_string(FRAGMENT_TEMPLATE, context)
        frame = item.cache["html_frame"] = encode_event(
            html.strip(), event="notification", id=item.id
        )
    return frame


def _unread(count: int, event_id: int) -> bytes:
    return encode_json_event({"count": count}, event="unread", id=event_id)


class FeedFrames:
    """The feed's frames over an EventStream, as an async iterator or, for the
    response, through ``poll()``/``wait()`` (no async generator per frame).

    Most items become a frame without waiting; going live and the stored
    ``unread``/``recount`` events need a count from the database first: ``poll()``
    keeps such an item and says PENDING, and ``wait()`` does the query.
    """

    __slots__ = (
        "_held", "_ready", "count", "first", "fmt", "joined", "stream", "topics", "user_id",
    )  # fmt: skip

    def __init__(
        self,
        stream: EventStream,
        user_id: int,
        joined: datetime,
        fmt: str = "json",
        topics: frozenset[str] | None = None,
        first: tuple[int, int] | None = None,
    ):
        self.stream = stream
        # (position, unread count there), read with the authentication (fastlane's
        # stream_prefetch): used when the stream goes live at that same position.
        self.first = first
        self.user_id = user_id
        self.joined = joined
        self.fmt = fmt
        self.topics = topics
        self.count: int | None = None  # known once live
        self._held = None  # an item that needs the database first
        self._ready: bytes | None = None  # the frame made from it

    def poll(self):
        """The next frame (or item with a ``frame``) ready now; PENDING or END."""
        ready = self._ready
        if ready is not None:
            self._ready = None
            return ready
        if self._held is not None:
            return PENDING
        poll = self.stream.poll
        while True:
            item = poll()
            if item.__class__ is not StoredEvent:
                if item is LIVE:
                    first, self.first = self.first, None
                    if first is not None and first[0] == self.stream.position:
                        self.count = first[1]
                        return _unread(first[1], first[0])
                    self._held = item
                    return PENDING
                return item  # reset, keep-alive, PENDING, END
            kind = item.type
            if kind == "notification":
                frame = self._notification(item)
                if frame:
                    return frame
            elif kind in ("unread", "recount") and self.count is not None:
                self._held = item
                return PENDING

    def _notification(self, item: StoredEvent) -> bytes:
        if item.channel == BROADCAST_CHANNEL:
            created = _created(item)
            if created is not None and created < self.joined:
                return b""  # sent before this user joined (a re-send): not theirs
        topics = self.topics
        wanted = topics is None or item.payload().get("topic") in topics
        count = self.count
        if count is None:
            return (item.frame if self.fmt == "json" else html_frame(item)) if wanted else b""
        count = self.count = count + 1
        # The notification and the new count in one write. Most receivers share a count,
        # so the joined frames are memoised per (count, format) on the event.
        key = (count, self.fmt if wanted else None)
        frame = item.cache.get(key)
        if frame is None:
            frame = (item.frame if self.fmt == "json" else html_frame(item)) if wanted else b""
            frame = item.cache[key] = frame + _unread(count, item.id)
        return frame

    def wait(self) -> Awaitable[None]:
        """What to await before polling again (done at once if something is ready)."""
        if self._ready is not None:
            return READY
        if self._held is None:
            return self.stream.wait()
        return self._recount()

    def arm(self, waker: Any) -> bool:
        """See EventStream.arm."""
        if self._ready is not None or self._held is not None:
            return False
        return self.stream.arm(waker)

    async def _recount(self) -> None:
        item = self._held
        # Going live: count at the stream's position. A stored unread/recount event: the
        # read state changed (this user's, or everyone's by the admin): count again.
        at = self.stream.position if item is LIVE else item.id
        self.count = await run_db(count_for, self.user_id, self.joined, at)
        self._held = None
        self._ready = _unread(self.count, at)

    def __aiter__(self) -> AsyncIterator:
        return iterate_polled(self, self.stream.close)


@event_stream_view
async def notification_stream(request: HttpRequest) -> HttpResponse:
    user = await request.auser()
    try:
        fmt = parse_format(request.GET.get("format"))
        topics = parse_topics(request.GET.get("topics"))
    except BadParam as exc:
        return json_error(400, "invalid_field", exc.detail, field=exc.field)
    stream = EventStream(
        [user_channel(user.pk), BROADCAST_CHANNEL], resume_id(request), user_id=user.pk
    )
    frames = FeedFrames(
        stream, user.pk, user.date_joined, fmt=fmt, topics=topics,
        first=getattr(request, "stream_prefetch", None),
    )  # fmt: skip
    return EventStreamResponse(frames, stream=stream, label=request.path, user_id=user.pk)


# The first unread count is read in the stream lane's authentication call (one hop per connect).
notification_stream.stream_prefetch = feed_prefetch
