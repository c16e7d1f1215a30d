"""Ollama's streaming chat API: ``POST /api/chat`` answered with NDJSON lines."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec

from .base import (
    HTTPBackend,
    LLMError,
    Usage,
    as_count,
    clean_messages,
    line_chunks,
    parse_json,
    upstream_error_message,
)

DEFAULT_URL = "http://127.0.0.1:11434"
DEFAULT_MODEL = "llama3.2"


class _Message(msgspec.Struct):
    content: str


class _TextLine(msgspec.Struct):
    """The usual line of an answer, decoded without building a dict: its text, and
    whether it is anything else (the last line, an error), which ``_parse`` reads."""

    message: _Message
    done: bool = False
    error: Any = msgspec.UNSET


_decode_text_line = msgspec.json.Decoder(_TextLine).decode


class OllamaBackend(HTTPBackend):
    """Streams answers from an Ollama server.

    Each line of the answer is a JSON object such as
    ``{"message": {"role": "assistant", "content": "Hel"}, "done": false}``; the
    last one has ``"done": true`` and the token counts ``prompt_eval_count`` and
    ``eval_count``. A line ``{"error": "..."}`` reports a failure.
    """

    name = "ollama"

    @property
    def endpoint(self) -> str:
        url = self.url
        if url.endswith("/api/chat"):
            return url
        if url.endswith("/api"):
            return f"{url}/chat"
        return f"{url}/api/chat"

    def _headers(self) -> dict[str, str]:
        headers = super()._headers()
        if self.api_key:  # Ollama behind an authenticating proxy
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    async def stream_batches(self, messages: list[dict]) -> AsyncIterator[list[str | Usage]]:
        payload = {
            "model": self.model,
            "messages": clean_messages(messages),
            "stream": True,
        }
        try:
            async with self.post_stream(payload) as response:
                if response.status_code >= 400:
                    raise await self.status_error(response)
                if response.status_code != 200:
                    raise LLMError(
                        f"The model server answered {response.status_code} instead of a stream."
                    )
                # One batch per network read: its lines parsed in one go, and what came
                # before a bad line is handed out before the error.
                async for lines in line_chunks(response):
                    if lines.__class__ is bytes:
                        pieces = _text_of(lines)
                        if pieces is not None:  # only text lines: the usual read
                            if pieces:
                                yield pieces
                            continue
                        lines = lines.decode("utf-8", "replace").split("\n")
                    pieces, error, done = self._parse(lines)
                    if pieces:
                        yield pieces
                    if error is not None:
                        raise error
                    if done:
                        return
                raise self.ended_early()
        except LLMError:
            raise
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise self.transport_error(exc) from exc

    def _parse(self, lines: list[str]) -> tuple[list[str | Usage], LLMError | None, bool]:
        """The pieces of some NDJSON lines, the error that stopped them, and whether the
        last line (``"done": true``) was among them."""
        pieces: list[str | Usage] = []
        append = pieces.append
        for line in lines:
            if not line or line.isspace():
                continue
            try:
                data = parse_json(line)
            except ValueError:
                return pieces, self.malformed(line), False
            if data.__class__ is not dict:
                return pieces, self.malformed(line), False
            if "error" in data:
                return pieces, LLMError(upstream_error_message(data["error"])), False
            message = data.get("message")
            content = message.get("content") if message.__class__ is dict else None
            if data.get("done") is True:
                if content.__class__ is str and content:
                    append(content)
                if "prompt_eval_count" in data or "eval_count" in data:
                    append(
                        Usage(
                            prompt_tokens=as_count(data.get("prompt_eval_count")),
                            completion_tokens=as_count(data.get("eval_count")),
                        )
                    )
                return pieces, None, True
            if content.__class__ is not str:
                return pieces, self.malformed(line), False
            if content:
                append(content)
        return pieces, None, False


def _text_of(chunk: bytes) -> list[str] | None:
    """The text of the NDJSON lines in ``chunk`` if each is a usual text line (not the
    last, no error): one decode a line into a typed struct (half the CPU of a line's
    ``parse_json`` and the look-ups in its dict, and no text decoding and splitting
    first). None when one is anything else: ``_parse`` then reads them all, so every
    error and the end come out as they always have."""
    pieces = []
    try:
        for raw in chunk.split(b"\n"):
            if raw:
                line = _decode_text_line(raw)
                if line.done or line.error is not msgspec.UNSET:
                    return None
                text = line.message.content
                if text:
                    pieces.append(text)
    except msgspec.MsgspecError:  # not JSON as msgspec reads it, or another shape
        return None
    return pieces
