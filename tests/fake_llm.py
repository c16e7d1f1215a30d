"""A fake language-model server that speaks the Ollama and OpenAI wire formats.

It is a real HTTP server on 127.0.0.1 (uvicorn and a small raw ASGI app, on its
own asyncio loop in a background thread), so the backends are tested over real
sockets, timeouts included::

    server = FakeLLMServer().start()     # or: with FakeLLMServer() as server:
    server.url                           # "http://127.0.0.1:<port>"
    server.mode = "stall"                # how the next answers behave
    server.reply_text = "Hi there"       # the text a normal answer streams
    server.tokens_per_second = 1000      # 0 (default): as fast as possible
    server.requests                      # [RecordedRequest(method, path, headers, body, json)]
    server.stop()

Endpoints: ``POST /api/chat`` (Ollama, NDJSON when ``stream`` is true, the
default), ``GET /api/tags``, ``POST /v1/chat/completions`` (OpenAI, SSE when
``stream`` is true, ``stream_options.include_usage`` honoured, a
``chat.completion`` object otherwise) and ``GET /v1/models``.

Modes (``server.mode``, or ``[fake:<mode>]`` in the last user message, which wins):

- ``normal``: stream ``reply_text`` word by word and finish properly;
- ``http_500``, ``http_401``, ``http_429``: that status with an error body;
- ``hang``: accept the request, never send the response head;
- ``stall``: send a few tokens, then nothing (without closing) until the client
  goes away or ``stall_seconds`` pass;
- ``malformed``: a few tokens, then a line that is not JSON;
- ``bad_shape``: a few tokens, then JSON without the expected fields;
- ``error_object``: a few tokens, then an error object (``{"error": ...}``);
- ``early_end``: a few tokens, then a clean end of the body without the final
  ``done``/``[DONE]``;
- ``disconnect``: a few tokens, then the connection is closed mid-body.

With ``api_key`` set, OpenAI requests without ``Authorization: Bearer <key>``
get 401. Run ``python tests/fake_llm.py --port 11434`` to serve it by hand.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import uvicorn

MODES = (
    "normal",
    "http_500",
    "http_401",
    "http_429",
    "hang",
    "stall",
    "malformed",
    "bad_shape",
    "error_object",
    "early_end",
    "disconnect",
)
DEFAULT_REPLY = (
    "Hello! This is the fake model speaking. It streams one word at a time, "
    "with **Markdown** and a usage count at the end."
)
DEFAULT_MODEL = "fake-model"
TOKENS_BEFORE_TROUBLE = 3
_MARKER = re.compile(r"\[fake:([a-z0-9_-]+)\]")
_TOKEN = re.compile(r"\S+\s*|\s+")


def tokenize(text: str) -> list[str]:
    """Words with their trailing whitespace; they join back to ``text``."""
    return _TOKEN.findall(text)


def _words(text: str) -> int:
    return len(text.split())


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    json: Any = None
    time: float = field(default_factory=time.time)

    @property
    def messages(self) -> list[dict] | None:
        return self.json.get("messages") if isinstance(self.json, dict) else None


class _Closed(Exception):
    """The client went away."""


class FakeLLMServer:
    """A fake Ollama and OpenAI server; see the module docstring."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        mode: str = "normal",
        reply_text: str = DEFAULT_REPLY,
        tokens_per_second: float = 0.0,
        model_name: str = DEFAULT_MODEL,
        api_key: str | None = None,
        stall_seconds: float = 30.0,
        flush_interval: float = 0.01,
    ) -> None:
        self.host = host
        self.port = port
        self.requests: list[RecordedRequest] = []
        self.reset(
            mode=mode,
            reply_text=reply_text,
            tokens_per_second=tokens_per_second,
            model_name=model_name,
            api_key=api_key,
            stall_seconds=stall_seconds,
            flush_interval=flush_interval,
        )
        self._sock: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._error: BaseException | None = None

    def reset(
        self,
        *,
        mode: str = "normal",
        reply_text: str = DEFAULT_REPLY,
        tokens_per_second: float = 0.0,
        model_name: str = DEFAULT_MODEL,
        api_key: str | None = None,
        stall_seconds: float = 30.0,
        flush_interval: float = 0.01,
    ) -> None:
        """Back to the given (default) behaviour, and forget the recorded requests."""
        self.mode = mode
        self.reply_text = reply_text
        #: Tokens a second of a normal answer; 0 or less: as fast as possible.
        self.tokens_per_second = tokens_per_second
        self.model_name = model_name
        self.api_key = api_key
        self.stall_seconds = stall_seconds
        #: At high rates, tokens that fall due within this many seconds go out in one write.
        self.flush_interval = flush_interval
        self.requests.clear()

    # -- life cycle -----------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout: float = 10.0) -> FakeLLMServer:
        if self.running:
            return self
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(2048)
        sock.setblocking(False)
        self._sock = sock
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self,
            lifespan="off",
            log_config=None,
            log_level="warning",
            access_log=False,
            server_header=False,
            date_header=False,
            timeout_graceful_shutdown=1,
            timeout_keep_alive=30,
            backlog=2048,
        )
        self._server = uvicorn.Server(config)
        self._error = None
        self._thread = threading.Thread(
            target=self._thread_main, name=f"fake-llm-{self.port}", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the fake LLM server did not start: {self._error!r}")
            time.sleep(0.005)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(stopping.set)
        self._thread.join(timeout)
        self._thread = None
        self._server = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> FakeLLMServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _thread_main(self) -> None:
        assert self._server is not None and self._sock is not None
        factory = self._server.config.get_loop_factory()
        loop = factory() if factory is not None else asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported by start()
            self._error = exc
        finally:
            loop.close()

    async def _serve(self) -> None:
        self._stopping = asyncio.Event()
        await self._server.serve(sockets=[self._sock])

    # -- ASGI app -------------------------------------------------------------

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            data = json.loads(body) if body else None
        except ValueError:
            data = None
        method, path = scope["method"], scope["path"]
        self.requests.append(RecordedRequest(method, path, headers, bytes(body), data))

        closed = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            closed.set()

        watcher = asyncio.ensure_future(watch())
        try:
            await self._route(method, path, headers, data, send, closed)
        except _Closed:
            pass
        finally:
            watcher.cancel()

    async def _route(self, method, path, headers, data, send, closed) -> None:
        path = path.rstrip("/") or "/"
        if path == "/api/chat" and method == "POST":
            await self._chat(OllamaWire(self), headers, data, send, closed)
        elif path == "/v1/chat/completions" and method == "POST":
            if self.api_key and headers.get("authorization") != f"Bearer {self.api_key}":
                await _json(send, 401, OpenAIWire.error_body(401))
                return
            await self._chat(OpenAIWire(self), headers, data, send, closed)
        elif path == "/v1/models" and method == "GET":
            model = {"id": self.model_name, "object": "model", "created": 0, "owned_by": "fake"}
            await _json(send, 200, {"object": "list", "data": [model]})
        elif path == "/api/tags" and method == "GET":
            tag = {
                "name": self.model_name,
                "model": self.model_name,
                "modified_at": "2025-01-01T00:00:00Z",
                "size": 1,
                "digest": "0" * 64,
                "details": {"format": "gguf", "family": "fake", "parameter_size": "1B"},
            }
            await _json(send, 200, {"models": [tag]})
        elif path in ("/api/chat", "/v1/chat/completions", "/v1/models", "/api/tags"):
            await _json(send, 405, {"error": "method not allowed"})
        else:
            await _json(send, 404, {"error": f"no such path: {path}"})

    def _mode_for(self, data: Any) -> str:
        mode = self.mode
        messages = data.get("messages") if isinstance(data, dict) else None
        if isinstance(messages, list):
            for message in reversed(messages):
                if isinstance(message, dict) and message.get("role") == "user":
                    found = _MARKER.search(str(message.get("content", "")))
                    if found:
                        mode = found.group(1)
                    break
        mode = mode.replace("-", "_")
        if mode not in MODES:
            raise ValueError(f"unknown fake LLM mode {mode!r}; pick one of {MODES}")
        return mode

    async def _chat(self, wire, headers, data, send, closed) -> None:
        if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
            await _json(send, 400, wire.error_body(400))
            return
        mode = self._mode_for(data)
        if mode.startswith("http_"):
            status = int(mode[5:])
            extra = [(b"retry-after", b"1")] if status == 429 else []
            await _json(send, status, wire.error_body(status), extra)
            return
        if mode == "hang":
            await self._wait(closed, self.stall_seconds)
            raise _Closed
        wire.prepare(data)
        tokens = tokenize(self.reply_text)
        if mode != "normal":
            tokens = tokens[:TOKENS_BEFORE_TROUBLE]
        if not wire.streaming:
            await self._whole(wire, mode, tokens, send, closed)
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", wire.content_type), (b"cache-control", b"no-cache")],
            }
        )
        await _chunk(send, wire.start_frame())
        await self._pace(wire, tokens, send, closed)
        if mode == "normal":
            await _chunk(send, wire.final_frames(tokens), more=False)
        elif mode == "stall":
            await self._wait(closed, self.stall_seconds)
        elif mode == "malformed":
            await _chunk(send, wire.malformed_frame())
            await self._wait(closed, 2.0)  # let the client notice first
        elif mode == "bad_shape":
            await _chunk(send, wire.bad_shape_frame())
            await self._wait(closed, 2.0)
        elif mode == "error_object":
            await _chunk(send, wire.error_frame(), more=False)
        elif mode == "early_end":
            await _chunk(send, b"", more=False)
        # "disconnect" (and the others that did not finish): returning without
        # completing the response makes uvicorn close the connection mid-body.

    async def _whole(self, wire, mode, tokens, send, closed) -> None:
        """A non-streamed answer (``"stream": false``)."""
        if mode == "normal":
            await _json(send, 200, wire.whole_body(tokens))
        elif mode in ("stall", "hang"):
            await self._wait(closed, self.stall_seconds)
        elif mode == "error_object":
            await _json(send, 200, wire.error_body(500))
        elif mode == "bad_shape":
            await _json(send, 200, {"id": "broken", "model": wire.model})
        else:
            # malformed: a broken body; early_end / disconnect: the body is cut short.
            start = {"type": "http.response.start", "status": 200}
            await send({**start, "headers": [(b"content-type", b"application/json")]})
            await _chunk(send, b'{"id": "broken', more=mode != "malformed")

    async def _pace(self, wire, tokens: list[str], send, closed) -> None:
        """Send the token frames at ``tokens_per_second``, batching what falls due together."""
        loop = asyncio.get_running_loop()
        rate = self.tokens_per_second
        start = loop.time()
        sent, total = 0, len(tokens)
        while sent < total:
            if closed.is_set():
                raise _Closed
            if rate > 0:
                upto = min(total, max(sent + 1, int((loop.time() - start) * rate) + 1))
            else:
                upto = sent + 1
            await _chunk(send, b"".join(wire.token_frame(t) for t in tokens[sent:upto]))
            sent = upto
            if sent < total:
                if rate > 0:
                    delay = start + sent / rate - loop.time()
                    if rate * self.flush_interval > 1:  # batch: at most one write an interval
                        delay = max(delay, self.flush_interval)
                    await asyncio.sleep(max(delay, 0))
                else:
                    await asyncio.sleep(0)

    async def _wait(self, closed: asyncio.Event, seconds: float) -> None:
        """Wait until the client goes away, the server stops, or ``seconds`` pass."""
        waiters = [asyncio.ensure_future(closed.wait())]
        if self._stopping is not None:
            waiters.append(asyncio.ensure_future(self._stopping.wait()))
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()


