"""The OpenAI-compatible endpoint, driven by the official ``openai`` client on a real server.

The server runs the demo model fast (500 tokens a second); ``[demo:echo] text``
makes it answer exactly ``text``, ``[demo:slow]`` slows it to 5 tokens a second
and ``[demo:fail]`` makes it fail after a few words.
"""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from chat.models import Conversation, Message

from .fake_llm import FakeLLMServer
from .live import uvicorn_server

pytestmark = pytest.mark.django_db(transaction=True)

DEMO_MODEL = "ssechat-demo"


def _start(log_dir, **env):
    env = {"SSECHAT_KEEPALIVE_SECONDS": "1", **env}
    return uvicorn_server(log_dir, **env).start()


@pytest.fixture(scope="module")
def server(django_db_setup, django_db_blocker, log_dir):
    """One server for the module: demo model at 500 tokens a second, generous limits."""
    with django_db_blocker.unblock():
        live = _start(
            log_dir,
            SSECHAT_DEMO_TOKENS_PER_SECOND="500",
            SSECHAT_CHAT_REQUESTS_PER_MINUTE="1000",
            SSECHAT_CHAT_MAX_ACTIVE_ANSWERS="50",
        )
    yield live
    live.stop()


@pytest.fixture(scope="module")
def fake_upstream():
    """A fake OpenAI-compatible model server of this module's own (it is stopped in a test)."""
    upstream = FakeLLMServer().start()
    yield upstream
    upstream.stop()


@pytest.fixture(scope="module")
def proxy_server(django_db_setup, django_db_blocker, log_dir, fake_upstream):
    """A server whose model is the fake upstream, cancelling answers whose client left,
    with one streaming answer at most per user."""
    with django_db_blocker.unblock():
        live = _start(
            log_dir,
            SSECHAT_LLM_BACKEND="openai",
            SSECHAT_LLM_URL=fake_upstream.url,
            SSECHAT_LLM_MODEL="fake-model",
            SSECHAT_OPENAI_CANCEL_ON_DISCONNECT="1",
            SSECHAT_CHAT_MAX_ACTIVE_ANSWERS="1",
        )
    yield live
    live.stop()


@pytest.fixture
def fake(fake_upstream):
    fake_upstream.start()  # again, if a test stopped it
    fake_upstream.reset()
    yield fake_upstream
    fake_upstream.reset()


@pytest.fixture
def token(alice, api_token):
    return api_token(alice)


def client_for(server, token: str, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{server.url}/v1", api_key=token, max_retries=0, timeout=30, **kwargs
    )


def answer_of(conversation: Conversation) -> Message:
    return conversation.messages.order_by("pk").last()


def wait_until_finished(message_pk: int, timeout: float = 20) -> Message:
    deadline = time.monotonic() + timeout
    while True:
        message = Message.objects.get(pk=message_pk)
        if message.status != "streaming" or time.monotonic() > deadline:
            return message
        time.sleep(0.05)


def read_sse_data(lines) -> list[str]:
    """The ``data`` of each event of a raw stream (comments skipped, multi-line joined)."""
    events, data = [], []
    for line in lines:
        if line == "":
            if data:
                events.append("\n".join(data))
                data = []
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            assert name == "data", f"unexpected field {name!r}"
            data.append(value[1:] if value.startswith(" ") else value)
    return events


# -- models ----------------------------------------------------------------------------


def test_models_list_and_retrieve(server, token):
    client = client_for(server, token)
    models = client.models.list()
    assert [m.id for m in models.data] == [DEMO_MODEL]
    assert models.data[0].owned_by == "ssechat"
    assert models.data[0].object == "model"
    assert client.models.retrieve(DEMO_MODEL).id == DEMO_MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


# -- completions -----------------------------------------------------------------------


