"""Ollama's streaming chat API: ``POST /api/chat`` answered with NDJSON lines."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx

from .base import (
    HTTPBackend,
    LLMError,
    Usage,
    as_count,
    clean_messages,
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

    async def stream(self, messages: list[dict]) -> AsyncIterator[str | Usage]:
        payload = {
            "model": self.model,
            "messages": clean_messages(messages),
            "stream": True,
        }
        try:
            async with self.client().stream("POST", self.endpoint, json=payload) as response:
                if response.status_code >= 400:
                    raise await self.status_error(response)
                if response.status_code != 200:
                    raise LLMError(
                        f"The model server answered {response.status_code} instead of a stream."
                    )
                async for line in response.aiter_lines():
                    if not line.strip():
                        continue
                    try:
                        data = json.loads(line)
                    except ValueError:
                        raise self.malformed(line) from None
                    if not isinstance(data, dict):
                        raise self.malformed(line)
                    if "error" in data:
                        raise LLMError(upstream_error_message(data["error"]))
                    message = data.get("message")
                    content = message.get("content") if isinstance(message, dict) else None
                    done = data.get("done")
                    if done is True:
                        if isinstance(content, str) and content:
                            yield content
                        if "prompt_eval_count" in data or "eval_count" in data:
                            yield Usage(
                                prompt_tokens=as_count(data.get("prompt_eval_count")),
                                completion_tokens=as_count(data.get("eval_count")),
                            )
                        return
                    if not isinstance(content, str):
                        raise self.malformed(line)
                    if content:
                        yield content
                raise self.ended_early()
        except LLMError:
            raise
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise self.transport_error(exc) from exc