async def _chunk(send, body: bytes, more: bool = True) -> None:
    await send({"type": "http.response.body", "body": body, "more_body": more})


async def _json(send, status: int, data: Any, extra: list | None = None) -> None:
    body = json.dumps(data).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(extra or []),
            ],
        }
    )
    await _chunk(send, body, more=False)


# -- the two wire formats ------------------------------------------------------


class OllamaWire:
    content_type = b"application/x-ndjson"

    def __init__(self, server: FakeLLMServer) -> None:
        self.server = server
        self.model = server.model_name
        self.streaming = True
        self.prompt_tokens = 0

    def prepare(self, data: dict) -> None:
        self.model = str(data.get("model") or self.server.model_name)
        self.streaming = data.get("stream", True) is not False
        self.prompt_tokens = sum(
            _words(str(m.get("content", ""))) for m in data["messages"] if isinstance(m, dict)
        )

    @staticmethod
    def _now() -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())

    def _line(self, content: str, done: bool = False, **extra: Any) -> dict:
        return {
            "model": self.model,
            "created_at": self._now(),
            "message": {"role": "assistant", "content": content},
            "done": done,
            **extra,
        }

    def _final(self, tokens: list[str], content: str = "") -> dict:
        return self._line(
            content,
            True,
            done_reason="stop",
            total_duration=1_000_000,
            load_duration=1000,
            prompt_eval_count=self.prompt_tokens,
            prompt_eval_duration=1000,
            eval_count=len(tokens),
            eval_duration=1000,
        )

    def start_frame(self) -> bytes:
        return b""

    def token_frame(self, token: str) -> bytes:
        return (json.dumps(self._line(token)) + "\n").encode()

    def final_frames(self, tokens: list[str]) -> bytes:
        return (json.dumps(self._final(tokens)) + "\n").encode()

    def whole_body(self, tokens: list[str]) -> dict:
        return self._final(tokens, "".join(tokens))

    def malformed_frame(self) -> bytes:
        return b"this is not JSON {\n"

    def bad_shape_frame(self) -> bytes:
        return b'{"model": "fake-model", "status": "thinking"}\n'

    def error_frame(self) -> bytes:
        return b'{"error": "model runner has unexpectedly stopped"}\n'

    @staticmethod
    def error_body(status: int) -> dict:
        messages = {
            400: "invalid request: messages are required",
            401: "unauthorized",
            429: "too many requests, please slow down",
            500: "llama runner process has terminated: exit status 2",
        }
        return {"error": messages.get(status, f"error {status}")}