def test_completion_is_stored_as_a_conversation(server, token, alice):
    client = client_for(server, token)
    history = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "First question"},
        {"role": "assistant", "content": "First answer"},
        {"role": "user", "content": "[demo:echo] Hello there, *world*.\nSecond line."},
    ]
    completion = client.chat.completions.create(model=DEMO_MODEL, messages=history)
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == DEMO_MODEL
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == "Hello there, *world*.\nSecond line."
    assert choice.finish_reason == "stop"
    assert choice.index == 0
    usage = completion.usage
    assert usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    conversation = Conversation.objects.get(owner=alice)
    assert conversation.title == "First question"
    stored = list(conversation.messages.order_by("pk"))
    # Every request message is stored, but for system ones while the chat has no such role
    # (they do reach the model: see test_system_messages_reach_the_model).
    assert [(m.role, m.content) for m in stored[:-1]] == [
        (item["role"], item["content"]) for item in history if item["role"] in Message.Role.values
    ]
    answer = stored[-1]
    assert answer.role == "assistant"
    assert answer.status == "complete"
    assert answer.content == choice.message.content


def test_streaming_with_usage(server, token, alice):
    client = client_for(server, token)
    text = " ".join(f"word{i}" for i in range(60)) + "\n\n- done ✓"
    stream = client.chat.completions.create(
        model=DEMO_MODEL,
        messages=[{"role": "user", "content": f"[demo:echo] {text}"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    assert len({(c.id, c.created, c.model) for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) > 1, "the answer should arrive in several chunks"
    joined = "".join(c.choices[0].delta.content for c in content_chunks)
    assert joined == text
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1
    assert finish[0].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks[:-1])
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage.completion_tokens > 0
    assert usage_chunk.usage.total_tokens == (
        usage_chunk.usage.prompt_tokens + usage_chunk.usage.completion_tokens
    )
    answer = answer_of(Conversation.objects.get(owner=alice))
    assert answer.status == "complete"
    assert answer.content == joined


def test_raw_stream_frames(server, token):
    body = {
        "model": DEMO_MODEL,
        "messages": [{"role": "user", "content": "[demo:echo] one two three"}],
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.stream(
        "POST", f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=20
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert response.headers["cache-control"] == "no-cache"
        raw = response.read().decode()
    # Only data lines (and comments): no id or retry field, which OpenAI clients choke on.
    assert all(line == "" or line.startswith(("data: ", ":")) for line in raw.split("\n"))
    events = read_sse_data(raw.split("\n"))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(data) for data in events[:-1]]
    assert "usage" not in chunks[0], "usage keys only when include_usage is asked"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == ("one two three")
    assert chunks[-1]["choices"][0] == {
        "index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"
    }  # fmt: skip


def test_failure_after_some_text_ends_the_stream_with_an_error(server, token, alice):
    client = client_for(server, token)
    stream = client.chat.completions.create(
        model=DEMO_MODEL,
        messages=[{"role": "user", "content": "[demo:fail] tell me a long story please"}],
        stream=True,
    )
    received = []
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                received.append(chunk.choices[0].delta.content)
    assert "failed on purpose" in info.value.message
    answer = answer_of(Conversation.objects.get(owner=alice))
    assert answer.status == "failed"
    assert "".join(received) == answer.content
    assert answer.content


def test_disconnect_mid_stream_leaves_the_answer_complete(server, token, alice):
    text = "a b c d e f g h i j k l"
    body = {
        "model": DEMO_MODEL,
        "messages": [{"role": "user", "content": f"[demo:slow][demo:echo] {text}"}],
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.stream(
        "POST", f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=20
    ) as response:
        for line in response.iter_lines():
            if '"content":"a' in line:
                break
    answer = answer_of(Conversation.objects.get(owner=alice))
    answer = wait_until_finished(answer.pk)
    assert answer.status == "complete"
    assert answer.content == text


def test_conversation_is_visible_over_the_chat_api(server, token, alice):
    client = client_for(server, token)
    client.chat.completions.create(
        model=DEMO_MODEL, messages=[{"role": "user", "content": "[demo:echo] visible"}]
    )
    headers = {"Authorization": f"Bearer {token}"}
    listing = httpx.get(f"{server.url}/api/chat/conversations/", headers=headers).json()
    assert [c["title"] for c in listing["results"]] == ["[demo:echo] visible"]
    detail = httpx.get(
        f"{server.url}/api/chat/conversations/{listing['results'][0]['id']}/", headers=headers
    ).json()
    assert [(m["role"], m["content"]) for m in detail["messages"]] == [
        ("user", "[demo:echo] visible"),
        ("assistant", "visible"),
    ]


# -- errors ----------------------------------------------------------------------------


def assert_openai_error(response: httpx.Response, status: int, **expected):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert error["message"]
    for key, value in expected.items():
        assert error[key] == value, (key, error)
    return error


def post(server, token: str | None, content: bytes | str, **headers) -> httpx.Response:
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    headers.setdefault("Content-Type", "application/json")
    return httpx.post(
        f"{server.url}/v1/chat/completions", content=content, headers=headers, timeout=20
    )


def test_bad_json_is_400(server, token):
    assert_openai_error(post(server, token, b"{not json"), 400, type="invalid_request_error")
    assert_openai_error(post(server, token, b"[1, 2]"), 400, type="invalid_request_error")


def test_missing_messages_is_400(server, token):
    client = client_for(server, token)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=DEMO_MODEL, messages=None)  # type: ignore[arg-type]
    assert info.value.status_code == 400
    assert info.value.param == "messages"
    error = assert_openai_error(post(server, token, json.dumps({"model": "x"})), 400)
    assert error["param"] == "messages"


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([{"role": "wizard", "content": "hi"}], "messages[0].role"),
        ([{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}], "messages[1].role"),
        ([{"content": "hi"}], "messages[0].role"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "messages[0].content"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
         "messages[1].role"),
        ([], "messages"),
        ("hello", "messages"),
    ],
)  # fmt: skip
def test_invalid_messages_are_400(server, token, messages, param):
    client = client_for(server, token)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=DEMO_MODEL, messages=messages)
    assert info.value.param == param
    assert info.value.type == "invalid_request_error"
    assert not Conversation.objects.exists()


def test_bad_and_missing_tokens_are_401(server, token):
    with pytest.raises(openai.AuthenticationError):
        client_for(server, "ssc_not-a-real-token").chat.completions.create(
            model=DEMO_MODEL, messages=[{"role": "user", "content": "hi"}]
        )
    with pytest.raises(openai.AuthenticationError):
        client_for(server, "ssc_not-a-real-token").models.list()
    # No Authorization header at all: 401 in OpenAI's shape from the view itself.
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}]})
    assert_openai_error(post(server, None, body), 401, code="invalid_api_key")
    response = httpx.get(f"{server.url}/v1/models")
    assert_openai_error(response, 401, code="invalid_api_key")


