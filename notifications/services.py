"""Sending notifications and changing read state; every change is published live.

Each function writes its rows and publishes its events in one transaction
(``publish`` stores the event in the caller's transaction and wakes streams
after commit), so a feed never sees an event for a change that rolled back.

Events (see feed.py for what a client receives):

- ``notifications:user:<id>``: ``notification`` (Notification JSON) for that
  user, and ``unread`` ``{"count"}`` when their read state changes;
- ``notifications:broadcast``: ``notification`` for everyone, and ``recount``
  ``{}`` when read state changed for many users at once (admin actions):
  each feed then recounts for its own user.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import IntegrityError, connections, router, transaction
from django.db.models import Q
from django.utils import timezone

from ssechat.streams.log import publish
from ssechat.streams.rows import insert

from .models import (
    DEFAULT_TOPIC,
    TITLE_MAX_CHARS,
    URL_MAX_CHARS,
    Level,
    Notification,
    NotificationRead,
    is_safe_link,
    is_valid_topic,
)

BROADCAST_CHANNEL = "notifications:broadcast"
# The extra JSON of one notification, serialised (it travels in every event).
MAX_DATA_CHARS = 64 * 1024
LEVELS = tuple(Level.values)


def user_channel(user_id: int) -> str:
    return f"notifications:user:{user_id}"


def channel_for(notification: Notification) -> str:
    if notification.recipient_id is None:
        return BROADCAST_CHANNEL
    return user_channel(notification.recipient_id)


class InvalidNotification(ValueError):
    """Bad input for a notification; ``field`` names the culprit."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def storable(value: str) -> bool:
    """False for text no database here can store: NUL, or a lone surrogate."""
    if "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _storable_json(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if not storable(item):
                return False
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


def clean_fields(
    *,
    title: Any,
    body: Any = "",
    level: Any = Level.INFO,
    topic: Any = DEFAULT_TOPIC,
    url: Any = "",
    data: Any = None,
) -> dict[str, Any]:
    """Validate the fields of a new notification; raise InvalidNotification."""
    if title is None:
        raise InvalidNotification("title", "is required.")
    if not isinstance(title, str):
        raise InvalidNotification("title", "must be a string.")
    title = title.strip()
    if not title:
        raise InvalidNotification("title", "is required and must not be blank.")
    if not storable(title):
        raise InvalidNotification("title", "must not contain NUL or unpaired surrogates.")
    if len(title) > TITLE_MAX_CHARS:
        raise InvalidNotification("title", f"must be at most {TITLE_MAX_CHARS} characters.")

    if body is None:
        body = ""
    if not isinstance(body, str):
        raise InvalidNotification("body", "must be a string.")
    if not storable(body):
        raise InvalidNotification("body", "must not contain NUL or unpaired surrogates.")
    limit = settings.SSECHAT_NOTIFICATION_MAX_BODY_CHARS
    if len(body) > limit:
        raise InvalidNotification(
            "body",
            f"is too long: {len(body)} characters, the limit is {limit} "
            "(SSECHAT_NOTIFICATION_MAX_BODY_CHARS).",
        )

    if level is None:
        level = Level.INFO
    if level not in LEVELS:
        raise InvalidNotification(
            "level", f"must be one of {', '.join(LEVELS)}, not {_show(level)}."
        )

    if topic is None:
        topic = DEFAULT_TOPIC
    if not is_valid_topic(topic):
        raise InvalidNotification(
            "topic",
            "must be 1 to 64 letters, digits, '_', '.', ':' or '-', "
            f"starting with a letter or digit (got {_show(topic)}).",
        )

    if url is None:
        url = ""
    if not isinstance(url, str) or not storable(url):
        raise InvalidNotification("url", "must be a string without NUL or unpaired surrogates.")
    url = url.strip()
    if len(url) > URL_MAX_CHARS:
        raise InvalidNotification("url", f"must be at most {URL_MAX_CHARS} characters.")
    if url and not is_safe_link(url):
        raise InvalidNotification(
            "url", "must be an http(s) URL or a path on this site starting with '/'."
        )

    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InvalidNotification("data", "must be a JSON object.")
    if not _storable_json(data):
        raise InvalidNotification("data", "must not contain NUL or unpaired surrogates.")
    try:
        text = json.dumps(data, allow_nan=False, default=_no_json)
    except (TypeError, ValueError) as exc:
        raise InvalidNotification("data", f"must be JSON-serialisable ({exc}).") from exc
    if len(text) > MAX_DATA_CHARS:
        raise InvalidNotification("data", f"is too large (over {MAX_DATA_CHARS} characters).")
    return {
        "title": title,
        "body": body,
        "level": str(level),
        "topic": topic,
        "url": url,
        "data": json.loads(text),
    }


