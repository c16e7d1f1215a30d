"""The chat's JSON API: conversations, messages, cancel and regenerate.

Everything is scoped to the requesting user: anything else is 404. Answers
are generated in the background (``chat.generation``); these views only
create rows, publish their snapshots and start the task once committed.
"""

from __future__ import annotations

from asgiref.sync import sync_to_async
from django.core.exceptions import RequestDataTooBig
from django.db import connections, router, transaction
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import reverse
from django.utils import timezone

from ssechat.api import ApiError, api_view, parse_json_body
from ssechat.streams.db import run_db_request
from ssechat.streams.rows import column, only_row

from . import generation
from .limits import (
    AnswerCounts,
    answer_counts_sql,
    check_answer_limits,
    check_message_length,
    clean_text,
    limits_apply,
)
from .models import TITLE_MAX_LENGTH, Conversation, Message
from .recovery import fail_if_abandoned
from .serializers import conversation_json, message_json

MAX_PK = 2**63 - 1


def not_found(what: str = "conversation") -> ApiError:
    return ApiError(404, f"No such {what}.", code="not_found")


def check_pk(pk: int, what: str = "conversation") -> int:
    if pk > MAX_PK:  # beyond a 64-bit key: it cannot exist
        raise not_found(what)
    return pk


def stream_url(message_id: int) -> str:
    return reverse("chat-api-message-stream", args=[message_id])


def _optional_body(request: HttpRequest) -> dict:
    length = request.META.get("CONTENT_LENGTH") or ""
    if length in ("", "0") and not request.META.get("HTTP_TRANSFER_ENCODING"):
        return {}
    try:
        empty = not request.body.strip()
    except RequestDataTooBig:
        raise ApiError(413, "The request body is too large.") from None
    return {} if empty else parse_json_body(request)


def _title(body: dict, *, required: bool) -> str:
    if "title" not in body or body["title"] is None:
        if required:
            raise ApiError(400, "'title' is required.", code="invalid_field", field="title")
        return ""
    title = clean_text(body["title"], "title", max_chars=TITLE_MAX_LENGTH, required=False)
    return " ".join(title.split())


# -- conversations --------------------------------------------------------------


def _owned_conversation(user_id: int, pk: int, *, lock: bool = False) -> Conversation:
    query = Conversation.objects.filter(pk=check_pk(pk), owner_id=user_id)
    if lock:
        query = query.select_for_update(no_key=True)
    conversation = only_row(query)
    if conversation is None:
        raise not_found()
    return conversation


@api_view(("GET", "POST"))
async def conversations(request: HttpRequest) -> HttpResponse:
    user = request.user
    if request.method == "GET":
        rows = Conversation.objects.filter(owner_id=user.pk).order_by("-updated_at", "-id")
        return JsonResponse({"results": [conversation_json(c) async for c in rows]})
    title = _title(_optional_body(request), required=False)
    now = timezone.now()
    conversation = await Conversation.objects.acreate(
        owner_id=user.pk, title=title, created_at=now, updated_at=now
    )
    return JsonResponse(conversation_json(conversation), status=201)


def _detail(user_id: int, pk: int) -> dict:
    return conversation_json(_owned_conversation(user_id, pk), messages=True)


def _rename(user_id: int, pk: int, title: str) -> dict:
    with transaction.atomic():
        conversation = _owned_conversation(user_id, pk, lock=True)
        conversation.title = title
        conversation.updated_at = timezone.now()
        conversation.save(update_fields=["title", "updated_at"])
    return conversation_json(conversation)


def _delete(user_id: int, pk: int) -> None:
    conversation = _owned_conversation(user_id, pk)
    # Streaming answers get their `done` first, so open streams end properly.
    streaming = Message.objects.filter(conversation=conversation, status=Message.Status.STREAMING)
    for message_id in streaming.values_list("id", flat=True):
        generation.cancel_answer_sync(message_id)
    conversation.delete()


@api_view(("GET", "PATCH", "DELETE"))
async def conversation(request: HttpRequest, pk: int) -> HttpResponse:
    user_id = request.user.pk
    if request.method == "GET":
        return JsonResponse(await sync_to_async(_detail)(user_id, pk))
    if request.method == "PATCH":
        title = _title(parse_json_body(request), required=True)
        return JsonResponse(await sync_to_async(_rename)(user_id, pk, title))
    await sync_to_async(_delete)(user_id, pk)
    return HttpResponse(status=204)


# -- messages -----------------------------------------------------------------------


def _check_idle(conversation: Conversation) -> None:
    """409 while an answer of ``conversation`` is still being written."""
    streaming = Message.objects.filter(conversation=conversation, status=Message.Status.STREAMING)
    for message in streaming:
        if fail_if_abandoned(message).status == Message.Status.STREAMING:
            raise ApiError(
                409,
                "An answer in this conversation is still being written; "
                "wait for it to finish or stop it first.",
                code="answer_in_progress",
                message_id=message.pk,
            )


