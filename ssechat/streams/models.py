"""The event log: every event a stream sends is a row here first.

Ids come from one counter for the whole log, so a stream over several channels
still has one growing cursor. How no id can be skipped by a resume even though
transactions commit out of order on PostgreSQL is explained in ``brokers.py``.
"""

from __future__ import annotations

from django.db import models
from django.db.models import Q
from django.utils import timezone


class Event(models.Model):
    id = models.BigAutoField(primary_key=True)
    # The routing key, e.g. "notifications:user:42" or "chat:message:17".
    channel = models.CharField(max_length=200)
    # Optional: subscribers of this channel receive the event too
    # (e.g. a message's deltas also reach its conversation's stream).
    parent = models.CharField(max_length=200, blank=True, default="")
    type = models.CharField(max_length=64)
    # The payload as JSON text, stored ready to be framed.
    data = models.TextField()
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        indexes = [
            models.Index(fields=["channel", "id"], name="streams_event_channel_id"),
            models.Index(
                fields=["parent", "id"], name="streams_event_parent_id", condition=~Q(parent="")
            ),
            models.Index(fields=["created_at"], name="streams_event_created"),
        ]

    def __str__(self) -> str:
        return f"#{self.id} {self.channel} {self.type}"


class EventLogState(models.Model):
    """One row: how far the log has been pruned (resuming before it gets ``reset``)."""

    id = models.PositiveSmallIntegerField(primary_key=True, default=1)
    pruned_through = models.BigIntegerField(default=0)

    class Meta:
        verbose_name = "event log state"

    def __str__(self) -> str:
        return f"pruned through #{self.pruned_through}"