def _no_json(value: Any) -> Any:
    raise TypeError(f"{type(value).__name__} is not JSON")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# -- sending ---------------------------------------------------------------------
def _publish_notification(notification: Notification) -> int:
    """Publish the ``notification`` event (in the caller's transaction); remember its id."""
    event_id = publish(channel_for(notification), "notification", notification.to_json())
    # Plain SQL: the ORM's UPDATE costs far more to build than to run.
    alias = router.db_for_write(Notification)
    connection = connections[alias]
    quote = connection.ops.quote_name
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {quote(Notification._meta.db_table)} SET {quote('event_id')} = %s"  # noqa: S608
            f" WHERE {quote(Notification._meta.pk.column)} = %s",
            [event_id, notification.pk],
        )
    notification.event_id = event_id
    return event_id


def notify(
    recipient=None,
    *,
    title: str,
    body: str = "",
    level: str = Level.INFO,
    topic: str = DEFAULT_TOPIC,
    url: str = "",
    data: dict | None = None,
) -> Notification:
    """Send a notification to ``recipient`` (a user), or to every user when None.

    Open feeds receive it at once, in this process or any other. Raises
    InvalidNotification (a ValueError naming the field) on bad input.
    """
    User = get_user_model()
    if recipient is not None and not isinstance(recipient, User):
        raise TypeError("recipient must be a user or None (a broadcast to every user)")
    if recipient is not None and recipient.pk is None:
        raise InvalidNotification("recipient", "is not a saved user.")
    fields = clean_fields(title=title, body=body, level=level, topic=topic, url=url, data=data)
    with transaction.atomic():
        notification = insert(
            Notification(recipient=recipient, **fields), router.db_for_write(Notification)
        )
        _publish_notification(notification)
    return notification


async def anotify(recipient=None, **fields: Any) -> Notification:
    """:func:`notify` from async code (runs on the stream database pool)."""
    from ssechat.streams.db import run_db

    return await run_db(notify, recipient, **fields)


def send(notification: Notification) -> Notification:
    """Save a new notification built elsewhere (the admin's form) and publish it."""
    with transaction.atomic():
        notification.save()
        _publish_notification(notification)
    return notification


# -- read state ------------------------------------------------------------------
def unread_count(user, *, upto: int | None = None) -> int:
    """Unread notifications of ``user`` (own + broadcasts since they joined).

    With ``upto``, only rows whose latest event id is at or below it (rows
    published later reach a feed as events, and are counted there).
    """
    qs = Notification.objects.visible_to(user).unread_by(user)
    if upto is not None:
        qs = qs.filter(Q(event_id__isnull=True) | Q(event_id__lte=upto))
    return qs.count()


def count_for(user_id: int, joined: datetime, upto: int | None = None) -> int:
    """:func:`unread_count` for a feed, which knows its user's id and join date only.

    Every stream connect runs this, so it is the same query written out once:
    building it through the ORM costs far more than running it.
    """
    notification = Notification._meta.db_table
    read = NotificationRead._meta.db_table
    sql = (
        f"SELECT COUNT(*) FROM {notification} n WHERE "  # noqa: S608 - the models' own tables
        "((n.recipient_id = %s AND n.read_at IS NULL) OR (n.recipient_id IS NULL"
        " AND n.created_at >= %s"
        f" AND NOT EXISTS (SELECT 1 FROM {read} r WHERE r.notification_id = n.id"
        " AND r.user_id = %s)))"
    )
    params: list = [user_id, joined, user_id]
    if upto is not None:
        sql += " AND (n.event_id IS NULL OR n.event_id <= %s)"
        params.append(upto)
    with connections[router.db_for_read(Notification)].cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchone()[0]


def feed_prefetch(user, horizon: int) -> tuple[int, int]:
    """``(horizon, unread count at it)``: a feed's first count, for the stream lane.

    Meant as the feed view's ``stream_prefetch`` (ssechat/streams/fastlane.py):
    it runs in the same database call as the authentication. The feed may use
    the count when its stream starts at ``horizon`` (it is then exactly what
    ``count_for(user_id, joined, position)`` would return at that point).
    """
    return horizon, count_for(user.pk, user.date_joined, horizon)


def _publish_unread(user) -> int:
    count = unread_count(user)
    publish(user_channel(user.pk), "unread", {"count": count})
    return count


def mark_read(user, notification_id: int) -> int:
    """Mark one notification read for ``user``; return the new unread count.

    Raises Notification.DoesNotExist when it is not the user's (or a broadcast
    they can see).
    """
    with transaction.atomic():
        notification = Notification.objects.visible_to(user).get(pk=notification_id)
        if notification.recipient_id is not None:
            changed = Notification.objects.filter(pk=notification.pk, read_at__isnull=True).update(
                read_at=timezone.now()
            )
        else:
            changed = _mark_broadcast_read(notification, user)
        if changed:
            return _publish_unread(user)
        return unread_count(user)


