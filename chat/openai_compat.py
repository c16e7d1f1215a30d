"""OpenAI-compatible API over our own chat: ``POST /v1/chat/completions`` and ``GET /v1/models``.

A request is stored as a new conversation of the token's user (its ``messages``
become Messages; ``system``/``developer`` ones only reach the model, as the chat
stores no such role) and answered by :func:`chat.generation.start_answer`, exactly
like a message posted on the chat page: same backend, same chunking, same
storage, visible in the chat page and the admin while it streams. The answer is
read back from the message's event channel (so it does not matter which worker
generates it) and converted to OpenAI's shapes:

- without ``stream``: one ``chat.completion`` object once the answer is done;
- with ``"stream": true``: ``data: {chat.completion.chunk}`` frames (a first
  chunk with the role, content deltas, a last chunk with ``finish_reason``, a
  usage chunk when ``stream_options.include_usage``), then ``data: [DONE]``.

Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``.
An answer that fails before any text answers 502 (a stream waits for its first
text, or the end, for one keep-alive interval at most before it starts); a
failure once the stream has started ends it with a ``data: {"error": ...}``
frame and ``data: [DONE]`` (the ``openai`` client raises ``APIError`` with the
message). Without ``stream``, any failure is a 502. A client that disconnects
leaves the answer running, unless the setting ``SSECHAT_OPENAI_CANCEL_ON_DISCONNECT``
is on (then it is cancelled, as by the chat's Stop).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import transaction
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt

from ssechat.api import ApiError, parse_json_body
from ssechat.streams.db import spawn
from ssechat.streams.hub import StoredEvent
from ssechat.streams.stream import KEEPALIVE_ITEM, EventStream
from ssechat.streams.wire import dumps

from . import generation, limits
from .llm import get_backend
from .models import Conversation, Message

logger = logging.getLogger("chat.openai")

# Roles a request may use; "developer" is OpenAI's newer name for "system".
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
UNSUPPORTED_ROLES = ("tool", "function")
MAX_REQUEST_MESSAGES = 1000
DONE_FRAME = b"data: [DONE]\n\n"
KEEPALIVE_FRAME = b": keep-alive\n\n"
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
STREAM_CONTENT_TYPE = "text/event-stream; charset=utf-8"


# -- errors ------------------------------------------------------------------------


class OpenAIError(Exception):
    """Raised inside these views to answer ``{"error": {...}}`` with a status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.retry_after: int | None = None

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, code=self.code, param=self.param)

    def response(self) -> JsonResponse:
        response = openai_error(
            self.status, self.message, type=self.type, code=self.code, param=self.param
        )
        if self.retry_after is not None:
            response["Retry-After"] = str(self.retry_after)
        return response