def test_session_cookies_do_not_authenticate(server, alice, login_cookies):
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}]})
    response = httpx.post(
        f"{server.url}/v1/chat/completions", content=body, cookies=login_cookies(alice),
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    assert_openai_error(response, 401, code="invalid_api_key")


def test_too_large(server, token):
    huge = json.dumps({"messages": [{"role": "user", "content": "x" * 1_100_000}]})
    assert_openai_error(post(server, token, huge), 413, type="invalid_request_error")
    # A message over SSECHAT_CHAT_MAX_MESSAGE_CHARS (32,000): 400, as OpenAI words it.
    long = json.dumps({"messages": [{"role": "user", "content": "x" * 40_000}]})
    assert_openai_error(
        post(server, token, long), 400, param="messages[0].content", code="string_above_max_length"
    )
    assert not Conversation.objects.exists()


def test_wrong_method_and_unknown_url(server, token):
    headers = {"Authorization": f"Bearer {token}"}
    response = httpx.get(f"{server.url}/v1/chat/completions", headers=headers)
    assert_openai_error(response, 405)
    assert response.headers["allow"] == "POST"
    assert_openai_error(httpx.get(f"{server.url}/v1/embeddings", headers=headers), 404)


# -- with a real (fake) model server behind ----------------------------------------------


def test_system_messages_and_usage_reach_through(proxy_server, fake, token, alice):
    fake.reply_text = "Bonjour, tout le monde !"
    client = client_for(proxy_server, token)
    messages = [
        {"role": "system", "content": "Answer in French."},
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Say hello"}]},
    ]
    completion = client.chat.completions.create(model="fake-model", messages=messages)
    assert completion.choices[0].message.content == "Bonjour, tout le monde !"
    assert completion.model == "fake-model"
    # The model got the request's messages as sent ("developer" is the newer "system").
    assert fake.requests[-1].messages == [
        {"role": "system", "content": "Answer in French."},
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say hello"},
    ]
    answer = answer_of(Conversation.objects.get(owner=alice))
    assert answer.content == "Bonjour, tout le monde !"
    # The usage is the model's own count, as stored.
    assert completion.usage.prompt_tokens == answer.prompt_tokens
    assert completion.usage.completion_tokens == answer.completion_tokens > 0


def open_stream(server, token: str, content: str, **kwargs):
    body = {"model": "m", "messages": [{"role": "user", "content": content}], "stream": True}
    return httpx.stream(
        "POST",
        f"{server.url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {token}"},
        **kwargs,
    )


