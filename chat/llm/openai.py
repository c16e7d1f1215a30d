"""Any OpenAI-compatible ``POST /v1/chat/completions`` stream (Server-Sent Events)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec

from .base import (
    HTTPBackend,
    LLMError,
    Usage,
    as_count,
    clean_messages,
    parse_json,
    read_lines,
    upstream_error_message,
)

DEFAULT_URL = "https://api.openai.com"
DEFAULT_MODEL = "gpt-4o-mini"
MAX_WHOLE_ANSWER = 16 * 1024 * 1024  # bytes of a non-streamed answer


class _Delta(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None
    index: int = 0
    finish_reason: Any = None


class _TextChunk(msgspec.Struct):
    """The usual ``chat.completion.chunk``, decoded without building dicts: its
    choices, and whether it carries anything else (usage, an error), which
    ``_read_chunk`` reads."""

    choices: list[_Choice]
    usage: Any = msgspec.UNSET
    error: Any = msgspec.UNSET


_decode_text_chunk = msgspec.json.Decoder(_TextChunk).decode


@dataclass
class SSEEvent:
    event: str = "message"
    data: str = ""


@dataclass
class SSEParser:
    """An incremental parser of ``text/event-stream`` lines (WHATWG rules).

    Feed it lines without their line ending; it returns an event when a blank
    line ends one that has data. Comments (``:``), ``id``, ``retry`` and
    unknown fields are ignored.
    """

    _data: list[str] = field(default_factory=list)
    _event: str = ""

    def feed(self, line: str) -> SSEEvent | None:
        if line == "":
            if not self._data:
                self._event = ""
                return None
            event = SSEEvent(self._event or "message", "\n".join(self._data))
            self._data, self._event = [], ""
            return event
        if line.startswith(":"):
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        return None

    def feed_lines(self, lines: list[str]) -> list[tuple[str, str]]:
        """:meth:`feed` for many lines at once: the ``(event, data)`` of each event they end."""
        events: list[tuple[str, str]] = []
        data = self._data
        for line in lines:
            if not line:
                if data:
                    events.append((self._event or "message", "\n".join(data)))
                    data = self._data = []
                self._event = ""
            elif line.startswith("data:"):  # nearly every line: the fast path
                value = line[5:]
                data.append(value[1:] if value[:1] == " " else value)
            elif line[0] != ":":
                name, colon, value = line.partition(":")
                if colon and value.startswith(" "):
                    value = value[1:]
                if name == "data":
                    data.append(value)
                elif name == "event":
                    self._event = value
        return events

    def pending(self) -> SSEEvent | None:
        """The event still being built when the stream ended (not dispatched by the spec)."""
        if not self._data:
            return None
        return SSEEvent(self._event or "message", "\n".join(self._data))


class OpenAIBackend(HTTPBackend):
    """Streams answers from OpenAI or a server that speaks its chat completions API."""

    name = "openai"

    @property
    def endpoint(self) -> str:
        url = self.url
        if url.endswith("/chat/completions"):
            return url
        if url.endswith("/v1"):
            return f"{url}/chat/completions"
        return f"{url}/v1/chat/completions"

    def _headers(self) -> dict[str, str]:
        headers = super()._headers()
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    async def stream_batches(self, messages: list[dict]) -> AsyncIterator[list[str | Usage]]:
        payload = {
            "model": self.model,
            "messages": clean_messages(messages),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        try:
            async with self.post_stream(payload) as response:
                if response.status_code >= 400:
                    raise await self.status_error(response)
                if response.status_code != 200:
                    raise LLMError(
                        f"The model server answered {response.status_code} instead of a stream."
                    )
                content_type = response.headers.get("content-type", "").lower()
                if content_type.startswith("application/json"):
                    # A server that ignored "stream": a whole chat.completion, or an error.
                    async for piece in self._whole_answer(response):
                        yield [piece]
                    return
                async for batch in self._sse_answer(response):
                    yield batch
        except LLMError:
            raise
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise self.transport_error(exc) from exc

    async def _sse_answer(self, response: httpx.Response) -> AsyncIterator[list[str | Usage]]:
        """One list of text pieces per network read; the usage (if any) last."""
        parser = SSEParser()
        usage: Usage | None = None
        done = finished = False
        async for lines in read_lines(response):
            pieces: list[str | Usage] = []
            try:
                for event, data in parser.feed_lines(lines):
                    if data.strip() == "[DONE]":
                        done = True
                        break
                    text, chunk_usage, chunk_finished = self._parse_chunk(event, data)
                    if text:
                        pieces.append(text)
                    usage = chunk_usage or usage
                    finished = finished or chunk_finished
            except LLMError:
                if pieces:
                    yield pieces  # the text before the bad frame arrives first
                raise
            if pieces:
                yield pieces
            if done:
                break
        else:
            # The body ended: accept a last frame that lacked its blank line.
            event = parser.pending()
            if event is not None:
                if event.data.strip() == "[DONE]":
                    done = True
                else:
                    text, chunk_usage, chunk_finished = self._chunk(event)
                    if text:
                        yield [text]
                    usage = chunk_usage or usage
                    finished = finished or chunk_finished
        if not (done or finished):
            raise self.ended_early()
        if usage is not None:
            yield [usage]

    def _chunk(self, event: SSEEvent) -> tuple[str, Usage | None, bool]:
        """Text, usage and whether a choice finished, from one ``chat.completion.chunk``."""
        return self._parse_chunk(event.event, event.data)

    def _parse_chunk(self, event: str, raw: str) -> tuple[str, Usage | None, bool]:
        if event == "message":
            read = _text_of_chunk(raw)
            if read is not None:
                return read
        return self._read_chunk(event, raw)

    def _read_chunk(self, event: str, raw: str) -> tuple[str, Usage | None, bool]:
        try:
            data = parse_json(raw)
        except ValueError:
            if event == "error":
                raise LLMError(upstream_error_message(raw)) from None
            raise self.malformed(raw) from None
        if not isinstance(data, dict):
            raise self.malformed(raw)
        if data.get("error") is not None or event == "error":
            raise LLMError(upstream_error_message(data.get("error", data)))
        choices = data.get("choices")
        usage = _usage(data.get("usage"))
        if not isinstance(choices, list) or (not choices and usage is None):
            raise self.malformed(raw)
        text = ""
        finished = False
        for choice in choices:
            if not isinstance(choice, dict):
                raise self.malformed(raw)
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            if delta is None:
                delta = {}
            if not isinstance(delta, dict):
                raise self.malformed(raw)
            content = delta.get("content")
            if content is not None and not isinstance(content, str):
                raise self.malformed(raw)
            text += content or ""
            if choice.get("finish_reason"):
                finished = True
        return text, usage, finished

    async def _whole_answer(self, response: httpx.Response) -> AsyncIterator[str | Usage]:
        body = b""
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > MAX_WHOLE_ANSWER:
                raise LLMError("The model server sent an answer that is far too long.")
        text = body.decode("utf-8", errors="replace")
        try:
            data = json.loads(text)
        except ValueError:
            raise self.malformed(text) from None
        if not isinstance(data, dict):
            raise self.malformed(text)
        if data.get("error") is not None:
            raise LLMError(upstream_error_message(data["error"]))
        choices = data.get("choices")
        try:
            content = choices[0]["message"]["content"]  # type: ignore[index]
        except (TypeError, KeyError, IndexError):
            raise self.malformed(text) from None
        if content is not None and not isinstance(content, str):
            raise self.malformed(text)
        if content:
            yield content
        usage = _usage(data.get("usage"))
        if usage is not None:
            yield usage


def _usage(value: Any) -> Usage | None:
    if not isinstance(value, dict):
        return None
    return Usage(
        prompt_tokens=as_count(value.get("prompt_tokens")),
        completion_tokens=as_count(value.get("completion_tokens")),
    )


def _text_of_chunk(raw: str) -> tuple[str, None, bool] | None:
    """What ``_read_chunk`` makes of a usual chunk (text, no usage, whether a choice
    finished), from one decode into a typed struct (no dict built: about half the
    CPU of a frame's ``parse_json`` and the look-ups in its dicts). None when it is
    anything else (usage, an error, no choices, a value of another type, anything
    msgspec refuses): ``_read_chunk`` then reads it, so every error comes out as it
    always has."""
    try:
        chunk = _decode_text_chunk(raw)
    except msgspec.MsgspecError:
        return None
    if not chunk.choices or chunk.error is not msgspec.UNSET:
        return None
    if chunk.usage is not None and chunk.usage is not msgspec.UNSET:  # null in most chunks
        return None
    text = ""
    finished = False
    for choice in chunk.choices:
        if choice.index != 0:
            continue
        delta = choice.delta
        if delta is not None and delta.content:
            text += delta.content
        if choice.finish_reason:
            finished = True
    return text, None, finished