def _mark_broadcast_read(notification: Notification, user) -> bool:
    try:
        with transaction.atomic():
            _, created = NotificationRead.objects.get_or_create(
                notification=notification, user=user
            )
    except IntegrityError:  # read at the same moment in another request
        return False
    return created


def mark_all_read(user) -> int:
    """Mark every notification of ``user`` read; return the new unread count."""
    now = timezone.now()
    with transaction.atomic():
        changed = Notification.objects.filter(recipient_id=user.pk, read_at__isnull=True).update(
            read_at=now
        )
        unread_broadcasts = list(
            Notification.objects.visible_to(user)
            .broadcasts()
            .unread_by(user)
            .values_list("pk", flat=True)
        )
        if unread_broadcasts:
            NotificationRead.objects.bulk_create(
                [NotificationRead(notification_id=pk, user=user, read_at=now)
                 for pk in unread_broadcasts],
                ignore_conflicts=True,
                batch_size=500,
            )  # fmt: skip
            changed += len(unread_broadcasts)
        if changed:
            return _publish_unread(user)
        return unread_count(user)


# -- the admin's bulk changes --------------------------------------------------------
def _users_by_id(ids: Iterable[int]) -> list:
    return list(get_user_model().objects.filter(pk__in=set(ids)))


def _audience(notification: Notification):
    """Users who can see a broadcast (joined before it was sent)."""
    return get_user_model().objects.filter(date_joined__lte=notification.created_at)


def set_read(notifications: Iterable[Notification], read: bool) -> int:
    """Mark notifications read or unread for their recipients (a broadcast: for everyone).

    Publishes the new unread count to every recipient whose count changed.
    Returns how many notifications changed.
    """
    notifications = list(notifications)
    now = timezone.now()
    touched_users: set[int] = set()
    broadcast_changed = False
    changed = 0
    with transaction.atomic():
        for n in notifications:
            if n.recipient_id is not None:
                qs = Notification.objects.filter(pk=n.pk, read_at__isnull=read)
                if qs.update(read_at=now if read else None):
                    touched_users.add(n.recipient_id)
                    changed += 1
            elif read:
                marks = [
                    NotificationRead(notification=n, user_id=pk, read_at=now)
                    for pk in _audience(n)
                    .exclude(notification_reads__notification=n)
                    .values_list("pk", flat=True)
                ]
                if marks:
                    NotificationRead.objects.bulk_create(
                        marks, ignore_conflicts=True, batch_size=500
                    )
                    broadcast_changed = True
                    changed += 1
            else:
                deleted, _ = NotificationRead.objects.filter(notification=n).delete()
                if deleted:
                    broadcast_changed = True
                    changed += 1
        for user in _users_by_id(touched_users):
            _publish_unread(user)
        if broadcast_changed:
            publish(BROADCAST_CHANNEL, "recount", {})
    return changed


def resend(notifications: Iterable[Notification]) -> int:
    """Send notifications again: unread again for their recipients, live to open feeds."""
    notifications = sorted(notifications, key=lambda n: n.pk)
    recipients: set[int] = set()
    any_broadcast = False
    with transaction.atomic():
        for n in notifications:
            if n.recipient_id is not None:
                Notification.objects.filter(pk=n.pk).update(read_at=None)
                n.read_at = None
                recipients.add(n.recipient_id)
            else:
                NotificationRead.objects.filter(notification=n).delete()
                any_broadcast = True
            _publish_notification(n)
        # A feed adds one per notification event; one it had counted already
        # (it was unread) would count twice, so feeds recount.
        for user in _users_by_id(recipients):
            _publish_unread(user)
        if any_broadcast:
            publish(BROADCAST_CHANNEL, "recount", {})
    return len(notifications)


def list_for(
    user,
    *,
    unread: bool = False,
    topic: str | None = None,
    before: int | None = None,
    limit: int = 20,
) -> list[dict[str, Any]]:
    """A page of the user's notifications as Notification JSON, newest first."""
    qs = Notification.objects.visible_to(user)
    if unread:
        qs = qs.unread_by(user)
    if topic:
        qs = qs.filter(topic=topic)
    if before is not None:
        qs = qs.filter(pk__lt=before)
    rows = qs.with_read_state(user).order_by("-id")[: max(1, min(limit, 1000))]
    return [n.to_json(read=n.is_read) for n in rows]


def topics_for(user, limit: int = 50) -> list[str]:
    """The topics of the user's notifications, for a filter menu."""
    qs = Notification.objects.visible_to(user).order_by().values_list("topic", flat=True)
    return sorted(set(qs.distinct()[:limit]))
