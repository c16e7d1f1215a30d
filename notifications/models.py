"""Notifications: one row per notification, read marks per user for broadcasts.

A notification has one recipient, or none: then it is a broadcast to every
user who had joined when it was sent (a new user does not inherit the old
announcements). It is stored once. Read state:

- a direct notification keeps it on the row (``read_at``);
- a broadcast has one ``NotificationRead`` row per user who read it, created
  when that user reads it (never a copy of the notification per user).

``event_id`` is the id of the latest ``notification`` event published for the
row in the event log: a feed counts unread notifications "as of" an event id,
so that counting and the live +1 per new event never count one twice.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import Case, Exists, OuterRef, Q, Value, When
from django.utils import timezone

TITLE_MAX_CHARS = 200
URL_MAX_CHARS = 2000
TOPIC_MAX_CHARS = 64
DEFAULT_TOPIC = "general"
TOPIC_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
_CONTROL_RE = re.compile(r"[\x00-\x20\x7f]")


class Level(models.TextChoices):
    INFO = "info", "Info"
    SUCCESS = "success", "Success"
    WARNING = "warning", "Warning"
    ERROR = "error", "Error"


def is_valid_topic(value: Any) -> bool:
    return isinstance(value, str) and bool(TOPIC_RE.match(value))


def validate_topic(value: str) -> None:
    if not is_valid_topic(value):
        raise ValidationError(
            "Use 1 to 64 letters, digits, '_', '.', ':' or '-', starting with a letter or digit."
        )


def is_safe_link(value: Any) -> bool:
    """True for an http(s) URL or a path on this site ("/..."); never ``javascript:``."""
    if not isinstance(value, str) or not value or len(value) > URL_MAX_CHARS:
        return False
    if _CONTROL_RE.search(value) or "\\" in value:
        return False
    if value.startswith("/"):
        return not value.startswith("//")
    try:
        parts = urlsplit(value)
    except ValueError:
        return False
    return parts.scheme.lower() in ("http", "https") and bool(parts.netloc)


def validate_link(value: str) -> None:
    if value and not is_safe_link(value):
        raise ValidationError("Use an http(s) URL or a path on this site starting with '/'.")


def validate_body_length(value: str) -> None:
    limit = settings.SSECHAT_NOTIFICATION_MAX_BODY_CHARS
    if len(value) > limit:
        raise ValidationError(f"At most {limit} characters (this one has {len(value)}).")


class NotificationQuerySet(models.QuerySet):
    def broadcasts(self) -> NotificationQuerySet:
        return self.filter(recipient__isnull=True)

    def visible_to(self, user) -> NotificationQuerySet:
        """The user's own notifications and the broadcasts sent since they joined."""
        return self.filter(
            Q(recipient_id=user.pk) | Q(recipient__isnull=True, created_at__gte=user.date_joined)
        )

    def with_read_state(self, user) -> NotificationQuerySet:
        """Annotate ``is_read`` for ``user`` (read_at for theirs, a read mark for broadcasts)."""
        mark = NotificationRead.objects.filter(notification=OuterRef("pk"), user_id=user.pk)
        return self.annotate(
            is_read=Case(
                When(recipient__isnull=True, then=Exists(mark)),
                When(read_at__isnull=False, then=Value(True)),
                default=Value(False),
                output_field=models.BooleanField(),
            )
        )

    def unread_by(self, user) -> NotificationQuerySet:
        mark = NotificationRead.objects.filter(notification=OuterRef("pk"), user_id=user.pk)
        own = Q(recipient_id=user.pk, read_at__isnull=True)
        return self.filter(own | (Q(recipient__isnull=True) & ~Exists(mark)))


class Notification(models.Model):
    # Empty: a broadcast to every user.
    recipient = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="notifications",
        db_index=False,  # the (recipient, id) indexes below lead with it
        help_text="Leave empty to broadcast to every user.",
    )
    topic = models.CharField(
        max_length=TOPIC_MAX_CHARS,
        default=DEFAULT_TOPIC,
        validators=[validate_topic],
        help_text="A short name clients can filter on, e.g. 'billing' or 'chat.mention'.",
    )
    level = models.CharField(max_length=16, choices=Level.choices, default=Level.INFO)
    title = models.CharField(max_length=TITLE_MAX_CHARS)
    body = models.TextField(blank=True, validators=[validate_body_length])
    url = models.CharField(
        "link",
        max_length=URL_MAX_CHARS,
        blank=True,
        validators=[validate_link],
        help_text="Optional: an http(s) URL or a path on this site, e.g. /chat/12/.",
    )
    data = models.JSONField(default=dict, blank=True, help_text="Extra JSON for scripts.")
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    # Read state of a direct notification; broadcasts use NotificationRead.
    read_at = models.DateTimeField(null=True, blank=True, editable=False)
    event_id = models.BigIntegerField(null=True, blank=True, editable=False)

    objects = NotificationQuerySet.as_manager()

    class Meta:
        ordering = ["-id"]
        indexes = [
            # A user's list, newest first (and paging with before=<id>).
            models.Index(fields=["recipient", "-id"], name="notif_recipient_id"),
            # The topic filter of the list.
            models.Index(fields=["recipient", "topic", "-id"], name="notif_recipient_topic_id"),
            # Unread counts and unread=true lists of direct notifications.
            models.Index(
                fields=["recipient", "-id"],
                name="notif_unread_recipient_id",
                condition=Q(read_at__isnull=True),
            ),
            # Broadcasts a user can see (sent since they joined).
            models.Index(
                fields=["created_at"],
                name="notif_broadcast_created",
                condition=Q(recipient__isnull=True),
            ),
            # The admin's date filter and hierarchy.
            models.Index(fields=["created_at"], name="notif_created"),
        ]

    def __str__(self) -> str:
        return self.title

    @property
    def is_broadcast(self) -> bool:
        return self.recipient_id is None

    def to_json(self, *, read: bool = False) -> dict[str, Any]:
        """The Notification JSON of the contract."""
        return {
            "id": self.pk,
            "topic": self.topic,
            "level": self.level,
            "title": self.title,
            "body": self.body,
            "url": self.url,
            "data": self.data if isinstance(self.data, dict) else {},
            "created_at": self.created_at.isoformat(),
            "read": bool(read),
        }


class NotificationRead(models.Model):
    """A user has read a broadcast."""

    notification = models.ForeignKey(Notification, on_delete=models.CASCADE, related_name="reads")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="notification_reads"
    )
    read_at = models.DateTimeField(default=timezone.now)

    class Meta:
        verbose_name = "broadcast read mark"
        constraints = [
            models.UniqueConstraint(fields=["user", "notification"], name="notif_read_once"),
        ]

    def __str__(self) -> str:
        return f"{self.user} read #{self.notification_id}"