def first_text(lines) -> str:
    """The first piece of text of a raw stream (``lines``: its line iterator, which the
    caller keeps: an iterator that is dropped closes the connection)."""
    for line in lines:
        if line.startswith("data: {"):
            delta = json.loads(line[6:])["choices"][0]["delta"]
            if delta.get("content"):
                return delta["content"]
    raise AssertionError("the stream ended without text")


def test_disconnect_cancels_when_so_set(proxy_server, fake, token, alice):
    fake.mode = "stall"  # a few words, then nothing until the client goes away
    sent = fake.reply_text.split()[:3]
    with open_stream(proxy_server, token, "Tell me everything", timeout=20) as response:
        lines = response.iter_lines()
        # Every word the model sent before it stalled has reached us (and so the
        # server) when we leave: the answer keeps all of them.
        received = first_text(lines)
        while received.split() != sent:
            received += first_text(lines)
    answer = wait_until_finished(answer_of(Conversation.objects.get(owner=alice)).pk)
    assert answer.status == "cancelled"
    assert answer.content.split() == sent


def test_disconnect_before_the_first_word_cancels_too(proxy_server, fake, token, alice):
    fake.mode = "hang"  # the model never answers: the client gives up first
    # A stream starts anyway after a keep-alive interval (1 s here): role chunk, comments.
    with open_stream(proxy_server, token, "Anyone there?", timeout=10) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert next(lines) == ""
        assert next(lines).startswith(":"), "a keep-alive comment while the model is silent"
    streamed = answer_of(Conversation.objects.get(owner=alice))
    assert wait_until_finished(streamed.pk).status == "cancelled"
    # Without "stream" nothing is sent until the answer is done: the client times out.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{proxy_server.url}/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "Hello?"}]},
            headers={"Authorization": f"Bearer {token}"},
            timeout=1.5,
        )
    answers = Message.objects.filter(conversation__owner=alice, role="assistant")
    finished = [wait_until_finished(m.pk) for m in answers]
    assert [(m.status, m.content) for m in finished] == [("cancelled", ""), ("cancelled", "")]


def test_too_many_answers_at_once_is_429(proxy_server, fake, token, alice):
    fake.mode = "stall"
    client = client_for(proxy_server, token)
    with open_stream(proxy_server, token, "First", timeout=20) as response:
        lines = response.iter_lines()
        assert first_text(lines)
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "Second"}]
            )
        assert info.value.code == "rate_limit_exceeded"
        assert info.value.response.headers["retry-after"] == "1"
    # Only the first request was stored, and it ends (cancelled) once its client left.
    assert Conversation.objects.filter(owner=alice).count() == 1
    first = answer_of(Conversation.objects.get(owner=alice))
    assert wait_until_finished(first.pk).status == "cancelled"


