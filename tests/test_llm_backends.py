"""The language-model backends (chat.llm) against a real fake server and mocked transports."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time

import httpx
import pytest
from django.core.exceptions import ImproperlyConfigured

from chat.llm import Backend, LLMError, Usage, get_backend
from chat.llm.demo import DemoBackend, tokenize
from chat.llm.ollama import OllamaBackend
from chat.llm.openai import OpenAIBackend, SSEParser
from tests import fake_llm as fake_llm_module
from tests.fake_llm import FakeLLMServer

fake_llm = fake_llm_module.fake_llm  # the fixture (until a conftest provides it)

HTTP_KINDS = ["ollama", "openai"]

HISTORY = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is SSE?"},
    {"role": "assistant", "content": "Server-Sent Events."},
    {"role": "user", "content": "And how does it resume?"},
]


def use(settings, kind: str, url: str = "", **extra) -> Backend:
    settings.SSECHAT_LLM_BACKEND = kind
    settings.SSECHAT_LLM_URL = url
    settings.SSECHAT_LLM_MODEL = extra.pop("model", "")
    settings.SSECHAT_LLM_API_KEY = extra.pop("api_key", "")
    settings.SSECHAT_LLM_CONNECT_TIMEOUT = extra.pop("connect_timeout", 2.0)
    settings.SSECHAT_LLM_READ_TIMEOUT = extra.pop("read_timeout", 5.0)
    settings.SSECHAT_DEMO_TOKENS_PER_SECOND = extra.pop("tokens_per_second", 0)
    assert not extra, extra
    return get_backend()


async def collect(backend: Backend, messages: list[dict]) -> tuple[list[str], Usage | None]:
    tokens: list[str] = []
    usage = None
    async for piece in backend.stream(messages):
        if isinstance(piece, Usage):
            assert usage is None, "at most one Usage"
            usage = piece
        else:
            assert usage is None, "the Usage comes last"
            assert isinstance(piece, str)
            tokens.append(piece)
    return tokens, usage


async def fails(backend: Backend, messages: list[dict]) -> tuple[list[str], str]:
    tokens: list[str] = []
    with pytest.raises(LLMError) as info:
        async for piece in backend.stream(messages):
            if isinstance(piece, str):
                tokens.append(piece)
    return tokens, str(info.value)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- get_backend ---------------------------------------------------------------


def test_get_backend_defaults(settings):
    backend = use(settings, "demo")
    assert (backend.name, backend.model) == ("demo", "ssechat-demo")
    backend = use(settings, "ollama")
    assert (backend.name, backend.model) == ("ollama", "llama3.2")
    assert backend.endpoint == "http://127.0.0.1:11434/api/chat"
    backend = use(settings, "openai")
    assert (backend.name, backend.model) == ("openai", "gpt-4o-mini")
    assert backend.endpoint == "https://api.openai.com/v1/chat/completions"
    backend = use(settings, "openai", "http://localhost:8080/v1/", model="qwen")
    assert backend.endpoint == "http://localhost:8080/v1/chat/completions"
    assert backend.model == "qwen"
    settings.SSECHAT_LLM_BACKEND = ""
    assert get_backend().name == "demo"


def test_get_backend_rejects_unknown_names(settings):
    settings.SSECHAT_LLM_BACKEND = "gpt5"
    with pytest.raises(ImproperlyConfigured, match="SSECHAT_LLM_BACKEND must be one of"):
        get_backend()
    settings.SSECHAT_LLM_BACKEND = "ollama"
    settings.SSECHAT_LLM_URL = "localhost:11434"
    with pytest.raises(ImproperlyConfigured, match="SSECHAT_LLM_URL"):
        get_backend()


def test_get_backend_is_cached_per_settings(settings, fake_llm):
    first = use(settings, "ollama", fake_llm.url)
    assert use(settings, "ollama", fake_llm.url) is first
    assert use(settings, "ollama", fake_llm.url, read_timeout=1.0) is not first


def test_one_backend_works_across_event_loops(settings, fake_llm):
    backend = use(settings, "openai", fake_llm.url)

    async def run() -> tuple[str, httpx.AsyncClient]:
        tokens, _ = await collect(backend, HISTORY)
        client = backend.client()
        tokens2, _ = await collect(get_backend(), HISTORY)
        assert backend.client() is client, "one client per loop, reused"
        assert tokens == tokens2
        return "".join(tokens), client

    text1, client1 = asyncio.run(run())
    text2, client2 = asyncio.run(run())
    assert text1 == text2 == fake_llm.reply_text
    assert client1 is not client2


# -- both HTTP backends against the fake server ---------------------------------


@pytest.mark.parametrize("kind", HTTP_KINDS)
async def test_streams_the_reply_with_usage(settings, fake_llm, kind):
    fake_llm.reply_text = "Héllo wörld! 👋\n\n- one\n- two\n\n```py\nprint('x')\n```\n"
    backend = use(settings, kind, fake_llm.url)
    tokens, usage = await collect(backend, HISTORY)
    assert "".join(tokens) == fake_llm.reply_text
    assert len(tokens) > 5
    expected = len(tokenize(fake_llm.reply_text))
    prompt_words = sum(len(m["content"].split()) for m in HISTORY)
    assert usage == Usage(prompt_tokens=prompt_words, completion_tokens=expected)


@pytest.mark.parametrize("kind", HTTP_KINDS)
async def test_sends_the_whole_history(settings, fake_llm, kind):
    backend = use(settings, kind, fake_llm.url, model="my-model")
    await collect(backend, HISTORY)
    [request] = fake_llm.requests
    assert request.method == "POST"
    assert request.path == {"ollama": "/api/chat", "openai": "/v1/chat/completions"}[kind]
    assert request.messages == HISTORY
    assert request.json["model"] == "my-model"
    assert request.json["stream"] is True
    if kind == "openai":
        assert request.json["stream_options"] == {"include_usage": True}
        assert "authorization" not in request.headers


async def test_openai_sends_the_api_key(settings, fake_llm):
    fake_llm.api_key = "sk-right"
    backend = use(settings, "openai", fake_llm.url + "/v1", api_key="sk-right")
    tokens, _ = await collect(backend, HISTORY)
    assert "".join(tokens) == fake_llm.reply_text
    assert fake_llm.requests[0].headers["authorization"] == "Bearer sk-right"

    backend = use(settings, "openai", fake_llm.url, api_key="sk-wrong")
    _, message = await fails(backend, HISTORY)
    assert message.startswith("The model server refused the API key (401)")
    assert "sk-wrong" not in message


@pytest.mark.parametrize("kind", HTTP_KINDS)
async def test_paces_tokens(settings, fake_llm, kind):
    fake_llm.reply_text = "a " * 20
    fake_llm.tokens_per_second = 200
    backend = use(settings, kind, fake_llm.url)
    started = time.monotonic()
    arrivals = []
    async for _piece in backend.stream(HISTORY):
        arrivals.append(time.monotonic() - started)
    assert arrivals[-1] >= 19 / 200 * 0.9
    assert arrivals[0] < arrivals[-1] / 2, "the first token comes early: it is a stream"


@pytest.mark.parametrize("kind", HTTP_KINDS)
async def test_many_concurrent_streams(settings, fake_llm, kind):
    fake_llm.reply_text = "word " * 50
    fake_llm.tokens_per_second = 1000
    backend = use(settings, kind, fake_llm.url)
    results = await asyncio.gather(*(collect(backend, HISTORY) for _ in range(50)))
    assert all("".join(tokens) == fake_llm.reply_text for tokens, _ in results)
    assert len(fake_llm.requests) == 50


@pytest.mark.parametrize("kind", HTTP_KINDS)
async def test_closing_the_stream_early_is_clean(settings, fake_llm, kind):
    fake_llm.reply_text = "slow " * 100
    fake_llm.tokens_per_second = 50
    backend = use(settings, kind, fake_llm.url)
    stream = backend.stream(HISTORY)
    assert await anext(stream) == "slow "
    await stream.aclose()
    fake_llm.tokens_per_second = 0
    tokens, _ = await collect(backend, HISTORY[:2])  # the backend still works
    assert len(tokens) == 100


FAILURES = [
    ("http_500", r"^The model server answered 500: .*(terminated|error)"),
    ("http_401", r"^The model server wants an API key \(401\).*Set SSECHAT_LLM_API_KEY\.$"),
    ("http_429", r"^The model server answered 429: .*(too many|Rate limit)"),
    ("malformed", r"^The model server sent a malformed line: .*not JSON"),
    ("bad_shape", r"^The model server sent a malformed line: \{"),
    ("error_object", r"^The model server reported an error: .*(stopped|error)"),
    ("early_end", r"^The model server ended the answer early\.$"),
    ("disconnect", r"^The model server ended the answer early\.$"),
]


@pytest.mark.parametrize("kind", HTTP_KINDS)
@pytest.mark.parametrize(("mode", "pattern"), FAILURES, ids=[m for m, _ in FAILURES])
async def test_upstream_failures_become_readable_errors(settings, fake_llm, kind, mode, pattern):
    fake_llm.mode = mode
    backend = use(settings, kind, fake_llm.url)
    tokens, message = await fails(backend, HISTORY)
    assert re.search(pattern, message), message
    if not mode.startswith("http_"):
        assert "".join(tokens) == "Hello! This is ", "the tokens before the trouble arrive"


@pytest.mark.parametrize("kind", HTTP_KINDS)
async def test_mode_can_be_chosen_by_the_message(settings, fake_llm, kind):
    backend = use(settings, kind, fake_llm.url)
    _, message = await fails(backend, [{"role": "user", "content": "hi [fake:http_500]"}])
    assert message.startswith("The model server answered 500")
    tokens, _ = await collect(backend, HISTORY)
    assert "".join(tokens) == fake_llm.reply_text


@pytest.mark.parametrize("kind", HTTP_KINDS)
@pytest.mark.parametrize("mode", ["stall", "hang"])
async def test_a_stalled_server_times_out(settings, fake_llm, kind, mode):
    fake_llm.mode = mode
    backend = use(settings, kind, fake_llm.url, read_timeout=0.5)
    started = time.monotonic()
    tokens, message = await fails(backend, HISTORY)
    assert 0.4 < time.monotonic() - started < 3
    assert message == "The model server stopped answering for 0.5 s."
    assert len(tokens) == (3 if mode == "stall" else 0)


@pytest.mark.parametrize("kind", HTTP_KINDS)
async def test_refused_connection(settings, kind):
    url = f"http://127.0.0.1:{free_port()}"
    backend = use(settings, kind, url)
    _, message = await fails(backend, HISTORY)
    assert message == f"The model server at {url} refused the connection."


@pytest.mark.parametrize("cls", [OllamaBackend, OpenAIBackend])
@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (
            httpx.ConnectTimeout("timed out"),
            "The model server at http://model.example:8000 did not accept a connection within 5 s.",
        ),
        (
            httpx.ConnectError("[Errno -2] Name or service not known"),
            "The model server at http://model.example:8000 could not be found (DNS lookup failed).",
        ),
        (httpx.ReadError("reset"), "The connection to the model server at "),
        (httpx.RemoteProtocolError("incomplete"), "The model server ended the answer early."),
    ],
)
async def test_transport_errors_are_mapped(cls, exc, expected):
    def handler(request):
        raise exc

    backend = cls(
        url="http://model.example:8000", model="m", transport=httpx.MockTransport(handler)
    )
    _, message = await fails(backend, HISTORY)
    assert message.startswith(expected)


# -- wire-format details, with canned bodies ------------------------------------


def mocked(cls, body: bytes | str, status: int = 200, content_type: str = "", **kwargs):
    if isinstance(body, str):
        body = body.encode()
    content_type = content_type or (
        "application/x-ndjson" if cls is OllamaBackend else "text/event-stream"
    )

    def handler(request):
        return httpx.Response(status, content=body, headers={"content-type": content_type})

    return cls(url="http://m.test", model="m", transport=httpx.MockTransport(handler), **kwargs)


def sse(*chunks: dict | str, end: str = "\n\n") -> str:
    frames = [c if isinstance(c, str) else f"data: {json.dumps(c)}" for c in chunks]
    return "".join(frame + end for frame in frames)


def delta(content, finish=None) -> dict:
    return {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish}],
    }


def test_sse_parser():
    parser = SSEParser()
    events = [
        parser.feed(line)
        for line in [": comment", "retry: 10", "event: x", "data: a", "data:b", "id: 1", "", ""]
    ]
    assert events[:6] == [None] * 6
    assert (events[6].event, events[6].data) == ("x", "a\nb")
    assert events[7] is None
    assert parser.feed("data") is None and parser.pending().data == ""


async def test_openai_sse_details():
    usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}
    body = (
        ": OPENROUTER PROCESSING\r\n\r\n"
        + sse(
            {"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]},
            delta(None),
            delta("Hi"),
            "event: message\nid: 7\ndata: " + json.dumps(delta(" there")),
            delta("", "stop"),
            usage,
            end="\r\n\r\n",
        )
        + "data: [DONE]"  # the last blank line is missing
    )
    tokens, got = await collect(mocked(OpenAIBackend, body), HISTORY)
    assert tokens == ["Hi", " there"]
    assert got == Usage(3, 2)


async def test_openai_finish_reason_without_done_is_complete():
    tokens, usage = await collect(mocked(OpenAIBackend, sse(delta("ok", "stop"))), HISTORY)
    assert (tokens, usage) == (["ok"], None)


async def test_openai_non_stream_answer_is_accepted():
    body = {
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Whole"}}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1},
    }
    backend = mocked(OpenAIBackend, json.dumps(body), content_type="application/json")
    assert await collect(backend, HISTORY) == (["Whole"], Usage(1, 1))


@pytest.mark.parametrize(
    ("body", "content_type", "expected"),
    [
        ('{"error": {"message": "bad model"}}', "application/json", "reported an error: bad model"),
        ("event: error\ndata: overloaded\n\n", "", "reported an error: overloaded"),
        (sse({"choices": "nope"}), "", "malformed line"),
        (sse([1, 2]), "", "malformed line"),
        (sse(delta(5)), "", "malformed line"),
        ("", "", "ended the answer early"),
        (sse(delta("a")), "", "ended the answer early"),
    ],
)
async def test_openai_bad_streams(body, content_type, expected):
    _, message = await fails(mocked(OpenAIBackend, body, content_type=content_type), HISTORY)
    assert expected in message


async def test_openai_error_statuses_with_odd_bodies():
    _, message = await fails(mocked(OpenAIBackend, "<html><h1>Bad Gateway</h1></html>", 502), [])
    assert message == "The model server answered 502: Bad Gateway."
    _, message = await fails(mocked(OpenAIBackend, "", 503), [])
    assert message == "The model server answered 503 (Service Unavailable)."
    _, message = await fails(mocked(OpenAIBackend, "x" * 10_000, 500), [])
    assert len(message) < 300


def ollama_line(content: str, done: bool = False, **extra) -> str:
    data = {"model": "m", "message": {"role": "assistant", "content": content}, "done": done}
    return json.dumps({**data, **extra}) + "\n"


async def test_ollama_details():
    body = (
        ollama_line("A")
        + "\n"
        + ollama_line("")
        + ollama_line("B")
        + ollama_line("C", True, prompt_eval_count=4, eval_count=3)
        + "garbage after the end is not read\n"
    )
    assert await collect(mocked(OllamaBackend, body), HISTORY) == (["A", "B", "C"], Usage(4, 3))
    # No counts in the final line: no Usage.
    body = ollama_line("A") + ollama_line("", True)
    assert await collect(mocked(OllamaBackend, body), HISTORY) == (["A"], None)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (ollama_line("A") + '{"error": "out of memory"}\n', "reported an error: out of memory"),
        (ollama_line("A") + '{"done": false}\n', "malformed line"),
        (ollama_line("A") + '{"message": {"content": 3}, "done": false}\n', "malformed line"),
        (ollama_line("A") + "[]\n", "malformed line"),
        (ollama_line("A"), "ended the answer early"),
        ("", "ended the answer early"),
    ],
)
async def test_ollama_bad_streams(body, expected):
    _, message = await fails(mocked(OllamaBackend, body), HISTORY)
    assert expected in message


async def test_ollama_model_not_found():
    body = '{"error":"model \\"llama9\\" not found, try pulling it first"}'
    _, message = await fails(mocked(OllamaBackend, body, 404, "application/json"), HISTORY)
    assert (
        message == 'The model server answered 404: model "llama9" not found, try pulling it first.'
    )


# -- the fake server's other endpoints ------------------------------------------


async def test_fake_server_listings_and_non_stream_answers(fake_llm):
    async with httpx.AsyncClient(base_url=fake_llm.url) as client:
        models = (await client.get("/v1/models")).json()
        assert models["data"][0]["id"] == fake_llm.model_name
        tags = (await client.get("/api/tags")).json()
        assert tags["models"][0]["name"] == fake_llm.model_name
        body = {"model": "x", "messages": HISTORY}
        answer = (await client.post("/v1/chat/completions", json=body)).json()
        assert answer["object"] == "chat.completion"
        assert answer["choices"][0]["message"]["content"] == fake_llm.reply_text
        assert answer["usage"]["completion_tokens"] == len(tokenize(fake_llm.reply_text))
        answer = (await client.post("/api/chat", json={**body, "stream": False})).json()
        assert answer["done"] is True
        assert answer["message"]["content"] == fake_llm.reply_text
        # Without include_usage, no usage chunk.
        response = await client.post("/v1/chat/completions", json={**body, "stream": True})
        assert response.headers["content-type"].startswith("text/event-stream")
        assert '"usage"' not in response.text
        assert response.text.endswith("data: [DONE]\n\n")
        assert (await client.get("/nope")).status_code == 404


def test_fake_server_starts_and_stops_on_its_own():
    with FakeLLMServer(reply_text="solo") as server:
        response = httpx.post(
            server.url + "/api/chat", json={"messages": [], "stream": False}, timeout=5
        )
        assert response.json()["message"]["content"] == "solo"
        url = server.url
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/api/tags", timeout=2)


# -- demo -----------------------------------------------------------------------


def demo(tokens_per_second: float = 0) -> DemoBackend:
    return DemoBackend(tokens_per_second=tokens_per_second)


@pytest.mark.parametrize(
    "payload",
    [
        "plain words",
        "",
        "  two leading spaces kept as one",
        "<script>alert(1)</script>\n\ndata: forged\nevent: done\n\n",
        "```\nunclosed fence\r\nand \x00 NUL\u2028",
    ],
)
async def test_demo_echo_is_exact(payload):
    tokens, usage = await collect(demo(), [{"role": "user", "content": f"[demo:echo] {payload}"}])
    assert "".join(tokens) == payload
    assert usage is not None


async def test_demo_echo_without_space():
    tokens, _ = await collect(demo(), [{"role": "user", "content": "say [demo:echo]x y"}])
    assert tokens == ["x ", "y"]


async def test_demo_reply_refers_to_the_question_and_uses_markdown(settings):
    backend = use(settings, "demo")
    assert backend.name == "demo"
    messages = [*HISTORY[:3], {"role": "user", "content": "Show me a Python code example"}]
    tokens, usage = await collect(backend, messages)
    text = "".join(tokens)
    assert "Show me a Python code example" in text
    assert "```" in text
    assert len(tokens) > 20
    assert all(token.strip() for token in tokens[:-1]), "whitespace travels with the words"
    assert usage.completion_tokens == len(text.split())
    assert usage.prompt_tokens == sum(len(m["content"].split()) for m in messages)
    tokens, _ = await collect(backend, [{"role": "user", "content": "list three tips"}])
    assert "\n- " in "".join(tokens) or "\n1. " in "".join(tokens)


async def test_demo_replies_vary():
    messages = [{"role": "user", "content": "Tell me about streaming"}]
    replies = {"".join((await collect(demo(), messages))[0]) for _ in range(8)}
    assert len(replies) > 1


async def test_demo_fail():
    tokens, message = await fails(demo(), [{"role": "user", "content": "go [demo:fail]"}])
    assert 0 < len(tokens) <= 5
    assert message == "The demo model failed on purpose."


async def test_demo_rates():
    started = time.monotonic()
    await collect(demo(100), [{"role": "user", "content": "[demo:echo] " + "w " * 10}])
    assert 0.07 < time.monotonic() - started < 1

    stream = demo(1000).stream([{"role": "user", "content": "hello [demo:slow]"}])
    started = time.monotonic()
    for _ in range(3):
        await anext(stream)
    await stream.aclose()
    assert time.monotonic() - started >= 0.35  # 5 tokens a second
