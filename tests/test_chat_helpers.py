"""Helpers shared by the chat back-end tests (this module holds no tests).

``chat_server``: one uvicorn server per test module with a fast demo model and
fast heartbeats; ``ChatClient``: the chat API and streams over HTTP with a
Bearer token, as a script would use them.

A test must not end while one of its answers is still being written: the
database flush after it could deadlock with the server's writes on
PostgreSQL. Read answers to their end (``ask``) or cancel them.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from .live import LiveServer, uvicorn_server
from .streamclient import read_events

# A fast model and quick recovery, so tests do not wait for the defaults; limits low
# enough to be tested on the same server (each test has a new user: mind them).
FAST = {
    "SSECHAT_KEEPALIVE_SECONDS": "1",
    "SSECHAT_DEMO_TOKENS_PER_SECOND": "1000",
    "SSECHAT_CHAT_HEARTBEAT_SECONDS": "0.5",
    "SSECHAT_CHAT_STALE_SECONDS": "4",
    "SSECHAT_CHAT_MAX_MESSAGE_CHARS": "20000",
    "SSECHAT_CHAT_MAX_ACTIVE_ANSWERS": "2",
    "SSECHAT_CHAT_REQUESTS_PER_MINUTE": "8",
}


@pytest.fixture(scope="module")
def chat_server(django_db_setup, django_db_blocker, log_dir) -> LiveServer:
    """A server for this module with the FAST settings (the demo model)."""
    with django_db_blocker.unblock():
        server = uvicorn_server(log_dir, **FAST).start()
    yield server
    server.stop()


def echo(text: str) -> str:
    """A prompt the demo model answers with exactly ``text``."""
    return f"[demo:echo] {text}"


def joined(events) -> str:
    return "".join(json.loads(e.data)["text"] for e in events if e.event == "delta")


def done_of(events) -> dict | None:
    done = [e for e in events if e.event == "done"]
    return json.loads(done[-1].data) if done else None


class ChatClient:
    """The chat API of one server, as one user (Bearer token)."""

    def __init__(self, base_url: str, token: str):
        self.base_url = base_url
        self.headers = {"Authorization": f"Bearer {token}"}
        self.http = httpx.AsyncClient(base_url=base_url, headers=self.headers, timeout=20)

    async def __aenter__(self) -> ChatClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.http.aclose()

    def on(self, base_url: str) -> ChatClient:
        """The same user on another server."""
        other = ChatClient(base_url, "")
        other.headers = dict(self.headers)
        other.http = httpx.AsyncClient(base_url=base_url, headers=self.headers, timeout=20)
        return other

    async def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        return await self.http.request(method, path, **kwargs)

    async def conversation(self, title: str | None = None) -> dict:
        body = {} if title is None else {"title": title}
        response = await self.http.post("/api/chat/conversations/", json=body)
        assert response.status_code == 201, response.text
        return response.json()

    async def send(self, conversation_id: int, content: str) -> dict:
        response = await self.http.post(
            f"/api/chat/conversations/{conversation_id}/messages/", json={"content": content}
        )
        assert response.status_code == 201, response.text
        return response.json()

    async def detail(self, conversation_id: int) -> dict:
        response = await self.http.get(f"/api/chat/conversations/{conversation_id}/")
        assert response.status_code == 200, response.text
        return response.json()

    async def message(self, message_id: int) -> dict:
        """The message as the conversation detail shows it."""
        for conversation in (await self.http.get("/api/chat/conversations/")).json()["results"]:
            for message in (await self.detail(conversation["id"]))["messages"]:
                if message["id"] == message_id:
                    return message
        raise AssertionError(f"no message {message_id}")

    async def events(self, path: str, **kwargs) -> list:
        return await read_events(self.base_url, path, headers=self.headers, **kwargs)

    async def answer(self, message_id: int, *, last_id: str | None = None, **kwargs) -> list:
        """Every event of the answer's stream until ``done`` (the server ends it)."""
        kwargs.setdefault("timeout", 30)
        return await self.events(
            f"/api/chat/messages/{message_id}/stream/", last_id=last_id, **kwargs
        )

    async def ask(self, conversation_id: int, content: str) -> tuple[dict, list]:
        """Send a message, read its whole answer; return the POST's JSON and the events."""
        posted = await self.send(conversation_id, content)
        events = await self.answer(posted["assistant_message"]["id"])
        return posted, events

    async def wait_status(
        self, message_id: int, statuses=("complete", "cancelled", "failed"), timeout=20.0
    ) -> dict:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            message = await self.message(message_id)
            if message["status"] in statuses:
                return message
            assert loop.time() < deadline, f"message {message_id} still {message['status']}"
            await asyncio.sleep(0.1)


def assert_message_shape(message: dict[str, Any]) -> None:
    assert set(message) == {
        "id",
        "conversation_id",
        "role",
        "content",
        "status",
        "error",
        "created_at",
        "completed_at",
        "usage",
    }
    assert message["role"] in ("user", "assistant")
    assert message["status"] in ("streaming", "complete", "cancelled", "failed")
    assert (message["error"] is not None) == (message["status"] == "failed")
    if message["usage"] is not None:
        assert set(message["usage"]) == {"prompt_tokens", "completion_tokens"}
