"""The ollama and openai backends end to end: a real server answering through tests/fake_llm.py.

Every failure of the model server ends the answer `failed` with a readable error,
keeps the text received so far, and leaves the server serving.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from asgiref.sync import sync_to_async

from tests import fake_llm as fake_llm_module

from .live import uvicorn_server
from .test_chat_helpers import ChatClient, done_of, joined

fake_llm = fake_llm_module.fake_llm  # the fixture

pytestmark = pytest.mark.django_db(transaction=True)

KINDS = ["ollama", "openai"]
ENV = {
    "SSECHAT_KEEPALIVE_SECONDS": "1",
    "SSECHAT_LLM_MODEL": "fake-model",
    "SSECHAT_LLM_CONNECT_TIMEOUT": "2",
    "SSECHAT_LLM_READ_TIMEOUT": "1",
}


@pytest.fixture(scope="module")
def servers(django_db_setup, django_db_blocker, log_dir):
    """A chat server per backend, both on the shared fake model server, started side by side."""
    upstream = fake_llm_module.shared_server()
    with django_db_blocker.unblock():
        servers = {
            kind: uvicorn_server(
                log_dir, SSECHAT_LLM_BACKEND=kind, SSECHAT_LLM_URL=upstream.url, **ENV
            )
            for kind in KINDS
        }
        with ThreadPoolExecutor(len(servers)) as pool:
            futures = [pool.submit(server.start) for server in servers.values()]
        try:
            for future in futures:
                future.result()
            yield servers
        finally:
            for server in servers.values():
                if server.proc is not None:
                    server.stop()


@pytest.fixture(params=KINDS)
async def chat(request, servers, alice, api_token):
    token = await sync_to_async(api_token)(alice)
    async with ChatClient(servers[request.param].url, token) as client:
        client.kind = request.param
        yield client


async def test_answers_stream_from_the_model_with_usage(chat, fake_llm):
    fake_llm.reply_text = "Hi! I am **fake**.\n\n- one\n- two"
    conversation = await chat.conversation()
    _, events = await chat.ask(conversation["id"], "Hello model")
    done = done_of(events)
    assert done["status"] == "complete" and done["error"] is None
    assert joined(events) == done["content"] == fake_llm.reply_text
    tokens = len(fake_llm_module.tokenize(fake_llm.reply_text))
    assert done["usage"] == {"prompt_tokens": 2, "completion_tokens": tokens}
    request = fake_llm.requests[-1]
    assert request.json["model"] == "fake-model" and request.json["stream"] is True
    assert request.messages == [{"role": "user", "content": "Hello model"}]


async def test_the_conversation_history_is_sent_to_the_model(chat, fake_llm):
    conversation = await chat.conversation()
    fake_llm.reply_text = "first reply"
    await chat.ask(conversation["id"], "first question")
    fake_llm.reply_text = "failing reply"
    _, events = await chat.ask(conversation["id"], "[fake:http_500] broken question")
    assert done_of(events)["status"] == "failed"
    fake_llm.reply_text = "second reply"
    posted, _ = await chat.ask(conversation["id"], "second question")
    # Regenerate the first answer: the newest complete answer replaces the old one.
    fake_llm.reply_text = "second reply, again"
    response = await chat.request(
        "POST", f"/api/chat/messages/{posted['assistant_message']['id']}/regenerate/"
    )
    await chat.answer(response.json()["assistant_message"]["id"])
    fake_llm.reply_text = "third reply"
    await chat.ask(conversation["id"], "third question")
    assert fake_llm.requests[-1].messages == [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first reply"},
        {"role": "user", "content": "[fake:http_500] broken question"},  # its answer failed
        {"role": "user", "content": "second question"},
        {"role": "assistant", "content": "second reply, again"},
        {"role": "user", "content": "third question"},
    ]
    # The regeneration was asked with the history up to its own question.
    assert fake_llm.requests[-2].messages[-1] == {"role": "user", "content": "second question"}
    assert len(fake_llm.requests[-2].messages) == 4


FAILURES = [
    # mode, words of the error, text before the failure
    ("http_500", "answered 500", False),
    ("http_429", "answered 429", False),
    ("stall", "stopped answering for 1 s", True),
    ("malformed", "malformed", True),
    ("early_end", "ended the answer early", True),
    ("disconnect", "", True),
    ("error_object", "reported an error", True),
]


@pytest.mark.parametrize(("mode", "words", "partial"), FAILURES, ids=[f[0] for f in FAILURES])
async def test_model_failures_end_the_answer_failed(chat, fake_llm, mode, words, partial):
    conversation = await chat.conversation()
    _, events = await chat.ask(conversation["id"], f"[fake:{mode}] hello")
    done = done_of(events)
    assert done["status"] == "failed", done
    assert done["error"] and words in done["error"]
    assert "Traceback" not in done["error"]
    assert joined(events) == done["content"]
    if partial:  # the words received before the failure are kept
        assert done["content"] == "".join(fake_llm_module.tokenize(fake_llm.reply_text)[:3])
    else:
        assert done["content"] == ""
    # The server keeps serving.
    _, events = await chat.ask(conversation["id"], "and now?")
    assert done_of(events)["status"] == "complete"


async def test_a_model_server_that_refuses_connections(chat, fake_llm):
    fake_llm.stop()  # nothing listens on its port now
    try:
        conversation = await chat.conversation()
        _, events = await chat.ask(conversation["id"], "anyone there?")
    finally:
        fake_llm.start()  # on the same port
    done = done_of(events)
    assert done["status"] == "failed"
    assert "refused the connection" in done["error"]
    assert [e.event for e in events] == ["done"]
    _, events = await chat.ask(conversation["id"], "back again?")
    assert done_of(events)["status"] == "complete"
