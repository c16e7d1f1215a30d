"""The JSON shapes of the chat API (see the contract in the README / API.md)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from .models import Conversation, Message


def iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def message_json(message: Message) -> dict[str, Any]:
    """``{"id", "conversation_id", "role", "content", "status", "error", "created_at",
    "completed_at", "usage"}``."""
    return {
        "id": message.pk,
        "conversation_id": message.conversation_id,
        "role": message.role,
        "content": message.content,
        "status": message.status,
        "error": (message.error or "The answer failed.")
        if message.status == Message.Status.FAILED
        else None,
        "created_at": iso(message.created_at),
        "completed_at": iso(message.completed_at),
        "usage": message.usage,
    }


def conversation_json(conversation: Conversation, *, messages: bool = False) -> dict[str, Any]:
    """``{"id", "title", "created_at", "updated_at"}``; with ``messages`` (a query: sync
    code only) also ``"messages"``, oldest first."""
    data: dict[str, Any] = {
        "id": conversation.pk,
        "title": conversation.title,
        "created_at": iso(conversation.created_at),
        "updated_at": iso(conversation.updated_at),
    }
    if messages:
        data["messages"] = [message_json(m) for m in conversation.messages.order_by("id")]
    return data
