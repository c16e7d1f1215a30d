"""Chat streams on a real server: late join, resume anywhere (on any worker), 204 after done,
the conversation stream, chunking, hostile model output, pruned logs."""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.core.management import call_command

from chat.models import Message
from ssechat.streams.models import Event

from . import test_chat_helpers as helpers
from .test_chat_helpers import FAST, ChatClient, done_of, echo, joined

chat_server = helpers.chat_server  # the module's server (a fixture)

pytestmark = pytest.mark.django_db(transaction=True)

WORDS = " ".join(f"word{n}" for n in range(300))


@pytest.fixture
async def chat(chat_server, alice, api_token):
    async with ChatClient(chat_server.url, await sync_to_async(api_token)(alice)) as client:
        yield client


async def test_a_late_client_gets_the_whole_answer_and_the_stream_ends(chat):
    conversation = await chat.conversation()
    posted = await chat.send(conversation["id"], echo(WORDS))
    answer_id = posted["assistant_message"]["id"]
    final = await chat.wait_status(answer_id)
    async with httpx.AsyncClient(base_url=chat.base_url, headers=chat.headers) as http:
        response = await http.get(posted["stream_url"])  # the server ends the response
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert response.headers["cache-control"] == "no-cache"
    events = await chat.answer(answer_id)
    assert [e.event for e in events[:-1]] == ["delta"] * (len(events) - 1)
    assert events[-1].event == "done"
    assert joined(events) == final["content"] == WORDS
    assert done_of(events) == final


async def test_resume_after_done_gets_204(chat):
    conversation = await chat.conversation()
    posted, events = await chat.ask(conversation["id"], echo("short and sweet"))
    path = posted["stream_url"]
    done_id = events[-1].id
    async with httpx.AsyncClient(base_url=chat.base_url, headers=chat.headers) as http:
        for headers, params in [
            ({"Last-Event-ID": done_id}, {}),
            ({}, {"lastEventId": done_id}),
            ({"Last-Event-ID": str(int(done_id) + 1000)}, {}),
        ]:
            response = await http.get(path, headers=headers, params=params)
            assert response.status_code == 204, (headers, params)
    # Resuming before the end gets the rest, and the done.
    rest = await chat.answer(posted["assistant_message"]["id"], last_id=events[-2].id)
    assert [e.event for e in rest] == ["done"]
    # An id from before the answer began (another stream's, say): the whole answer.
    again = await chat.answer(posted["assistant_message"]["id"], last_id="1")
    assert [e.id for e in again] == [e.id for e in events]


async def test_resume_from_every_point_gets_the_rest_exactly(chat):
    conversation = await chat.conversation()
    posted, events = await chat.ask(conversation["id"], echo(WORDS))
    answer_id = posted["assistant_message"]["id"]
    assert len(events) >= 3
    for index, event in enumerate(events[:-1]):
        rest = await chat.answer(answer_id, last_id=event.id)
        assert [e.id for e in rest] == [e.id for e in events[index + 1 :]]
        assert joined(events[: index + 1]) + joined(rest) == WORDS


async def resume_randomly(clients: list[ChatClient], answer_id: int, rng: random.Random) -> list:
    """Read an answer with random disconnects, resuming (on a random server) each time."""
    received: list = []
    last_id = None
    for _ in range(500):
        batch = await rng.choice(clients).answer(
            answer_id, last_id=last_id, max_events=rng.randint(1, 3)
        )
        for event in batch:
            assert event.event in ("delta", "done"), event.event
            received.append(event)
            last_id = event.id
        if received and received[-1].event == "done":
            return received
    raise AssertionError("the answer never ended")


async def test_disconnect_and_resume_mid_answer_without_gap_or_repeat(chat):
    conversation = await chat.conversation()
    text = " ".join(f"w{n}" for n in range(1500))  # about 1.5 s at the test rate
    posted = await chat.send(conversation["id"], echo(text))
    answer_id = posted["assistant_message"]["id"]
    received = await resume_randomly([chat], answer_id, random.Random(7))
    ids = [int(e.id) for e in received]
    assert ids == sorted(set(ids))
    assert joined(received) == text == done_of(received)["content"]


