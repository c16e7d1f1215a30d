"""The chat JSON API on a real server: conversations, messages, cancel, regenerate, limits,
admin."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import pytest
from asgiref.sync import sync_to_async

from . import test_chat_helpers as helpers
from .test_chat_helpers import ChatClient, assert_message_shape, done_of, echo, joined

chat_server = helpers.chat_server  # the module's server (a fixture)

pytestmark = pytest.mark.django_db(transaction=True)

SLOW = "[demo:slow] tell me a long story"


async def test_anonymous_clients_get_401_json(chat_server):
    async with httpx.AsyncClient(base_url=chat_server.url, timeout=10) as http:
        for method, path in [
            ("GET", "/api/chat/conversations/"),
            ("POST", "/api/chat/conversations/"),
            ("GET", "/api/chat/conversations/1/"),
            ("PATCH", "/api/chat/conversations/1/"),
            ("DELETE", "/api/chat/conversations/1/"),
            ("POST", "/api/chat/conversations/1/messages/"),
            ("POST", "/api/chat/messages/1/cancel/"),
            ("POST", "/api/chat/messages/1/regenerate/"),
            ("GET", "/api/chat/messages/1/stream/"),
            ("GET", "/api/chat/conversations/1/stream/"),
        ]:
            response = await http.request(method, path)
            if method == "GET":
                assert response.status_code == 401, (method, path, response.text)
                assert response.json()["error"] == "not_authenticated"
            else:  # Django's CSRF check comes first for unsafe methods: JSON either way
                assert response.status_code in (401, 403), (method, path, response.text)
                assert response.json()["error"] in ("not_authenticated", "csrf_failed")


async def test_conversations_crud(chat_server, alice, api_token):
    async with ChatClient(chat_server.url, await sync_to_async(api_token)(alice)) as chat:
        untitled = await chat.conversation()
        assert set(untitled) == {"id", "title", "created_at", "updated_at"}
        assert untitled["title"] == ""
        titled = await chat.conversation("  Trip   to Lisbon ")
        assert titled["title"] == "Trip to Lisbon"
        # A body-less POST works too.
        response = await chat.request("POST", "/api/chat/conversations/")
        assert response.status_code == 201
        third = response.json()

        listed = (await chat.request("GET", "/api/chat/conversations/")).json()
        assert [c["id"] for c in listed["results"]] == [third["id"], titled["id"], untitled["id"]]

        detail = await chat.detail(titled["id"])
        assert detail == {**titled, "messages": []}

        response = await chat.request(
            "PATCH", f"/api/chat/conversations/{untitled['id']}/", json={"title": "Renamed"}
        )
        assert response.status_code == 200
        renamed = response.json()
        assert renamed["title"] == "Renamed" and "messages" not in renamed
        assert renamed["updated_at"] >= untitled["updated_at"]
        # Renaming moves it to the top of the list.
        listed = (await chat.request("GET", "/api/chat/conversations/")).json()
        assert listed["results"][0]["id"] == untitled["id"]

        response = await chat.request("DELETE", f"/api/chat/conversations/{third['id']}/")
        assert response.status_code == 204 and response.content == b""
        response = await chat.request("GET", f"/api/chat/conversations/{third['id']}/")
        assert response.status_code == 404 and response.json()["error"] == "not_found"

        # Bad input: 400 naming the field.
        for body in ({"title": 5}, {"title": "x" * 201}, {"title": "a\x00b"}):
            response = await chat.request("POST", "/api/chat/conversations/", json=body)
            assert response.status_code == 400, body
            assert response.json()["field"] == "title"
        response = await chat.request("PATCH", f"/api/chat/conversations/{titled['id']}/", json={})
        assert response.status_code == 400 and response.json()["field"] == "title"
        response = await chat.request(
            "POST",
            "/api/chat/conversations/",
            content=b"{not json",
            headers={"Content-Type": "application/json"},
        )
        assert response.status_code == 400 and response.json()["error"] == "invalid_json"
        response = await chat.request("PUT", f"/api/chat/conversations/{titled['id']}/")
        assert response.status_code == 405
        assert set(response.headers["Allow"].split(", ")) == {"GET", "PATCH", "DELETE"}


async def test_post_a_message_and_read_the_answer(chat_server, alice, api_token):
    async with ChatClient(chat_server.url, await sync_to_async(api_token)(alice)) as chat:
        conversation = await chat.conversation()
        text = "Hello **there**,\nthis is the answer."
        posted, events = await chat.ask(conversation["id"], echo(text))
        assert set(posted) == {"user_message", "assistant_message", "stream_url"}
        user, answer = posted["user_message"], posted["assistant_message"]
        for message in (user, answer):
            assert_message_shape(message)
            assert message["conversation_id"] == conversation["id"]
        assert user["role"] == "user" and user["status"] == "complete"
        assert user["content"] == echo(text) and user["completed_at"] is not None
        assert answer["role"] == "assistant" and answer["status"] == "streaming"
        assert answer["content"] == "" and answer["completed_at"] is None
        assert posted["stream_url"] == f"/api/chat/messages/{answer['id']}/stream/"

        assert [e.event for e in events][-1] == "done"
        assert {e.event for e in events} <= {"delta", "done"}
        done = done_of(events)
        assert_message_shape(done)
        assert done["status"] == "complete" and done["error"] is None
        assert done["content"] == text == joined(events)
        assert done["usage"]["completion_tokens"] > 0
        assert all(json.loads(e.data)["message_id"] == answer["id"] for e in events[:-1])
        ids = [int(e.id) for e in events]
        assert ids == sorted(set(ids))

        detail = await chat.detail(conversation["id"])
        assert detail["title"] == "[demo:echo] Hello **there**,"  # from the first message
        assert [m["id"] for m in detail["messages"]] == [user["id"], answer["id"]]
        assert detail["messages"][1] == done
        assert detail["updated_at"] >= conversation["updated_at"]


async def test_one_answer_at_a_time_per_conversation(chat_server, alice, api_token):
    async with ChatClient(chat_server.url, await sync_to_async(api_token)(alice)) as chat:
        conversation = await chat.conversation()
        posted = await chat.send(conversation["id"], SLOW)
        answer_id = posted["assistant_message"]["id"]
        response = await chat.request(
            "POST", f"/api/chat/conversations/{conversation['id']}/messages/",
            json={"content": "another"},
        )  # fmt: skip
        assert response.status_code == 409
        assert response.json()["error"] == "answer_in_progress"
        assert response.json()["message_id"] == answer_id
        response = await chat.request("POST", f"/api/chat/messages/{answer_id}/regenerate/")
        assert response.status_code == 409
        # Another conversation is not blocked.
        other = await chat.conversation()
        await chat.ask(other["id"], echo("fine"))
        await chat.request("POST", f"/api/chat/messages/{answer_id}/cancel/")
        # Once the answer has ended, the conversation takes messages again.
        await chat.ask(conversation["id"], echo("now it works"))


async def test_cancel_keeps_the_text_so_far_and_is_idempotent(chat_server, alice, api_token):
    async with ChatClient(chat_server.url, await sync_to_async(api_token)(alice)) as chat:
        conversation = await chat.conversation()
        posted = await chat.send(conversation["id"], SLOW)
        answer_id = posted["assistant_message"]["id"]
        path = f"/api/chat/messages/{answer_id}/stream/"
        first = await chat.events(path, max_events=2)  # some text has been written
        assert [e.event for e in first] == ["delta", "delta"]

        response = await chat.request("POST", f"/api/chat/messages/{answer_id}/cancel/")
        assert response.status_code == 200
        cancelled = response.json()
        assert_message_shape(cancelled)
        assert cancelled["status"] == "cancelled" and cancelled["error"] is None
        assert cancelled["completed_at"] is not None
        assert cancelled["content"].startswith(joined(first))

        again = await chat.request("POST", f"/api/chat/messages/{answer_id}/cancel/")
        assert again.status_code == 200 and again.json() == cancelled

        # The stream ends with the cancelled message; its deltas are the kept text.
        events = await chat.answer(answer_id)
        assert done_of(events) == cancelled
        assert joined(events) == cancelled["content"]
        await asyncio.sleep(0.6)  # the model would have written more by now
        assert await chat.message(answer_id) == cancelled

        # Cancelling a finished answer changes nothing; a user message is not an answer.
        finished, _ = await chat.ask(conversation["id"], echo("done quickly"))
        finished_id = finished["assistant_message"]["id"]
        response = await chat.request("POST", f"/api/chat/messages/{finished_id}/cancel/")
        assert response.status_code == 200 and response.json()["status"] == "complete"
        user_id = finished["user_message"]["id"]
        response = await chat.request("POST", f"/api/chat/messages/{user_id}/cancel/")
        assert response.status_code == 400


async def test_regenerate_answers_the_same_user_message(chat_server, alice, api_token):
    async with ChatClient(chat_server.url, await sync_to_async(api_token)(alice)) as chat:
        conversation = await chat.conversation()
        posted, events = await chat.ask(conversation["id"], echo("first answer"))
        old = done_of(events)
        response = await chat.request("POST", f"/api/chat/messages/{old['id']}/regenerate/")
        assert response.status_code == 201, response.text
        body = response.json()
        assert set(body) == {"assistant_message", "stream_url"}
        new = body["assistant_message"]
        assert new["id"] > old["id"] and new["status"] == "streaming"
        assert body["stream_url"] == f"/api/chat/messages/{new['id']}/stream/"
        events = await chat.answer(new["id"])
        assert done_of(events)["content"] == "first answer"
        # Regenerating through the user message works as well.
        user_id = posted["user_message"]["id"]
        response = await chat.request("POST", f"/api/chat/messages/{user_id}/regenerate/")
        assert response.status_code == 201
        await chat.answer(response.json()["assistant_message"]["id"])
        messages = (await chat.detail(conversation["id"]))["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant", "assistant", "assistant"]
        assert messages[1] == old  # the old answer stays


async def test_everything_of_another_user_is_404(chat_server, alice, bob, api_token):
    async with ChatClient(chat_server.url, await sync_to_async(api_token)(alice)) as chat:
        conversation = await chat.conversation("mine")
        posted, _ = await chat.ask(conversation["id"], echo("secret"))
    c, m = conversation["id"], posted["assistant_message"]["id"]
    async with ChatClient(chat_server.url, await sync_to_async(api_token)(bob)) as other:
        for method, path, body in [
            ("GET", f"/api/chat/conversations/{c}/", None),
            ("PATCH", f"/api/chat/conversations/{c}/", {"title": "x"}),
            ("DELETE", f"/api/chat/conversations/{c}/", None),
            ("POST", f"/api/chat/conversations/{c}/messages/", {"content": "hi"}),
            ("POST", f"/api/chat/messages/{m}/cancel/", None),
            ("POST", f"/api/chat/messages/{m}/regenerate/", None),
            ("GET", f"/api/chat/messages/{m}/stream/", None),
            ("GET", f"/api/chat/conversations/{c}/stream/", None),
            ("GET", f"/api/chat/conversations/{10**30}/", None),
            ("GET", f"/api/chat/messages/{10**30}/stream/", None),
        ]:
            response = await other.request(method, path, json=body)
            assert response.status_code == 404, (method, path, response.text)
            assert response.json()["error"] == "not_found"
        assert (await other.request("GET", "/api/chat/conversations/")).json()["results"] == []


async def test_message_validation(chat_server, alice, api_token):
    async with ChatClient(chat_server.url, await sync_to_async(api_token)(alice)) as chat:
        conversation = await chat.conversation()
        path = f"/api/chat/conversations/{conversation['id']}/messages/"
        for body in ({}, {"content": ""}, {"content": "   "}, {"content": 3}, {"content": "\x00"}):
            response = await chat.request("POST", path, json=body)
            assert response.status_code == 400, body
            assert response.json()["field"] == "content"
        assert (await chat.detail(conversation["id"]))["messages"] == []


async def test_limits(chat_server, alice, bob, api_token):
    # chat_server allows 20000 characters, 2 answers at once and 8 a minute per user.
    async with ChatClient(chat_server.url, await sync_to_async(api_token)(alice)) as chat:
        one, two, three = [await chat.conversation() for _ in range(3)]
        response = await chat.request(
            "POST",
            f"/api/chat/conversations/{one['id']}/messages/",
            json={"content": "x" * 20001},
        )
        assert response.status_code == 400
        assert response.json()["error"] == "too_long" and "20000" in response.json()["detail"]

        slow = [await chat.send(c["id"], SLOW) for c in (one, two)]
        response = await chat.request(
            "POST", f"/api/chat/conversations/{three['id']}/messages/", json={"content": "hi"}
        )
        assert response.status_code == 429
        assert response.json()["error"] == "too_many_active_answers"
        assert response.headers["Retry-After"]
        for posted in slow:
            await chat.request(
                "POST", f"/api/chat/messages/{posted['assistant_message']['id']}/cancel/"
            )

        for n in range(6):  # 2 + 6 = 8 answers this minute
            await chat.ask(three["id"], echo(str(n)))
        response = await chat.request(
            "POST", f"/api/chat/conversations/{three['id']}/messages/", json={"content": "9"}
        )
        assert response.status_code == 429
        assert response.json()["error"] == "rate_limited"
        assert 1 <= int(response.headers["Retry-After"]) <= 60
        assert re.search(r"8 answers a minute", response.json()["detail"])
        response = await chat.request(
            "POST", f"/api/chat/messages/{slow[0]['assistant_message']['id']}/regenerate/"
        )
        assert response.status_code == 429
    # Limits are per user.
    async with ChatClient(chat_server.url, await sync_to_async(api_token)(bob)) as chat:
        conversation = await chat.conversation()
        await chat.ask(conversation["id"], echo("bob is fine"))


async def test_session_requests_need_the_csrf_token(chat_server, alice, login_cookies):
    cookies = await sync_to_async(login_cookies)(alice)
    async with httpx.AsyncClient(base_url=chat_server.url, cookies=cookies, timeout=10) as http:
        response = await http.post("/api/chat/conversations/", json={"title": "t"})
        assert response.status_code == 403 and response.json()["error"] == "csrf_failed"
        token = "a" * 32
        http.cookies.set("csrftoken", token)
        response = await http.post(
            "/api/chat/conversations/", json={"title": "t"}, headers={"X-CSRFToken": token}
        )
        assert response.status_code == 201
        assert (await http.get("/api/chat/conversations/")).json()["results"][0]["title"] == "t"


async def test_admin_lists_searches_exports_and_cancels(
    chat_server, make_user, api_token, login_cookies
):
    staff = await sync_to_async(make_user)("root", is_staff=True, is_superuser=True)
    async with ChatClient(chat_server.url, await sync_to_async(api_token)(staff)) as chat:
        conversation = await chat.conversation("Admin test")
        await chat.ask(conversation["id"], echo("findable needle text"))
        slow = await chat.send(conversation["id"], SLOW)
    answer_id = slow["assistant_message"]["id"]
    cookies = await sync_to_async(login_cookies)(staff)
    async with httpx.AsyncClient(base_url=chat_server.url, cookies=cookies, timeout=10) as http:
        page = await http.get("/admin/chat/conversation/", params={"q": "needle"})
        assert page.status_code == 200 and "Admin test" in page.text
        page = await http.get("/admin/chat/conversation/", params={"q": "no-such-words"})
        assert "Admin test" not in page.text
        page = await http.get("/admin/chat/conversation/", params={"answer_status": "streaming"})
        assert "Admin test" in page.text
        page = await http.get(f"/admin/chat/conversation/{conversation['id']}/change/")
        assert page.status_code == 200 and "findable needle text" in page.text
        page = await http.get("/admin/chat/message/", params={"status__exact": "streaming"})
        assert page.status_code == 200
        assert f"/admin/chat/message/{answer_id}/change/" in page.text
        csrf = http.cookies.get("csrftoken")
        assert csrf

        exported = await http.post(
            "/admin/chat/conversation/",
            data={
                "action": "export_json",
                "_selected_action": [str(conversation["id"])],
                "csrfmiddlewaretoken": csrf,
            },
        )
        assert exported.status_code == 200
        assert "attachment" in exported.headers["Content-Disposition"]
        data = exported.json()
        assert data["id"] == conversation["id"] and data["owner"] == "root"
        assert [m["role"] for m in data["messages"]] == ["user", "assistant", "user", "assistant"]
        assert data["messages"][1]["content"] == "findable needle text"

        response = await http.post(
            "/admin/chat/conversation/",
            data={
                "action": "cancel_streaming_answers",
                "_selected_action": [str(conversation["id"])],
                "csrfmiddlewaretoken": csrf,
            },
        )
        assert response.status_code in (200, 302)
    async with ChatClient(chat_server.url, await sync_to_async(api_token)(staff)) as chat:
        events = await chat.answer(answer_id)
        assert done_of(events)["status"] == "cancelled"
        assert joined(events) == done_of(events)["content"]


async def test_deleting_a_conversation_ends_its_streaming_answer(chat_server, alice, api_token):
    async with ChatClient(chat_server.url, await sync_to_async(api_token)(alice)) as chat:
        conversation = await chat.conversation()
        posted = await chat.send(conversation["id"], SLOW)
        answer_id = posted["assistant_message"]["id"]
        reader = asyncio.create_task(chat.answer(answer_id))
        await chat.answer(answer_id, max_events=1)  # it is being written
        response = await chat.request("DELETE", f"/api/chat/conversations/{conversation['id']}/")
        assert response.status_code == 204
        events = await asyncio.wait_for(reader, 20)
        assert done_of(events)["status"] == "cancelled"
        assert joined(events) == done_of(events)["content"]
        response = await chat.request("GET", f"/api/chat/messages/{answer_id}/stream/")
        assert response.status_code == 404
