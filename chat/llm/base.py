"""The interface every language-model backend implements, and shared HTTP plumbing.

A backend turns a conversation (a list of ``{"role", "content"}`` dicts) into an
async stream of text pieces, optionally followed by one :class:`Usage`. Any
failure of the model server is raised as :class:`LLMError`, whose ``str()`` is a
short sentence that can be shown to the user as is.
"""

from __future__ import annotations

import abc
import asyncio
import codecs
import json
import os
import re
import socket
import ssl
import threading
from collections.abc import AsyncIterable, AsyncIterator, Callable
from contextlib import aclosing
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

__all__ = ["Backend", "HTTPBackend", "LLMError", "Usage", "next_take"]

# When the text streamed in this context is next taken (loop time): set by the
# answer's generation to its next flush tick. A reader may then hold what a fast
# model sends until just before that moment, since the text would wait for that
# tick anyway: one wake-up of the reading task per tick instead of one every few
# network reads. None (the default): hand text over as it comes.
next_take: ContextVar[Callable[[], float] | None] = ContextVar("next_take", default=None)


@dataclass(frozen=True)
class Usage:
    """Token counts of one answer, as reported by the model server."""

    prompt_tokens: int
    completion_tokens: int


class LLMError(Exception):
    """The model server failed; ``str(exc)`` is a readable, user-facing message."""


class Backend(abc.ABC):
    """A language model that streams answers."""

    name: str = ""
    model: str = ""

    @abc.abstractmethod
    def stream(self, messages: list[dict]) -> AsyncIterator[str | Usage]:
        """Stream the answer to ``messages`` (the whole conversation, oldest first).

        Yields text pieces as they arrive, then possibly one :class:`Usage`.
        Raises :class:`LLMError` on any failure of the model server.
        """

    async def stream_batches(self, messages: list[dict]) -> AsyncIterator[list[str | Usage]]:
        """The pieces of :meth:`stream` in lists: whatever arrived together (HTTP
        backends: one list per network read), so a fast model costs one hop per read,
        not per token. Pieces before a failure are yielded before :class:`LLMError`."""
        async with aclosing(self.stream(messages)) as pieces:
            async for piece in pieces:
                yield [piece]

    async def aclose(self) -> None:  # noqa: B027 - optional hook, nothing to do by default
        """Release resources held for the running event loop (optional)."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} model={self.model!r}>"


# ---------------------------------------------------------------------------
# Shared HTTP plumbing of the ollama and openai backends.


def parse_json(text: str) -> Any:
    """``json.loads(text)``, in about half the time: a model line is a token here, and
    a fast model's lines are most of the CPU of reading it.

    orjson parses what it accepts as ``json`` does, but for integers beyond 64 bits,
    which it reads as floats (no model server sends one: its numbers are token
    counts). What it refuses (NaN, Infinity, lone surrogates, and anything invalid)
    goes to ``json.loads``: the same texts are accepted, and the rest raise
    ``ValueError``.
    """
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


class LineSplitter:
    """Splits a byte stream into text lines, read by read.

    Lines end with LF, CRLF or a lone CR (what both NDJSON and SSE accept); the
    unterminated tail is kept for the next read. Invalid UTF-8 becomes U+FFFD, as
    httpx's own text decoding does.
    """

    __slots__ = ("_decode", "_tail")

    def __init__(self, encoding: str = "utf-8") -> None:
        self._decode = codecs.getincrementaldecoder(encoding)(errors="replace").decode
        self._tail = ""

    def feed(self, data: bytes, final: bool = False) -> list[str]:
        """The lines completed by ``data`` (all that is left when ``final``)."""
        text = self._decode(data, final)
        if self._tail:
            text = self._tail + text
        held = ""
        if "\r" in text:
            if text[-1] == "\r" and not final:
                text, held = text[:-1], "\r"  # maybe the first half of a CRLF
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        lines = text.split("\n")
        tail = lines.pop()
        if final:
            self._tail = ""
            if tail:
                lines.append(tail)
        else:
            self._tail = tail + held
        return lines


async def split_lines(source: AsyncIterable[bytes], encoding: str) -> AsyncIterator[list[str]]:
    """The lines of a byte stream, one list per read (never an empty list)."""
    feed = LineSplitter(encoding).feed
    async for data in source:
        lines = feed(data)
        if lines:
            yield lines
    lines = feed(b"", True)
    if lines:
        yield lines


def body_chunks(response: Any) -> AsyncIterator[bytes]:
    """A streamed body's bytes (content coding undone), a network read at a time."""
    if not isinstance(response, httpx.Response):
        return response.aiter_bytes()  # rawhttp's: de-chunked, one piece per wake-up
    if response.headers.get("content-encoding", "identity").strip().lower() in ("", "identity"):
        # Nothing to decode: read the transport's stream itself, two generator layers
        # (aiter_bytes, aiter_raw) fewer per network read. httpx's exception mapping
        # lives in that stream, so errors are the same.
        return response.stream  # type: ignore[return-value]
    return response.aiter_bytes()


