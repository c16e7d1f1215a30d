"""Event streams of the chat: one answer, and a whole conversation.

Message stream (``chat:message:<id>``): every ``delta`` of the answer from its
beginning (or after the client's last id), then ``done``, then the response
ends. A client that resumes after ``done`` gets 204, which stops EventSource.
If the answer's events were pruned from the log, its row stands in for them:
one ``delta`` with the whole text so far (and ``done`` if it has finished).
Opened without a resume id in the process that generates the answer (the
client's request right after its POST), it reads no row and no log: the
generation vouches for the owner, and the hub holds the answer's events.

Conversation stream (``chat:conversation:<id>``): ``message`` snapshots and the
``delta`` events of every answer (their parent channel), live from now or
after the client's last id.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from django.http import HttpRequest, HttpResponse

from ssechat.api import json_error
from ssechat.streams.db import run_db
from ssechat.streams.hub import StoredEvent
from ssechat.streams.log import log_bounds
from ssechat.streams.response import EventStreamResponse, event_stream_view
from ssechat.streams.rows import only_row
from ssechat.streams.stream import LIVE, EventStream, Reset, resume_id
from ssechat.streams.wire import encode_json_event

from . import generation
from .api import MAX_PK
from .generation import conversation_channel, message_channel
from .models import Conversation, Message
from .recovery import fail_if_abandoned
from .serializers import message_json


def _load_answer(user_id: int, pk: int) -> Message | None:
    message = (
        only_row(
            Message.objects.filter(
                pk=pk, conversation__owner_id=user_id, role=Message.Role.ASSISTANT
            )
        )
        if pk <= MAX_PK
        else None
    )
    if message is not None and message.status == Message.Status.STREAMING:
        message = fail_if_abandoned(message)  # its process died: it gets its `done` now
    return message


def _open_answer(user_id: int, pk: int) -> tuple[Message | None, tuple[int, int]]:
    """The answer and the log's bounds, in one trip to the database threads (a stream
    opening just after its message was posted waits behind fewer calls)."""
    message = _load_answer(user_id, pk)
    return message, (log_bounds() if message is not None else (0, 0))


def _owns_conversation(user_id: int, pk: int) -> bool:
    return Conversation.objects.filter(pk=pk, owner_id=user_id).exists()


def _reload(pk: int) -> Message | None:
    return only_row(Message.objects.filter(pk=pk))


def _as_int(value: str | None) -> int | None:
    if value is None or not (value.isascii() and value.isdigit()) or len(value) > 18:
        return None
    return int(value)


def delta_frame(message: Message, text: str, event_id: int) -> bytes:
    return encode_json_event({"message_id": message.pk, "text": text}, event="delta", id=event_id)


def done_frame(message: Message, event_id: int) -> bytes:
    return encode_json_event(message_json(message), event="done", id=event_id)


@event_stream_view
async def message_stream(request: HttpRequest, pk: int) -> HttpResponse:
    user_id = request.user.pk
    resume = resume_id(request)
    start = generation.local_start(pk, user_id) if resume is None else None
    if start is not None:
        # Generated here, for this user: every event from its start is in the hub's
        # memory (or, if it has just ended, in the log), so no row to read first.
        stream = EventStream([message_channel(pk)], str(start), user_id=user_id)
        return EventStreamResponse(
            _answer_frames(stream, pk, []), stream=stream, label=request.path, user_id=user_id
        )
    message, (pruned, latest) = await run_db(_open_answer, user_id, pk)
    if message is None:
        return json_error(404, "not_found", "No such answer.")
    position = _as_int(resume)
    if (
        message.finished
        and position is not None
        and (message.last_event_id is None or position >= message.last_event_id)
    ):
        return HttpResponse(status=204)  # it has seen `done`: EventSource stops here

    prefix: list[bytes] = []
    start, from_start = resume, True
    if position is not None and message.start_event_id and position < message.start_event_id:
        resume = None  # an id from before the answer began: the client has none of it
    if resume is None:
        if message.start_event_id is not None and message.start_event_id >= pruned:
            start = str(message.start_event_id)  # every event of the answer is still stored
        else:
            # Some events may be pruned: the row holds the text of every delta so far,
            # up to last_event_id (both change in one transaction).
            last = message.last_event_id
            if message.finished:
                done_id = last if last is not None else max(latest, 1)
                if message.content:
                    prefix.append(delta_frame(message, message.content, max(done_id - 1, 0)))
                prefix.append(done_frame(message, done_id))
                return EventStreamResponse(_frames(prefix), label=request.path, user_id=user_id)
            if message.content and last is not None:
                prefix.append(delta_frame(message, message.content, last))
            start = str(max(last or 0, pruned))

    stream = EventStream(
        [message_channel(message.pk)],
        start,
        from_start=from_start,
        user_id=user_id,
        bounds=(pruned, latest),
    )

    return EventStreamResponse(
        _answer_frames(stream, message.pk, prefix),
        stream=stream,
        label=request.path,
        user_id=user_id,
    )


async def _answer_frames(stream: EventStream, pk: int, prefix: list[bytes]) -> AsyncIterator:
    """``prefix``, then the answer's events until its ``done``."""
    for frame in prefix:
        yield frame
    async for item in stream:
        if item is LIVE:
            continue
        if isinstance(item, StoredEvent):
            yield item
            if item.type == "done":
                return  # always the last event: end the response
        elif isinstance(item, Reset):
            yield item
            # The client reloads the answer; if it has finished, say so and end.
            current = await run_db(_reload, pk)
            if current is None:
                return
            if current.finished:
                yield done_frame(current, max(item.id, current.last_event_id or 0))
                return
        else:
            yield item  # keep-alive


async def _frames(frames: list[bytes]) -> AsyncIterator[bytes]:
    for frame in frames:
        yield frame


@event_stream_view
async def conversation_stream(request: HttpRequest, pk: int) -> HttpResponse:
    user_id = request.user.pk
    if not (pk <= MAX_PK and await run_db(_owns_conversation, user_id, pk)):
        return json_error(404, "not_found", "No such conversation.")
    stream = EventStream([conversation_channel(pk)], resume_id(request), user_id=user_id)
    return EventStreamResponse(stream, stream=stream, label=request.path, user_id=user_id)
