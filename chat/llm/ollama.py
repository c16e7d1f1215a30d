"""Ollama's streaming chat API: ``POST /api/chat`` answered with NDJSON lines."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx

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

DEFAULT_URL = "http://127.0.0.1:11434"
DEFAULT_MODEL = "llama3.2"


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
                async for lines in read_lines(response):
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