async def test_conversation_stream_follows_every_message(chat):
    conversation = await chat.conversation()
    path = f"/api/chat/conversations/{conversation['id']}/stream/"
    reader = asyncio.create_task(
        chat.events(path, stop=lambda e: e.event == "message" and '"complete"' in e.data
                    and '"assistant"' in e.data)
    )  # fmt: skip
    await asyncio.sleep(0.5)
    posted = await chat.send(conversation["id"], echo(WORDS))
    events = await asyncio.wait_for(reader, 20)
    assert {e.event for e in events} == {"message", "delta"}
    snapshots = [json.loads(e.data) for e in events if e.event == "message"]
    user, answer = posted["user_message"], posted["assistant_message"]
    assert snapshots[0] == user
    assert snapshots[1] == answer  # created: streaming, empty
    assert snapshots[-1]["id"] == answer["id"] and snapshots[-1]["status"] == "complete"
    assert joined(events) == WORDS == snapshots[-1]["content"]
    # Another tab resuming from the middle gets the rest.
    middle = events[len(events) // 2]
    rest = await chat.events(path, last_id=middle.id, idle=1.0)
    assert [e.id for e in rest] == [e.id for e in events[len(events) // 2 + 1 :]]


async def test_chunking_bounds_the_writes_of_a_fast_answer(chat):
    conversation = await chat.conversation()
    text = " ".join(f"t{n}" for n in range(500))  # 500 tokens, streamed fast
    posted, events = await chat.ask(conversation["id"], echo(text))
    deltas = [e for e in events if e.event == "delta"]
    assert joined(events) == text
    assert len(deltas) <= 40, len(deltas)  # not one write per token
    answer_id = posted["assistant_message"]["id"]
    stored = await Event.objects.filter(channel=f"chat:message:{answer_id}").acount()
    assert stored == len(events)


HOSTILE = (
    "line one\n\ndata: forged\n\nevent: done\nid: 99999999\r\n\r\n"
    'retry: 1\r: comment\n\ndata: {"id": 1}\n\n'
    "unicode: h\u00e9llo \u2013 \u4f60\u597d \U0001f389 \u2028 \u2029 \ufeff end"
)


async def test_hostile_model_output_arrives_as_data(chat):
    conversation = await chat.conversation()
    posted, events = await chat.ask(conversation["id"], echo(HOSTILE))
    assert {e.event for e in events} == {"delta", "done"}
    assert [e.event for e in events].count("done") == 1
    assert joined(events) == HOSTILE == done_of(events)["content"]
    answer_id = posted["assistant_message"]["id"]
    assert (await chat.message(answer_id))["content"] == HOSTILE
    # The same over the conversation stream.
    path = f"/api/chat/conversations/{conversation['id']}/stream/"
    backlog = await chat.events(path, last_id="0", idle=1.0)
    assert joined(backlog) == HOSTILE


async def test_stream_errors(chat):
    conversation = await chat.conversation()
    posted, _ = await chat.ask(conversation["id"], echo("x"))
    path = posted["stream_url"]
    async with httpx.AsyncClient(base_url=chat.base_url, headers=chat.headers) as http:
        response = await http.get(path, headers={"Accept": "application/json"})
        assert response.status_code == 406
        response = await http.post(path)
        assert response.status_code == 405
        user_message = posted["user_message"]["id"]
        response = await http.get(f"/api/chat/messages/{user_message}/stream/")
        assert response.status_code == 404  # a user message has no stream
    # A malformed resume id gets a reset, then the answer's end.
    events = await chat.answer(posted["assistant_message"]["id"], last_id="garbage")
    assert [e.event for e in events] == ["reset", "done"]


async def test_pruned_answers_come_from_the_row(chat):
    conversation = await chat.conversation()
    posted, events = await chat.ask(conversation["id"], echo(WORDS))
    answer_id = posted["assistant_message"]["id"]
    slow = await chat.send(conversation["id"], "[demo:slow] " + "go on " * 20)
    slow_id = slow["assistant_message"]["id"]
    await chat.answer(slow_id, max_events=2)
    await sync_to_async(call_command)("prune_events", keep=0, max_age=0)
    assert not await Event.objects.filter(channel=f"chat:message:{answer_id}").aexists()

    # A finished answer: its whole text as one delta, then done.
    again = await chat.answer(answer_id)
    assert [e.event for e in again] == ["delta", "done"]
    assert joined(again) == WORDS and done_of(again) == done_of(events)
    assert int(again[0].id) < int(again[1].id)
    async with httpx.AsyncClient(base_url=chat.base_url, headers=chat.headers) as http:
        response = await http.get(posted["stream_url"], headers={"Last-Event-ID": again[1].id})
        assert response.status_code == 204
    # Resuming from a pruned id: reset, then done.
    resumed = await chat.answer(answer_id, last_id=events[0].id)
    assert [e.event for e in resumed] == ["reset", "done"]

    # A streaming answer: the text so far as one delta, then the rest live. (The id
    # from before the answer makes the server read its row; a fresh open in the process
    # that generates it gets every delta from that process's memory: see below.)
    head = await chat.answer(slow_id, last_id="1", max_events=2)
    assert [e.event for e in head] == ["delta", "delta"]
    response = await chat.request("POST", f"/api/chat/messages/{slow_id}/cancel/")
    cancelled = response.json()
    tail = await chat.answer(slow_id, last_id=head[-1].id)
    assert tail[-1].event == "done" and done_of(tail) == cancelled
    assert joined(head) + joined(tail) == cancelled["content"]


@pytest.mark.postgres
async def test_a_fresh_stream_where_the_answer_is_generated_comes_from_memory(
    chat, chat_server, bob, api_token
):
    """The process that generates an answer keeps its events: a stream opened there
    without a resume id reads neither the row nor the log, and gets every delta even
    after the log was pruned. Anyone else's stream of it is still 404."""
    conversation = await chat.conversation()
    slow = await chat.send(conversation["id"], "[demo:slow] go on and on")
    slow_id = slow["assistant_message"]["id"]
    before = (await sync_to_async(chat_server.stats)())["stats"]["recalled"]
    head = await chat.answer(slow_id, max_events=2)
    await sync_to_async(call_command)("prune_events", keep=0, max_age=0)
    events = await chat.answer(slow_id)
    recalled = (await sync_to_async(chat_server.stats)())["stats"]["recalled"] - before
    final = await chat.message(slow_id)
    assert recalled == 2 and final["status"] == "complete"
    assert [e.event for e in events] == ["delta"] * (len(events) - 1) + ["done"]
    # Each delta as it was published (not the row's text as one), in order, once.
    assert len(events) > 3 and [(e.id, e.data) for e in head] == [
        (e.id, e.data) for e in events[:2]
    ]
    assert joined(events) == final["content"] and done_of(events) == final
    ids = [int(e.id) for e in events]
    assert ids == sorted(set(ids))

    other = await chat.send(conversation["id"], "[demo:slow] mine")
    async with ChatClient(chat_server.url, await sync_to_async(api_token)(bob)) as as_bob:
        response = await as_bob.request(
            "GET", other["stream_url"], headers={"Accept": "text/event-stream"}
        )
        assert response.status_code == 404
    await chat.answer(other["assistant_message"]["id"])


async def test_resume_and_cancel_on_another_worker(chat_server, start_server, alice, api_token):
    a, b = chat_server, start_server(**FAST)
    token = await sync_to_async(api_token)(alice)
    async with ChatClient(a.url, token) as on_a, ChatClient(b.url, token) as on_b:
        conversation = await on_a.conversation()
        text = " ".join(f"v{n}" for n in range(1500))
        posted = await on_a.send(conversation["id"], echo(text))
        answer_id = posted["assistant_message"]["id"]
        received = await resume_randomly([on_a, on_b], answer_id, random.Random(3))
        assert joined(received) == text
        ids = [int(e.id) for e in received]
        assert ids == sorted(set(ids))

        # Cancel through B an answer that A generates: A stops writing it.
        slow = await on_a.send(conversation["id"], "[demo:slow] " + "more " * 50)
        slow_id = slow["assistant_message"]["id"]
        first = await on_a.answer(slow_id, max_events=2)
        response = await on_b.request("POST", f"/api/chat/messages/{slow_id}/cancel/")
        cancelled = response.json()
        assert cancelled["status"] == "cancelled"
        assert cancelled["content"].startswith(joined(first))
        events = await on_a.answer(slow_id)
        assert done_of(events) == cancelled and joined(events) == cancelled["content"]
        await asyncio.sleep(1.0)
        row = await Message.objects.aget(pk=slow_id)
        assert row.content == cancelled["content"] and row.status == "cancelled"
        assert await Event.objects.filter(channel=f"chat:message:{slow_id}").acount() == len(events)