def read_lines(response: Any) -> AsyncIterator[list[str]]:
    """The lines of a streamed body, one list per network read (never empty lists)."""
    return split_lines(body_chunks(response), response.encoding or "utf-8")


async def line_chunks(response: Any) -> AsyncIterator[bytes | list[str]]:
    """A streamed body's complete lines, a network read at a time, for a parser that
    can take them whole: as the bytes of those lines (each ending with LF, but maybe
    the last line of the body) while the body is UTF-8 with LF line ends, which it
    may then split and decode itself; else as :func:`read_lines` gives them (a
    charset other than UTF-8, or a CR, which ends a line too, from the read that
    has one on). Decoding the bytes with ``errors="replace"`` and splitting them at
    LF gives the lines :func:`read_lines` would (with an empty string last).
    """
    encoding = response.encoding or "utf-8"
    if codecs.lookup(encoding).name != "utf-8":
        async for lines in read_lines(response):
            yield lines
        return
    held = b""  # an unterminated line, waiting for the rest of it
    source = body_chunks(response)
    async for data in source:
        if held:
            data = held + data
        if b"\r" in data:
            # A line splitter from here on: the lines before this read are complete.
            async for lines in split_lines(_prepend(data, source), encoding):
                yield lines
            return
        cut = data.rfind(b"\n") + 1
        held = data[cut:]
        if cut:
            yield data[:cut] if held else data
    if held:
        yield held


async def _prepend(first: bytes, rest: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    yield first
    async for data in rest:
        yield data


MAX_ERROR_BODY = 4096  # bytes of an error body read to build the message
MAX_SNIPPET = 200  # characters of it shown in the message
MAX_LINE_SNIPPET = 120


def _fmt_seconds(value: float | None) -> str:
    if value is None:
        return "ever"
    return f"{value:g} s"


def _snippet(text: str, limit: int = MAX_SNIPPET) -> str:
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[: limit - 1].rstrip() + "…"
    return text


def line_snippet(line: str) -> str:
    """A short, printable excerpt of a bad line for an error message."""
    return _snippet(repr(line)[1:-1], MAX_LINE_SNIPPET)


def _error_text(body: bytes) -> str:
    """The human part of an error body: a JSON error message, or the text itself."""
    text = body.decode("utf-8", errors="replace").strip()
    if not text:
        return ""
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        parts: list[str] = []
        error = data.get("error")
        if isinstance(error, dict):
            message = error.get("message")
            parts.append(message if isinstance(message, str) else json.dumps(error))
        elif isinstance(error, str):
            parts.append(error)
        for key in ("detail", "message"):
            if isinstance(data.get(key), str) and data[key] not in parts:
                parts.append(data[key])
        if parts:
            return _snippet(": ".join(p for p in parts if p))
    elif isinstance(data, str):
        return _snippet(data)
    # Plain text or HTML: drop tags, keep the words.
    return _snippet(re.sub(r"<[^>]*>", " ", text))


def upstream_error_message(error: Any) -> str:
    """Message for an error object sent inside a stream (``{"error": ...}``)."""
    if isinstance(error, dict):
        message = error.get("message")
        text = message if isinstance(message, str) and message else json.dumps(error)
    elif isinstance(error, str):
        text = error
    else:
        text = json.dumps(error)
    return f"The model server reported an error: {_snippet(text) or 'no details'}"


_DNS_WORDS = ("name or service", "name resolution", "nodename", "getaddrinfo", "no address")
_ssl_lock = threading.Lock()
_ssl: ssl.SSLContext | None = None


def _ssl_context() -> ssl.SSLContext:
    """One default TLS context for every client (loading the CA bundle is slow)."""
    global _ssl
    with _ssl_lock:
        if _ssl is None:
            _ssl = httpx.create_ssl_context()
        return _ssl


def _has_cause(exc: BaseException, kinds: tuple[type[BaseException], ...]) -> bool:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, kinds):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