def test_upstream_down_is_502(proxy_server, fake, token, alice):
    fake.stop()  # nothing listens on its port any more
    client = client_for(proxy_server, token)
    messages = [{"role": "user", "content": "hello?"}]
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="m", messages=messages)
    assert info.value.status_code == 502
    assert "refused the connection" in info.value.message
    assert info.value.type == "server_error"
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="m", messages=messages, stream=True)
    assert info.value.status_code == 502
    answers = Message.objects.filter(role="assistant", conversation__owner=alice)
    assert [m.status for m in answers] == ["failed", "failed"]
    assert all("refused" in m.error for m in answers)


# -- a browser reading the POST stream with fetch and a reader ------------------------------

READ_STREAM_JS = """
async ({token, content}) => {
  const response = await fetch("/v1/chat/completions", {
    method: "POST",
    headers: {"Content-Type": "application/json", "Authorization": "Bearer " + token},
    body: JSON.stringify({
      model: "ssechat-demo",
      messages: [{role: "user", content}],
      stream: true,
      stream_options: {include_usage: true},
    }),
  });
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", text = "", chunks = 0, usage = null, sawDone = false;
  while (!sawDone) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let end;
    while (!sawDone && (end = buffer.indexOf("\\n\\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\\n")) {
        if (!line.startsWith("data: ")) continue;  // keep-alive comments
        const data = line.slice(6);
        if (data === "[DONE]") { sawDone = true; break; }
        const chunk = JSON.parse(data);
        chunks += 1;
        if (chunk.usage) usage = chunk.usage;
        for (const choice of chunk.choices) text += choice.delta.content || "";
      }
    }
  }
  return {
    status: response.status, type: response.headers.get("content-type"),
    text, chunks, usage, sawDone,
  };
}
"""


@pytest.mark.browser
def test_browser_reads_the_post_stream_with_fetch(server, browser_context, alice, token):
    from playwright.sync_api import expect

    from .browser import login, screenshot

    login(browser_context, server.url, alice)
    reader = browser_context.new_page()
    reader.goto(server.url + "/accounts/login/")
    text = "Streaming to a browser with fetch and a reader, word by word — déjà vu ✓"
    # Slow (5 words a second): the chat page can watch it being written.
    content = f"[demo:slow][demo:echo] {text}"
    reader.evaluate(
        "([fn, args]) => { window.answer = eval(fn)(args); }",
        [READ_STREAM_JS, {"token": token, "content": content}],
    )
    deadline = time.monotonic() + 10
    while not Message.objects.filter(conversation__owner=alice, role="assistant").exists():
        assert time.monotonic() < deadline, "the request was not stored"
        time.sleep(0.05)
    conversation = Conversation.objects.get(owner=alice)

    chat = browser_context.new_page()
    chat.goto(f"{server.url}/chat/{conversation.pk}/")
    thread = chat.locator("#thread")
    expect(thread).to_contain_text("Streaming to a browser", timeout=10_000)
    screenshot(chat, "openai-compat-chat-page-streaming")

    result = reader.evaluate("window.answer")
    assert result["status"] == 200
    assert result["type"] == "text/event-stream; charset=utf-8"
    assert result["sawDone"]
    assert result["chunks"] > 3
    assert result["usage"]["total_tokens"] > 0
    answer = wait_until_finished(answer_of(conversation).pk)
    assert answer.status == "complete"
    assert result["text"] == answer.content == text
    expect(thread).to_contain_text("déjà vu ✓", timeout=10_000)
    screenshot(chat, "openai-compat-chat-page-done")
    assert not browser_context.console_errors