def error_body(
    message: str, *, type: str = "invalid_request_error", code: str | None = None,
    param: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def openai_error(
    status: int, message: str, *, type: str = "invalid_request_error",
    code: str | None = None, param: str | None = None,
) -> JsonResponse:  # fmt: skip
    """An error response in OpenAI's shape."""
    response = JsonResponse(error_body(message, type=type, code=code, param=param), status=status)
    if status == 401:
        response["WWW-Authenticate"] = 'Bearer realm="ssechat"'
    return response


def from_api_error(exc: ApiError) -> OpenAIError:
    """The body parser's contract-shaped error, in OpenAI's shape."""
    codes = {413: "request_too_large", 415: "unsupported_media_type"}
    code = codes.get(exc.status, exc.code if exc.code != "bad_request" else None)
    return OpenAIError(exc.status, exc.detail, code=code)


def authentication_error() -> OpenAIError:
    return OpenAIError(
        401,
        "You didn't provide a valid API key. Send it as 'Authorization: Bearer <token>' "
        "(python manage.py create_api_token <username> makes one).",
        code="invalid_api_key",
    )


# -- the request ---------------------------------------------------------------------


@dataclass
class ChatRequest:
    """A validated ``/v1/chat/completions`` body."""

    messages: list[tuple[str, str]]  # (role, content): role is system, user or assistant
    model: str | None = None
    stream: bool = False
    include_usage: bool = False


def _content_text(content: Any, index: int) -> str:
    """A message's text: a string, or a list of ``{"type": "text", "text"}`` parts."""
    param = f"messages[{index}].content"
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise OpenAIError(
                    400, f"Only text content parts are supported; {param} has {kind!r}.",
                    param=param, code="unsupported_content",
                )  # fmt: skip
            text = part.get("text")
            if not isinstance(text, str):
                raise OpenAIError(400, f"{param}: a text part needs a string 'text'.", param=param)
            texts.append(text)
        return "\n".join(texts)
    raise OpenAIError(
        400, f"{param} must be a string or a list of text parts.", param=param,
        code="invalid_type",
    )  # fmt: skip


def _check_text(text: str, index: int, max_chars: int | None) -> str:
    """Text every database can store, within the chat's length limit (as OpenAI words it)."""
    param = f"messages[{index}].content"
    if max_chars is not None and max_chars > 0 and len(text) > max_chars:
        raise OpenAIError(
            400, f"Invalid '{param}': string too long. Expected a string with maximum length "
            f"{max_chars}, but got a string with length {len(text)} instead.",
            param=param, code="string_above_max_length",
        )  # fmt: skip
    if "\x00" in text:
        raise OpenAIError(400, f"'{param}' must not contain NUL characters.", param=param)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise OpenAIError(400, f"'{param}' is not valid Unicode text.", param=param) from None
    return text


def parse_chat_request(body: dict[str, Any], *, max_chars: int | None = None) -> ChatRequest:
    """Validate a request body; raise :class:`OpenAIError` (400, 413) naming what is wrong."""
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise OpenAIError(400, "'model' must be a string.", param="model", code="invalid_type")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise OpenAIError(400, "'stream' must be a boolean.", param="stream", code="invalid_type")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise OpenAIError(
                400, "'stream_options' must be an object.", param="stream_options",
                code="invalid_type",
            )  # fmt: skip
        include_usage = options.get("include_usage", False)
        if include_usage is None:
            include_usage = False
        if not isinstance(include_usage, bool):
            raise OpenAIError(
                400, "'stream_options.include_usage' must be a boolean.",
                param="stream_options.include_usage", code="invalid_type",
            )  # fmt: skip
    n = body.get("n")
    if n is not None and n != 1:
        raise OpenAIError(400, "Only n=1 is supported.", param="n", code="unsupported_value")

    if "messages" not in body or body["messages"] is None:
        raise OpenAIError(
            400, "Missing required parameter: 'messages'.", param="messages",
            code="missing_required_parameter",
        )  # fmt: skip
    raw = body["messages"]
    if not isinstance(raw, list):
        raise OpenAIError(
            400, "'messages' must be an array.", param="messages", code="invalid_type"
        )
    if not raw:
        raise OpenAIError(
            400, "'messages' must contain at least one message.", param="messages",
            code="empty_array",
        )  # fmt: skip
    if len(raw) > MAX_REQUEST_MESSAGES:
        raise OpenAIError(
            413, f"Too many messages: at most {MAX_REQUEST_MESSAGES} are accepted.",
            param="messages", code="request_too_large",
        )  # fmt: skip
    messages: list[tuple[str, str]] = []
    for index, item in enumerate(raw):
        if not isinstance(item, dict):
            raise OpenAIError(
                400, f"messages[{index}] must be an object.", param=f"messages[{index}]",
                code="invalid_type",
            )  # fmt: skip
        role = item.get("role")
        param = f"messages[{index}].role"
        if role is None:
            raise OpenAIError(
                400, f"Missing required parameter: '{param}'.", param=param,
                code="missing_required_parameter",
            )  # fmt: skip
        if role in UNSUPPORTED_ROLES:
            raise OpenAIError(
                400, f"Invalid value for '{param}': {role!r} messages (tool calls) are not "
                "supported; use 'system', 'developer', 'user' or 'assistant'.",
                param=param, code="invalid_value",
            )  # fmt: skip
        if not isinstance(role, str) or role not in ROLES:
            raise OpenAIError(
                400, f"Invalid value for '{param}': {role!r}. Supported values are: "
                "'system', 'developer', 'user' and 'assistant'.",
                param=param, code="invalid_value",
            )  # fmt: skip
        text = _check_text(_content_text(item.get("content"), index), index, max_chars)
        messages.append((ROLES[role], text))
    if messages[-1][0] != "user":
        raise OpenAIError(
            400, "The last message must have role 'user': it is the one answered.",
            param=f"messages[{len(messages) - 1}].role", code="invalid_value",
        )  # fmt: skip
    if not messages[-1][1].strip():
        raise OpenAIError(
            400, "The last user message is empty.", param=f"messages[{len(messages) - 1}].content",
            code="invalid_value",
        )  # fmt: skip
    # Sampling options (temperature, max_tokens, ...) are ignored: the chat's model settings rule.
    return ChatRequest(messages=messages, model=model, stream=stream, include_usage=include_usage)


# -- the answer, in OpenAI's shapes ------------------------------------------------------


def estimate_tokens(text: str) -> int:
    """About four characters a token: for backends that report no usage."""
    return math.ceil(len(text) / 4) if text else 0


def usage_json(
    usage: dict[str, Any] | None, *, prompt: list[tuple[str, str]], content: str
) -> dict[str, int]:
    """OpenAI's usage object: the model's counts, or estimates when it reported none."""
    prompt_tokens = completion_tokens = None
    if isinstance(usage, dict):
        prompt_tokens = usage.get("prompt_tokens")
        completion_tokens = usage.get("completion_tokens")
    if not isinstance(prompt_tokens, int):
        prompt_tokens = sum(estimate_tokens(text) + 4 for _, text in prompt)
    if not isinstance(completion_tokens, int):
        completion_tokens = estimate_tokens(content)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@dataclass
class Completion:
    """Builds the ``chat.completion`` object and ``chat.completion.chunk`` frames of one answer."""

    id: str
    created: int
    model: str
    include_usage: bool = False

    def _base(self, object: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
        }

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        data = self._base("chat.completion.chunk")
        data["choices"] = [
            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        ]
        if self.include_usage:
            data["usage"] = None
        return data

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        data = self._base("chat.completion.chunk")
        data["choices"] = []
        data["usage"] = usage
        return data

    def completion(
        self, content: str, usage: dict[str, int], finish_reason: str = "stop"
    ) -> dict[str, Any]:
        data = self._base("chat.completion")
        data["choices"] = [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": None},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ]
        data["usage"] = usage
        return data


def frame(data: dict[str, Any]) -> bytes:
    """One ``data: <json>`` frame (JSON never holds a raw line break)."""
    return b"data: " + dumps(data).encode("utf-8", "surrogatepass") + b"\n\n"


def models_list(model: str) -> dict[str, Any]:
    return {"object": "list", "data": [model_json(model)]}


def model_json(model: str) -> dict[str, Any]:
    # The configured model has no creation time of its own: 0 says "unknown".
    return {"id": model, "object": "model", "created": 0, "owned_by": "ssechat"}


# -- views ---------------------------------------------------------------------------------


def _model_name() -> str:
    return get_backend().model


def _bearer_user(request: HttpRequest):
    """The token's user; only a Bearer token counts here (a session cookie does not)."""
    if not getattr(request, "auth_token", False):
        raise authentication_error()
    user = request.user
    if not user.is_authenticated:
        raise authentication_error()
    return user


def _method_not_allowed(request: HttpRequest, allowed: str) -> JsonResponse:
    response = openai_error(
        405, f"{request.method} is not allowed here; use {allowed}.", code="method_not_allowed"
    )
    response["Allow"] = allowed
    return response


def _cancel_on_disconnect() -> bool:
    return bool(getattr(settings, "SSECHAT_OPENAI_CANCEL_ON_DISCONNECT", False))


@csrf_exempt
async def models(request: HttpRequest) -> HttpResponse:
    if request.method != "GET":
        return _method_not_allowed(request, "GET")
    try:
        _bearer_user(request)
    except OpenAIError as exc:
        return exc.response()
    return JsonResponse(models_list(_model_name()))


@csrf_exempt
async def model_detail(request: HttpRequest, model: str) -> HttpResponse:
    if request.method != "GET":
        return _method_not_allowed(request, "GET")
    try:
        _bearer_user(request)
    except OpenAIError as exc:
        return exc.response()
    name = _model_name()
    if model != name:
        return openai_error(
            404, f"The model {model!r} does not exist; this server serves {name!r}.",
            param="model", code="model_not_found",
        )  # fmt: skip
    return JsonResponse(model_json(name))


@csrf_exempt
async def not_found(request: HttpRequest) -> HttpResponse:
    return openai_error(404, f"Unknown URL: {request.method} {request.path}.", code="unknown_url")


# -- POST /v1/chat/completions ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Delta:
    text: str


@dataclass(frozen=True, slots=True)
class Done:
    message: dict[str, Any]  # the final Message JSON


class Keepalive:
    __slots__ = ()


KEEPALIVE = Keepalive()


async def answer_events(
    stream: EventStream, message_id: int
) -> AsyncIterator[Delta | Done | Keepalive]:
    """The answer's deltas, then its ``done``, read from its channel from the start."""
    async for item in stream:
        if item.__class__ is StoredEvent:
            payload = item.payload()
            if item.type == "delta" and payload.get("message_id") == message_id:
                if payload.get("text"):
                    yield Delta(payload["text"])
            elif item.type == "done" and payload.get("id") == message_id:
                yield Done(payload)
                return
        elif item is KEEPALIVE_ITEM:
            yield KEEPALIVE


def _read_body(request: HttpRequest) -> dict[str, Any]:
    try:
        return parse_json_body(request)
    except ApiError as exc:
        raise from_api_error(exc) from exc


@csrf_exempt
async def chat_completions(request: HttpRequest) -> HttpResponse:
    if request.method != "POST":
        return _method_not_allowed(request, "POST")
    try:
        user = _bearer_user(request)
        body = _read_body(request)
        chat_request = parse_chat_request(body, max_chars=limits.max_message_chars())
        try:
            conversation, user_message = await sync_to_async(store_request)(user.pk, chat_request)
        except limits.LimitExceeded as exc:
            raise rate_limited(exc) from exc
        # The same path as a message posted on the chat page; the model gets the request's
        # messages as sent (system messages included).
        history = [{"role": role, "content": text} for role, text in chat_request.messages]
        # Shielded: a client that leaves now must not leave a row that never starts.
        answer = await asyncio.shield(
            generation.start_answer(user_message, conversation=conversation, history=history)
        )
        return await _respond(user, chat_request, answer)
    except OpenAIError as exc:
        return exc.response()


def rate_limited(exc: limits.LimitExceeded) -> OpenAIError:
    error = OpenAIError(429, exc.detail, type="requests", code="rate_limit_exceeded")
    error.retry_after = exc.retry_after
    return error


def store_request(user_id: int, chat_request: ChatRequest) -> tuple[Conversation, Message]:
    """A new conversation of ``user_id`` holding the request's messages; the last user one
    is returned (the answer replies to it). 429 (``LimitExceeded``) over the chat's limits."""
    stored_roles = set(Message.Role.values)  # the chat stores no "system" messages (yet)
    *history, (_, last) = chat_request.messages
    first_user = next(text for role, text in chat_request.messages if role == "user")
    now = timezone.now()
    with transaction.atomic():
        limits.check_answer_limits(user_id)
        conversation = Conversation.objects.create(
            owner_id=user_id, title=generation.make_title(first_user), created_at=now,
            updated_at=now,
        )  # fmt: skip
        # No snapshots for the history: nobody follows a conversation that did not exist.
        Message.objects.bulk_create(
            Message(
                conversation=conversation,
                role=role,
                content=text,
                status=Message.Status.COMPLETE,
                created_at=now,
                completed_at=now,
            )
            for role, text in history
            if role in stored_roles
        )
        user_message = generation.create_user_message(conversation, last)
    return conversation, user_message


def _on_disconnect(message_id: int) -> None:
    """The client went away before the end: the answer goes on, or is cancelled if so set."""
    if _cancel_on_disconnect():
        logger.info("answer %s: client gone, cancelling it", message_id)
        spawn(generation.cancel_answer(message_id), name=f"chat-openai-cancel-{message_id}")
    else:
        logger.info("answer %s: client gone, the answer goes on", message_id)


async def _respond(user, chat_request: ChatRequest, answer: Message) -> HttpResponse:
    completion = Completion(
        id=f"chatcmpl-{answer.pk}",
        created=int(answer.created_at.timestamp()),
        model=_model_name(),
        include_usage=chat_request.stream and chat_request.include_usage,
    )
    channel = generation.message_channel(answer.pk)
    stream = EventStream([channel], None, from_start=True, user_id=user.pk)
    events = answer_events(stream, answer.pk)
    handed_over = False
    try:
        first: Delta | Done | Keepalive | None = None
        # A stream waits for the first text (or the end) before answering, so that an
        # answer that fails at once is a plain 502 rather than a stream with an error in
        # it; but no longer than a keep-alive interval, so that a slow model does not
        # leave the connection silent. Without "stream" the answer is awaited whole.
        texts: list[str] = []
        async for event in events:
            if chat_request.stream:
                first = event
                break
            if event is KEEPALIVE:
                continue
            if isinstance(event, Delta):
                texts.append(event.text)
            else:
                first = event
                break
        if first is None:
            raise _ended_early()
        if isinstance(first, Done):
            _raise_failure(first.message)
        if not chat_request.stream:
            final = first.message
            content = final.get("content", "".join(texts))
            usage = usage_json(final.get("usage"), prompt=chat_request.messages, content=content)
            return JsonResponse(completion.completion(content, usage))
        response = StreamingHttpResponse(
            _frames(completion, chat_request, answer.pk, first, events, stream),
            content_type=STREAM_CONTENT_TYPE,
            headers=STREAM_HEADERS,
        )
        handed_over = True
        return response
    except asyncio.CancelledError:
        # The client went away while we waited (Django cancels the view).
        _on_disconnect(answer.pk)
        raise
    finally:
        if not handed_over:
            await events.aclose()
            stream.close()


def _failure_message(message: dict[str, Any]) -> str:
    return message.get("error") or "The answer failed."


def _raise_failure(message: dict[str, Any]) -> None:
    """502 for an answer that failed before anything was sent to the client."""
    if message.get("status") == "failed":
        raise OpenAIError(
            502, _failure_message(message), type="server_error", code="upstream_error"
        )


def _ended_early() -> OpenAIError:
    return OpenAIError(
        503,
        "The server closed this stream before the answer was finished (it is restarting, "
        "or the API token was revoked).",
        type="server_error",
        code="service_unavailable",
    )


async def _frames(
    completion: Completion,
    chat_request: ChatRequest,
    message_id: int,
    first: Delta | Done | Keepalive,
    events: AsyncIterator[Delta | Done | Keepalive],
    stream: EventStream,
) -> AsyncIterator[bytes]:
    """The ``chat.completion.chunk`` frames of an answer, ending with ``data: [DONE]``."""
    finished = False
    texts: list[str] = []
    try:
        yield frame(completion.chunk({"role": "assistant", "content": ""}))
        event: Delta | Done | Keepalive | None = first
        while event is not None:
            if isinstance(event, Delta):
                texts.append(event.text)
                yield frame(completion.chunk({"content": event.text}))
            elif isinstance(event, Done):
                finished = True
                message = event.message
                if message.get("status") == "failed":
                    # The openai client raises APIError with this message.
                    yield frame(
                        error_body(
                            _failure_message(message), type="server_error", code="upstream_error"
                        )
                    )
                    yield DONE_FRAME
                    return
                yield frame(completion.chunk({}, "stop"))
                if completion.include_usage:
                    content = message.get("content", "".join(texts))
                    usage = usage_json(
                        message.get("usage"), prompt=chat_request.messages, content=content
                    )
                    yield frame(completion.usage_chunk(usage))
                yield DONE_FRAME
                return
            else:
                yield KEEPALIVE_FRAME
            event = await anext(events, None)
        # The stream closed under us (shutdown, maximum lifetime, revoked token).
        finished = True
        yield frame(_ended_early().body())
        yield DONE_FRAME
    finally:
        if not finished:
            _on_disconnect(message_id)
        await events.aclose()
        stream.close()
