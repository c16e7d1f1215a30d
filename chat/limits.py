"""Limits on what a user may ask of the model, and the chat's tunable settings.

Every limit is read from the settings on each use (``0`` or less turns it off)
and counted in the database, so it holds across worker processes and hosts:

- ``SSECHAT_CHAT_MAX_MESSAGE_CHARS``: longest message a user may send (400);
- ``SSECHAT_CHAT_MAX_ACTIVE_ANSWERS``: answers of one user streaming at once (429);
- ``SSECHAT_CHAT_REQUESTS_PER_MINUTE``: answers one user may start in 60 s (429).
"""

from __future__ import annotations

import math
import os
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from django.conf import settings
from django.db import connections, router
from django.http import JsonResponse
from django.utils import timezone

from ssechat.api import ApiError
from ssechat.streams.rows import column

from .models import Conversation, Message

RATE_WINDOW_SECONDS = 60


def chat_setting(name: str, default: float) -> float:
    """A number from the settings, else from the environment, else ``default``.

    The generation tunables below are not in ``ssechat.settings``; reading the
    environment lets a deployment (or a test server) set them anyway.
    """
    value: Any = getattr(settings, name, None)
    if value is None or value == "":
        value = os.environ.get(name, "").strip() or default
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def max_message_chars() -> int:
    return int(chat_setting("SSECHAT_CHAT_MAX_MESSAGE_CHARS", 32_000))


def max_active_answers() -> int:
    return int(chat_setting("SSECHAT_CHAT_MAX_ACTIVE_ANSWERS", 3))


def requests_per_minute() -> int:
    return int(chat_setting("SSECHAT_CHAT_REQUESTS_PER_MINUTE", 30))


# How generation writes: a chunk is stored and published at most every FLUSH_SECONDS,
# sooner when FLUSH_CHARS have piled up.
def flush_seconds() -> float:
    return chat_setting("SSECHAT_CHAT_FLUSH_MS", 25.0) / 1000.0


def flush_chars() -> int:
    return int(chat_setting("SSECHAT_CHAT_FLUSH_CHARS", 300))


# While an answer streams, its text is saved in its row (``content``) about this often;
# every chunk is published (and stored in the event log) at once anyway.
def save_seconds() -> float:
    return chat_setting("SSECHAT_CHAT_SAVE_MS", 1000.0) / 1000.0


# How often a process refreshes the heartbeat of its answers and looks for dead ones,
# and how old a heartbeat must be for its answer to count as abandoned.
def heartbeat_seconds() -> float:
    return max(0.05, chat_setting("SSECHAT_CHAT_HEARTBEAT_SECONDS", 10.0))


def stale_seconds() -> float:
    return max(heartbeat_seconds() * 2, chat_setting("SSECHAT_CHAT_STALE_SECONDS", 30.0))


class LimitExceeded(ApiError):
    """A 429 with a ``Retry-After`` header."""

    def __init__(self, detail: str, code: str, retry_after: int):
        super().__init__(429, detail, code=code, retry_after=retry_after)
        self.retry_after = retry_after

    def response(self) -> JsonResponse:
        response = super().response()
        response["Retry-After"] = str(self.retry_after)
        return response


