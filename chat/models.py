"""Conversations and their messages.

An assistant message is generated in the background by one worker process
(``worker``), which keeps ``heartbeat_at`` fresh while it streams; a message
left ``streaming`` by a process that died is found by that and marked failed
(see ``chat.recovery``). ``content`` holds exactly the text of the ``delta``
events up to ``last_event_id`` (both are saved in one transaction, about once
a second while the answer streams; the deltas after it are in the event log);
once the answer has finished, ``content`` is its whole text and
``last_event_id`` the id of its ``done``.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone

TITLE_MAX_LENGTH = 200


class Conversation(models.Model):
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="conversations"
    )
    title = models.CharField(max_length=TITLE_MAX_LENGTH, blank=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    # Moved forward when a message is added or the title changes (lists sort by it).
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-updated_at", "-id"]
        indexes = [models.Index(fields=["owner", "-updated_at"], name="chat_conv_owner_updated")]

    def __str__(self) -> str:
        return self.title or f"Conversation {self.pk}"


class Message(models.Model):
    class Role(models.TextChoices):
        USER = "user", "user"
        ASSISTANT = "assistant", "assistant"

    class Status(models.TextChoices):
        STREAMING = "streaming", "streaming"
        COMPLETE = "complete", "complete"
        CANCELLED = "cancelled", "cancelled"
        FAILED = "failed", "failed"

    conversation = models.ForeignKey(
        Conversation, on_delete=models.CASCADE, related_name="messages"
    )
    role = models.CharField(max_length=16, choices=Role.choices)
    content = models.TextField(blank=True, default="")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.COMPLETE)
    # Why a failed answer failed (shown to the user); empty otherwise.
    error = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(default=timezone.now)
    completed_at = models.DateTimeField(null=True, blank=True)
    prompt_tokens = models.PositiveIntegerField(null=True, blank=True)
    completion_tokens = models.PositiveIntegerField(null=True, blank=True)

    # Generation (assistant messages).
    reply_to = models.ForeignKey(
        "self",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="answers",
        help_text="The user message this answer replies to.",
    )
    model = models.CharField(max_length=200, blank=True, help_text="The model that wrote it.")
    worker = models.CharField(
        max_length=200, blank=True, help_text="host:pid:nonce of the process generating it."
    )
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    # Event ids: the `message` snapshot published when the answer was created (every
    # event of the answer comes after it), and the newest event of the answer.
    start_event_id = models.BigIntegerField(null=True, blank=True, editable=False)
    last_event_id = models.BigIntegerField(null=True, blank=True, editable=False)

    class Meta:
        ordering = ["id"]
        indexes = [
            models.Index(fields=["conversation", "id"], name="chat_msg_conversation"),
            models.Index(
                fields=["heartbeat_at"],
                name="chat_msg_streaming",
                condition=Q(status="streaming"),
            ),
            models.Index(fields=["created_at"], name="chat_msg_created"),
        ]

    def __str__(self) -> str:
        text = " ".join(self.content.split())
        if len(text) > 60:
            text = text[:59] + "…"
        return f"#{self.pk} {self.role}: {text}"

    @property
    def finished(self) -> bool:
        return self.status != self.Status.STREAMING

    @property
    def usage(self) -> dict | None:
        if self.prompt_tokens is None and self.completion_tokens is None:
            return None
        return {
            "prompt_tokens": self.prompt_tokens or 0,
            "completion_tokens": self.completion_tokens or 0,
        }