class OpenAIWire:
    content_type = b"text/event-stream; charset=utf-8"

    def __init__(self, server: FakeLLMServer) -> None:
        self.server = server
        self.model = server.model_name
        self.streaming = False
        self.include_usage = False
        self.prompt_tokens = 0
        self.id = "chatcmpl-" + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def prepare(self, data: dict) -> None:
        self.model = str(data.get("model") or self.server.model_name)
        self.streaming = data.get("stream") is True
        options = data.get("stream_options")
        self.include_usage = isinstance(options, dict) and options.get("include_usage") is True
        self.prompt_tokens = sum(
            _words(str(m.get("content", ""))) for m in data["messages"] if isinstance(m, dict)
        )

    def _chunk(self, delta: dict, finish_reason: str | None = None) -> dict:
        chunk = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "fp_fake",
            "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            ],
        }
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def _usage(self, tokens: list[str]) -> dict:
        completion = len(tokens)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
        }

    @staticmethod
    def _frame(data: Any) -> bytes:
        return f"data: {json.dumps(data)}\n\n".encode()

    def start_frame(self) -> bytes:
        return self._frame(self._chunk({"role": "assistant", "content": "", "refusal": None}))

    def token_frame(self, token: str) -> bytes:
        return self._frame(self._chunk({"content": token}))

    def final_frames(self, tokens: list[str]) -> bytes:
        frames = self._frame(self._chunk({}, "stop"))
        if self.include_usage:
            usage_chunk = {**self._chunk({}), "choices": [], "usage": self._usage(tokens)}
            frames += self._frame(usage_chunk)
        return frames + b"data: [DONE]\n\n"

    def whole_body(self, tokens: list[str]) -> dict:
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "fp_fake",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(tokens), "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": self._usage(tokens),
        }

    def malformed_frame(self) -> bytes:
        return b"data: {this is not JSON\n\n"

    def bad_shape_frame(self) -> bytes:
        return b'data: {"id": "chatcmpl-x", "object": "chat.completion.chunk"}\n\n'

    def error_frame(self) -> bytes:
        return self._frame(
            {
                "error": {
                    "message": "The server had an error while processing your request.",
                    "type": "server_error",
                    "param": None,
                    "code": None,
                }
            }
        )

    @staticmethod
    def error_body(status: int) -> dict:
        errors = {
            400: ("'messages' is a required property", "invalid_request_error", None),
            401: (
                "Incorrect API key provided: sk-fake. You can find your API key at "
                "https://platform.openai.com/account/api-keys.",
                "invalid_request_error",
                "invalid_api_key",
            ),
            429: (
                "Rate limit reached for requests. Please try again in 1s.",
                "requests",
                "rate_limit_exceeded",
            ),
            500: ("The server had an error while processing your request.", "server_error", None),
        }
        message, kind, code = errors.get(status, (f"error {status}", "server_error", None))
        return {"error": {"message": message, "type": kind, "param": None, "code": code}}


