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
from collections.abc import AsyncIterator
from datetime import datetime

from django.http import HttpRequest, HttpResponse
from django.template.loader import render_to_string

from ssechat.api import json_error
from ssechat.streams.db import run_db
from ssechat.streams.hub import StoredEvent
from ssechat.streams.response import EventStreamResponse, event_stream_view
from ssechat.streams.stream import LIVE, EventStream, resume_id
from ssechat.streams.wire import encode_event, encode_json_event

from .models import is_valid_topic
from .presenters import fragment_context
from .services import BROADCAST_CHANNEL, count_for, user_channel

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


async def feed_frames(
    stream: EventStream,
    user_id: int,
    joined: datetime,
    *,
    fmt: str = "json",
    topics: frozenset[str] | None = None,
) -> AsyncIterator:
    count: int | None = None  # known once live
    async for item in stream:
        if item is LIVE:
            count = await run_db(count_for, user_id, joined, stream.position)
            yield _unread(count, stream.position)
            continue
        if item.__class__ is not StoredEvent:
            yield item  # reset, keep-alive
            continue
        kind = item.type
        if kind == "notification":
            if item.channel == BROADCAST_CHANNEL:
                created = _created(item)
                if created is not None and created < joined:
                    continue  # sent before this user joined (a re-send): not theirs
            wanted = topics is None or item.payload().get("topic") in topics
            frame = (item.frame if fmt == "json" else html_frame(item)) if wanted else b""
            if count is not None:
                count += 1
                # One write for both frames; most receivers share a count, so memoise it.
                key = ("unread", count)
                unread = item.cache.get(key)
                if unread is None:
                    unread = item.cache[key] = _unread(count, item.id)
                frame += unread
            if frame:
                yield frame
        elif kind in ("unread", "recount") and count is not None:
            # Read state changed (this user's, or everyone's by the admin): count again.
            count = await run_db(count_for, user_id, joined, item.id)
            yield _unread(count, item.id)


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
    frames = feed_frames(stream, user.pk, user.date_joined, fmt=fmt, topics=topics)
    return EventStreamResponse(frames, stream=stream, label=request.path, user_id=user.pk)