def _lock_for_message(user_id: int, pk: int) -> tuple[Conversation, bool, AnswerCounts | None]:
    """The user's conversation ``pk``, locked as ``_owned_conversation(lock=True)`` locks
    it; whether an answer of it is being written; and the user's answer counts for the
    limits (None when no limit is on): one plain query, where the ORM took three. Only
    ``id`` and ``title`` of the conversation are read (the rest is deferred).
    """
    connection = connections[router.db_for_write(Conversation)]
    quote = connection.ops.quote_name
    pk_, title = column(connection, Conversation, "id"), column(connection, Conversation, "title")
    busy = (
        f"EXISTS (SELECT 1 FROM {quote(Message._meta.db_table)} m"  # noqa: S608 - the models' own tables and columns
        f" WHERE m.{column(connection, Message, 'conversation')} = c.{pk_}"
        f" AND m.{column(connection, Message, 'status')} = %s)"
    )
    columns, params = [f"c.{pk_}", f"c.{title}", busy], [str(Message.Status.STREAMING)]
    since = None
    if limits_apply():
        counts, more, since = answer_counts_sql(connection, user_id)
        columns.append(counts)
        params += more
    sql = (
        f"SELECT {', '.join(columns)} FROM {quote(Conversation._meta.db_table)} c"  # noqa: S608 - the models' own tables and columns
        f" WHERE c.{pk_} = %s AND c.{column(connection, Conversation, 'owner')} = %s"
    )
    params += [check_pk(pk), user_id]
    if connection.features.has_select_for_update:
        sql += " " + connection.ops.for_update_sql(no_key=True)
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
    if row is None:
        raise not_found()
    conversation = Conversation.from_db(
        connection.alias, ["id", "owner_id", "title"], [row[0], user_id, row[1]]
    )
    counted = AnswerCounts(since, row[3], row[4]) if since is not None else None
    return conversation, bool(row[2]), counted


def _post_message(user_id: int, pk: int, content: str) -> tuple[Message, Message, list | None]:
    with transaction.atomic():
        conversation, busy, counted = _lock_for_message(user_id, pk)
        if busy:  # maybe an abandoned answer: the ORM's own check sees to it
            _check_idle(conversation)
        check_answer_limits(user_id, counted)
        user_message, answer = generation.create_exchange(conversation, content)
    # Read on this thread (the answer's task then starts without a database hop), after
    # the commit: inside, SQLite's write lock would be held for it.
    return user_message, answer, generation.history_for(user_message.pk, target=user_message)


@api_view(("POST",), lane=True)
async def post_message(request: HttpRequest, pk: int) -> HttpResponse:
    body = parse_json_body(request)
    if "content" not in body:
        raise ApiError(400, "'content' is required.", code="invalid_field", field="content")
    content = check_message_length(body["content"])
    # On the stream database pool (a lean-lane view): no per-request thread.
    user_message, answer, history = await run_db_request(
        _post_message, request.user.pk, pk, content
    )
    generation.launch(answer, history)
    return JsonResponse(
        {
            "user_message": message_json(user_message),
            "assistant_message": message_json(answer),
            "stream_url": stream_url(answer.pk),
        },
        status=201,
    )


def _owned_message(user_id: int, pk: int) -> Message:
    message = only_row(
        Message.objects.select_related("conversation").filter(
            pk=check_pk(pk, "message"), conversation__owner_id=user_id
        )
    )
    if message is None:
        raise not_found("message")
    return message


@api_view(("POST",))
async def cancel(request: HttpRequest, pk: int) -> HttpResponse:
    message = await sync_to_async(_owned_message)(request.user.pk, pk)
    if message.role != Message.Role.ASSISTANT:
        raise ApiError(400, "Only an answer can be cancelled.", code="not_an_answer")
    done = await generation.cancel_answer(message.pk)
    if done is None:  # already finished: cancelling again changes nothing
        done = await sync_to_async(_owned_message)(request.user.pk, pk)
    return JsonResponse(message_json(done))


def _regenerate(user_id: int, pk: int) -> tuple[Message, list | None]:
    with transaction.atomic():
        message = _owned_message(user_id, pk)
        conversation = _owned_conversation(user_id, message.conversation_id, lock=True)
        if message.role == Message.Role.USER:
            user_message = message
        else:
            user_message = message.reply_to or (
                Message.objects.filter(
                    conversation=conversation, role=Message.Role.USER, id__lt=message.pk
                )
                .order_by("-id")
                .first()
            )
        if user_message is None:
            raise ApiError(
                400, "This answer replies to no user message.", code="nothing_to_regenerate"
            )
        _check_idle(conversation)
        check_answer_limits(user_id)
        answer = generation.create_answer(user_message, conversation)
    return answer, generation.history_for(user_message.pk)


@api_view(("POST",))
async def regenerate(request: HttpRequest, pk: int) -> HttpResponse:
    answer, history = await sync_to_async(_regenerate)(request.user.pk, pk)
    generation.launch(answer, history)
    return JsonResponse(
        {"assistant_message": message_json(answer), "stream_url": stream_url(answer.pk)},
        status=201,
    )
