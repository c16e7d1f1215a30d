"""No answer stays `streaming` for ever: killed workers, stopped servers, stale heartbeats."""

from __future__ import annotations

import asyncio
import re
import subprocess
from datetime import timedelta

import pytest
from asgiref.sync import sync_to_async
from django.utils import timezone

from chat.generation import SHUTDOWN
from chat.models import Conversation, Message
from chat.recovery import DEAD_PROCESS, HOST, STALE
from ssechat.streams.models import Event

from .test_chat_helpers import FAST, ChatClient, done_of, joined

pytestmark = pytest.mark.django_db(transaction=True)

SLOW = "[demo:slow] " + "tell me more " * 10


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


async def wait_for_status(message_id: int, status: str, timeout: float = 15.0) -> Message:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        message = await Message.objects.aget(pk=message_id)
        if message.status == status:
            return message
        assert loop.time() < deadline, f"message {message_id} is still {message.status}"
        await asyncio.sleep(0.1)


async def test_killed_worker_answer_fails_on_restart_and_stopped_server_fails_its_own(
    start_server, alice, api_token
):
    """One pair of servers for everything (they are slow to start on a busy machine)."""
    token = await sync_to_async(api_token)(alice)
    first = start_server(**FAST)
    async with ChatClient(first.url, token) as chat:
        conversation = await chat.conversation()
        posted = await chat.send(conversation["id"], SLOW)
        answer_id = posted["assistant_message"]["id"]
        head = await chat.answer(answer_id, max_events=2)
    first.kill()  # SIGKILL while it writes the answer

    second = start_server(**FAST)
    # Failed before the new server took requests: by its startup hook (unless another
    # server of the test run, e.g. the session's live_server, noticed it first).
    log = second.log()
    found = re.search(rf"marked \d+ abandoned answer\(s\) failed: \[[^]]*\b{answer_id}\b", log)
    if found:
        assert found.start() < log.index("Application startup complete")
    row = await Message.objects.aget(pk=answer_id)
    assert row.status == "failed" and row.error == DEAD_PROCESS
    async with ChatClient(second.url, token) as chat:
        events = await chat.answer(answer_id)
        done = done_of(events)
        assert done["status"] == "failed" and done["error"] == DEAD_PROCESS
        assert joined(events) == done["content"] == row.content
        assert done["content"].startswith(joined(head))

        await periodic_check_fails_answers_with_a_stale_heartbeat(chat, alice)
        await an_answer_of_a_dead_local_process_does_not_block_its_conversation(chat, alice)

        # The conversation goes on.
        posted = await chat.send(conversation["id"], SLOW)
        second_id = posted["assistant_message"]["id"]
        await chat.answer(second_id, max_events=1)

    second.stop()  # SIGTERM: the server ends its answers before it exits
    row = await Message.objects.aget(pk=second_id)
    assert row.status == "failed" and row.error == SHUTDOWN
    done_events = Event.objects.filter(channel=f"chat:message:{second_id}", type="done")
    assert await done_events.acount() == 1


def _abandoned_answer(user, worker: str, heartbeat_age: float) -> tuple[int, int]:
    conversation = Conversation.objects.create(owner=user, title="abandoned")
    question = Message.objects.create(
        conversation=conversation, role="user", content="hello?", completed_at=timezone.now()
    )
    answer = Message.objects.create(
        conversation=conversation,
        role="assistant",
        status="streaming",
        content="partial text",
        reply_to=question,
        worker=worker,
        heartbeat_at=timezone.now() - timedelta(seconds=heartbeat_age),
    )
    return conversation.pk, answer.pk


async def periodic_check_fails_answers_with_a_stale_heartbeat(chat: ChatClient, user) -> None:
    _, stale_id = await sync_to_async(_abandoned_answer)(user, "elsewhere:1:abc", 120)
    _, alive_id = await sync_to_async(_abandoned_answer)(user, "elsewhere:2:abc", -60)
    # Nobody asks for it: the server's periodic check finds it.
    row = await wait_for_status(stale_id, "failed")
    assert row.error == STALE and row.content == "partial text"
    assert await Event.objects.filter(channel=f"chat:message:{stale_id}", type="done").aexists()
    # A fresh heartbeat on another host is left alone.
    assert (await Message.objects.aget(pk=alive_id)).status == "streaming"
    events = await chat.answer(stale_id)
    assert joined(events) == "partial text"
    assert done_of(events)["status"] == "failed" and done_of(events)["error"] == STALE
    response = await chat.request("POST", f"/api/chat/messages/{alive_id}/cancel/")
    assert response.json()["status"] == "cancelled"


async def an_answer_of_a_dead_local_process_does_not_block_its_conversation(
    chat: ChatClient, user
) -> None:
    worker = f"{HOST}:{dead_pid()}:deadbeef"
    conversation_id, answer_id = await sync_to_async(_abandoned_answer)(user, worker, 0)
    posted = await chat.send(conversation_id, "[demo:echo] next")  # not 409
    await chat.answer(posted["assistant_message"]["id"])
    events = await chat.answer(answer_id)
    done = done_of(events)
    assert done["status"] == "failed" and done["error"] == DEAD_PROCESS
    assert joined(events) == "partial text"


def test_recover_answers_command(alice):
    from io import StringIO

    from django.core.management import call_command

    _, stale_id = _abandoned_answer(alice, "elsewhere:1:abc", 120)
    _, alive_id = _abandoned_answer(alice, "elsewhere:2:abc", -60)
    out = StringIO()
    call_command("recover_answers", stdout=out)
    assert "Marked 1 abandoned answer(s) failed." in out.getvalue()
    assert Message.objects.get(pk=stale_id).status == "failed"
    assert Message.objects.get(pk=alive_id).status == "streaming"
    done = Event.objects.get(channel=f"chat:message:{stale_id}", type="done")
    assert '"status":"failed"' in done.data


def test_an_answer_stream_checks_the_heartbeat_of_the_row_it_read(alice):
    """Opening an answer's stream reads its row once: a fresh heartbeat needs no other
    query; an old one is checked again under lock before the answer is failed, so a
    heartbeat that came in meanwhile keeps it alive."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from chat.recovery import fail_if_abandoned
    from chat.streams import _open_answer

    _, fresh_id = _abandoned_answer(alice, "elsewhere:1:abc", 0)
    with CaptureQueriesContext(connection) as queries:
        message, _ = _open_answer(alice.pk, fresh_id)
    assert message.status == "streaming" and len(queries) == 2  # the row, the log's bounds

    _, stale_id = _abandoned_answer(alice, "elsewhere:2:abc", 120)
    message, _ = _open_answer(alice.pk, stale_id)
    assert (message.status, message.error) == ("failed", STALE)

    _, revived_id = _abandoned_answer(alice, "elsewhere:3:abc", 120)
    as_read = Message.objects.get(pk=revived_id)  # its heartbeat old when read...
    Message.objects.filter(pk=revived_id).update(heartbeat_at=timezone.now())  # ...not now
    assert fail_if_abandoned(as_read).status == "streaming"
    assert Message.objects.get(pk=revived_id).status == "streaming"