class HTTPBackend(Backend):
    """A backend that talks to a model server over HTTP with httpx.

    One ``httpx.AsyncClient`` is kept per running event loop (a client cannot be
    used from another loop), created on first use and reused by every stream of
    that loop.
    """

    def __init__(
        self,
        *,
        url: str,
        model: str,
        api_key: str = "",
        connect_timeout: float | None = 5.0,
        read_timeout: float | None = 60.0,
        max_connections: int = 256,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.model = model
        self.api_key = api_key
        self.connect_timeout = connect_timeout if connect_timeout and connect_timeout > 0 else None
        self.read_timeout = read_timeout if read_timeout and read_timeout > 0 else None
        self.max_connections = max_connections
        self._transport = transport
        self._raw: bool | None = None  # whether post_stream bypasses httpx (decided once)
        self._clients: dict[
            asyncio.AbstractEventLoop, tuple[httpx.AsyncClient, asyncio.Task[None]]
        ] = {}
        self._lock = threading.Lock()

    async def stream(self, messages: list[dict]) -> AsyncIterator[str | Usage]:
        async with aclosing(self.stream_batches(messages)) as batches:
            async for batch in batches:
                for piece in batch:
                    yield piece

    def post_stream(self, payload: Any) -> Any:
        """``async with backend.post_stream(payload) as response``: the streamed POST
        to the endpoint. On plain ``http://`` (a local model server) through
        :mod:`chat.llm.rawhttp`, several times cheaper a read than httpx; otherwise
        (TLS, proxies, a test transport, or ``SSECHAT_LLM_FAST_HTTP=0``) through httpx."""
        if self._raw is None:
            from . import rawhttp

            enabled = os.environ.get("SSECHAT_LLM_FAST_HTTP", "1").strip().lower()
            self._raw = (
                self._transport is None
                and enabled not in ("0", "false", "no", "off")
                and rawhttp.usable(self.endpoint)
            )
        if self._raw:
            from .rawhttp import post_stream

            return post_stream(
                self.endpoint,
                payload,
                self._headers(),
                connect_timeout=self.connect_timeout,
                read_timeout=self.read_timeout,
            )
        return self.client().stream("POST", self.endpoint, json=payload)

    @property
    def endpoint(self) -> str:
        return self.url

    # -- client per loop ------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        return {"User-Agent": "ssechat"}

    def _new_client(self) -> httpx.AsyncClient:
        timeout = httpx.Timeout(
            connect=self.connect_timeout,
            read=self.read_timeout,
            write=self.read_timeout,
            pool=self.read_timeout,
        )
        limits = httpx.Limits(
            max_connections=self.max_connections,
            max_keepalive_connections=min(self.max_connections, 128),
            keepalive_expiry=30.0,
        )
        return httpx.AsyncClient(
            verify=_ssl_context(),
            timeout=timeout,
            limits=limits,
            headers=self._headers(),
            transport=self._transport,
            follow_redirects=False,
        )

    def client(self) -> httpx.AsyncClient:
        """The shared client of the running event loop."""
        loop = asyncio.get_running_loop()
        with self._lock:
            entry = self._clients.get(loop)
            if entry is not None and not entry[0].is_closed:
                return entry[0]
            # Forget clients of loops that are gone.
            for old in [old for old in self._clients if old.is_closed()]:
                del self._clients[old]
            client = self._new_client()
            # A task that waits for ever and closes the client when it is cancelled:
            # asyncio.run() and its kin cancel every task before closing their loop, so
            # the pooled connections are closed properly instead of leaking.
            guard = loop.create_task(self._guard(loop, client), name=f"ssechat-llm-{self.name}")
            self._clients[loop] = (client, guard)
            return client

    async def _guard(self, loop: asyncio.AbstractEventLoop, client: httpx.AsyncClient) -> None:
        try:
            await loop.create_future()
        finally:
            with self._lock:
                entry = self._clients.get(loop)
                if entry is not None and entry[0] is client:
                    del self._clients[loop]
            await client.aclose()

    async def aclose(self) -> None:
        """Close the client of the running event loop (a new one is made when needed)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # pragma: no cover - called without a loop
            return
        with self._lock:
            entry = self._clients.pop(loop, None)
        if entry is not None:
            client, guard = entry
            guard.cancel()
            await client.aclose()

    # -- errors ---------------------------------------------------------------

    def _where(self) -> str:
        """The server named in messages: scheme, host and port, never credentials."""
        try:
            parsed = httpx.URL(self.url)
            port = f":{parsed.port}" if parsed.port else ""
            return f"{parsed.scheme}://{parsed.host}{port}"
        except Exception:
            return self.url

    def transport_error(self, exc: Exception) -> LLMError:
        """Turn an httpx exception into a readable :class:`LLMError`."""
        where = self._where()
        if isinstance(exc, httpx.InvalidURL | httpx.UnsupportedProtocol):
            return LLMError(f"The model server URL {self.url!r} is not valid: {exc}")
        if isinstance(exc, httpx.ConnectTimeout):
            return LLMError(
                f"The model server at {where} did not accept a connection "
                f"within {_fmt_seconds(self.connect_timeout)}."
            )
        if isinstance(exc, httpx.ReadTimeout):
            return LLMError(
                f"The model server stopped answering for {_fmt_seconds(self.read_timeout)}."
            )
        if isinstance(exc, httpx.WriteTimeout):
            waited = _fmt_seconds(self.read_timeout)
            return LLMError(f"The model server did not take the request within {waited}.")
        if isinstance(exc, httpx.PoolTimeout):
            return LLMError("Too many answers are being generated at once; try again shortly.")
        if isinstance(exc, httpx.ConnectError):
            if _has_cause(exc, (ConnectionRefusedError,)) or "refused" in str(exc).lower():
                return LLMError(f"The model server at {where} refused the connection.")
            text = str(exc).lower()
            if _has_cause(exc, (socket.gaierror,)) or any(w in text for w in _DNS_WORDS):
                return LLMError(
                    f"The model server at {where} could not be found (DNS lookup failed)."
                )
            return LLMError(f"The model server at {where} could not be reached: {exc}")
        if isinstance(exc, httpx.RemoteProtocolError):
            return LLMError("The model server ended the answer early.")
        if isinstance(exc, httpx.ReadError | httpx.WriteError | httpx.CloseError):
            return LLMError(f"The connection to the model server at {where} broke.")
        detail = str(exc) or type(exc).__name__
        return LLMError(f"The request to the model server at {where} failed: {detail}")

    async def status_error(self, response: httpx.Response) -> LLMError:
        """The :class:`LLMError` for a response with a 4xx or 5xx status."""
        body = b""
        try:
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) >= MAX_ERROR_BODY:
                    break
        except httpx.HTTPError:
            pass
        detail = _error_text(body[:MAX_ERROR_BODY])
        status = response.status_code
        if status == 401 and self.api_key:
            head, tail = "The model server refused the API key (401)", ""
        elif status == 401:
            head, tail = "The model server wants an API key (401)", " Set SSECHAT_LLM_API_KEY."
        else:
            head, tail = f"The model server answered {status}", ""
        if detail:
            end = "" if detail.endswith((".", "!", "?", "…")) else "."
            return LLMError(f"{head}: {detail}{end}{tail}")
        reason = response.reason_phrase
        if reason and status != 401:
            return LLMError(f"{head} ({reason}).")
        return LLMError(f"{head}.{tail}")

    @staticmethod
    def malformed(line: str) -> LLMError:
        return LLMError(f"The model server sent a malformed line: {line_snippet(line)}")

    @staticmethod
    def ended_early() -> LLMError:
        return LLMError("The model server ended the answer early.")


def clean_messages(messages: list[dict]) -> list[dict[str, str]]:
    """The conversation as plain ``{"role", "content"}`` dicts of strings."""
    cleaned = []
    for message in messages:
        role = message.get("role") or "user"
        content = message.get("content")
        cleaned.append({"role": str(role), "content": "" if content is None else str(content)})
    return cleaned


def as_count(value: Any) -> int:
    """A token count from a JSON value (0 for anything that is not a count)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    return max(0, int(value))