def clean_text(value: Any, field: str, *, max_chars: int | None = None, required: bool = True):
    """A text field of a request body, or a 400 naming what is wrong with it."""
    if not isinstance(value, str):
        raise ApiError(400, f"'{field}' must be a string.", code="invalid_field", field=field)
    if required and not value.strip():
        raise ApiError(400, f"'{field}' must not be empty.", code="invalid_field", field=field)
    if "\x00" in value:
        raise ApiError(
            400, f"'{field}' must not contain NUL characters.", code="invalid_field", field=field
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(
            400, f"'{field}' is not valid Unicode text.", code="invalid_field", field=field
        ) from None
    if max_chars is not None and max_chars > 0 and len(value) > max_chars:
        raise ApiError(
            400,
            f"'{field}' is {len(value)} characters long; the limit is {max_chars}.",
            code="too_long",
            field=field,
            max_chars=max_chars,
        )
    return value


def check_message_length(content: Any) -> str:
    return clean_text(content, "content", max_chars=max_message_chars())


def check_answer_limits(user_id: int, counted: AnswerCounts | None = None) -> None:
    """Refuse a new answer for ``user_id`` with 429 when one of the limits is reached.

    Sync ORM code; call it in the transaction that creates the answer. Both
    limits are counted in one plain query (every message POST runs it), unless
    ``counted`` (:func:`answer_counts_sql`'s figures, read by the caller in that
    transaction) is given; the time to wait is read only when the rate limit refuses.
    """
    active = max_active_answers()
    per_minute = requests_per_minute()
    if active <= 0 and per_minute <= 0:
        return
    if counted is None:
        connection = connections[router.db_for_read(Message)]
        sql, params, since = answer_counts_sql(connection, user_id)
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT {sql}", params)
            counted = AnswerCounts(since, *cursor.fetchone())
    since, streaming, recent_count = counted
    if active > 0 and streaming >= active:
        raise LimitExceeded(
            f"You already have {streaming} answer(s) being written (the limit is {active}); "
            "wait for one to finish or stop it.",
            code="too_many_active_answers",
            retry_after=1,
        )
    if per_minute > 0 and recent_count >= per_minute:
        recent = list(
            Message.objects.filter(
                conversation__owner_id=user_id,
                role=Message.Role.ASSISTANT,
                # Generated answers only: history an API client resends is not a request.
                reply_to__isnull=False,
                created_at__gte=since,
            )
            .order_by("-created_at")
            .values_list("created_at", flat=True)[:per_minute]
        )
        if len(recent) >= per_minute:
            # The oldest answer that counts leaves the window first.
            wait = (recent[-1] - since).total_seconds()
            retry_after = max(1, math.ceil(wait))
            raise LimitExceeded(
                f"Too many requests: at most {per_minute} answers a minute. "
                f"Try again in {retry_after} s.",
                code="rate_limited",
                retry_after=retry_after,
            )


class AnswerCounts(NamedTuple):
    since: datetime  # the start of the rate window
    streaming: int  # the user's answers being written
    recent: int  # their generated answers created since ``since`` (up to the rate limit)


def answer_counts_sql(connection: Any, user_id: int) -> tuple[str, list, datetime]:
    """Two columns for a SELECT list: the user's answers being written, and their
    generated answers created since the start of the rate window (counted up to the
    rate limit); their parameters; and that start. See :class:`AnswerCounts`."""
    since = timezone.now() - timedelta(seconds=RATE_WINDOW_SECONDS)
    quote = connection.ops.quote_name

    message, conversation = quote(Message._meta.db_table), quote(Conversation._meta.db_table)
    joined = (
        f"{message} m JOIN {conversation} c ON c.{column(connection, Conversation, 'id')}"
        f" = m.{column(connection, Message, 'conversation')}"
        f" WHERE c.{column(connection, Conversation, 'owner')} = %s"
        f" AND m.{column(connection, Message, 'role')} = %s"
    )
    sql = (
        f"(SELECT COUNT(*) FROM {joined} AND m.{column(connection, Message, 'status')} = %s),"  # noqa: S608 - the models' own tables and columns
        f" (SELECT COUNT(*) FROM (SELECT 1 FROM {joined}"
        f" AND m.{column(connection, Message, 'reply_to')} IS NOT NULL"
        f" AND m.{column(connection, Message, 'created_at')} >= %s LIMIT %s) recent)"
    )
    assistant = str(Message.Role.ASSISTANT)
    params = [
        user_id, assistant, str(Message.Status.STREAMING),
        user_id, assistant, connection.ops.adapt_datetimefield_value(since),
        max(requests_per_minute(), 0),
    ]  # fmt: skip
    return sql, params, since


def limits_apply() -> bool:
    """Whether any limit on new answers is on (else they need not be counted)."""
    return max_active_answers() > 0 or requests_per_minute() > 0