# -- pytest fixture and command line --------------------------------------------

_shared: FakeLLMServer | None = None
_shared_lock = threading.Lock()


def shared_server() -> FakeLLMServer:
    """One fake server for the whole test process (started on first use)."""
    global _shared
    with _shared_lock:
        if _shared is None or not _shared.running:
            _shared = FakeLLMServer().start()
            atexit.register(_shared.stop)
        return _shared


try:
    import pytest
except ImportError:  # pragma: no cover - a plain script without pytest
    pytest = None

if pytest is not None:

    @pytest.fixture
    def fake_llm():
        """The shared fake LLM server, reset to its defaults for this test."""
        server = shared_server()
        server.reset()
        yield server
        server.reset()


def main() -> None:  # pragma: no cover - manual use
    import argparse

    parser = argparse.ArgumentParser(description="A fake Ollama / OpenAI server.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11434)
    parser.add_argument("--mode", default="normal", choices=MODES)
    parser.add_argument("--reply", default=DEFAULT_REPLY)
    parser.add_argument("--tokens-per-second", type=float, default=20.0)
    args = parser.parse_args()
    server = FakeLLMServer(
        args.host,
        args.port,
        mode=args.mode,
        reply_text=args.reply,
        tokens_per_second=args.tokens_per_second,
    ).start()
    print(f"fake LLM server on {server.url} (Ctrl+C stops it)", flush=True)
    try:
        while server.running:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":  # pragma: no cover
    main()
