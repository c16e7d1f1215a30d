"""The live feed /api/notifications/stream/ on a real uvicorn server (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import html.parser
import json
import subprocess
import sys

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth.models import Permission
from django.test import Client
from httpx_sse import aconnect_sse

import notifications
from notifications import services
from notifications.models import Notification

from .live import ROOT, server_env

pytestmark = pytest.mark.django_db(transaction=True)

STREAM = "/api/notifications/stream/"
send = sync_to_async(notifications.notify)
WAIT = 20.0  # generous: a busy 2-core machine, and SQLite is polled every 0.5 s


class Feed:
    """A feed read in the background; ``events`` grows as they arrive."""

    def __init__(self, base_url: str, token: str, query: str = "", last_id: str | None = None):
        self.base_url, self.query, self.events = base_url, query, []
        self.headers = {"Authorization": f"Bearer {token}"}
        if last_id is not None:
            self.headers["Last-Event-ID"] = last_id
        self.task: asyncio.Task | None = None
        self.status = 0

    async def __aenter__(self) -> Feed:
        self.task = asyncio.create_task(self._run())
        await self.wait_for(lambda e: e.event == "unread")  # live: the backlog is through
        return self

    async def __aexit__(self, *exc) -> None:
        self.task.cancel()
        try:
            await self.task
        except (asyncio.CancelledError, Exception):
            pass

    async def _run(self) -> None:
        # Keep-alives come every second; a minute of silence is a dead server.
        timeout = httpx.Timeout(10, read=60)
        async with httpx.AsyncClient(base_url=self.base_url, timeout=timeout) as client:
            async with aconnect_sse(client, "GET", STREAM + self.query, headers=self.headers) as s:
                self.status = s.response.status_code
                s.response.raise_for_status()
                async for event in s.aiter_sse():
                    if event.data:
                        self.events.append(event)

    async def wait_for(self, predicate, timeout: float = WAIT):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            for event in self.events:
                if predicate(event):
                    return event
            if self.task.done():
                self.task.result()  # raises what ended it
                raise AssertionError(f"the feed ended; got {self.kinds()}")
            await asyncio.sleep(0.05)
        raise AssertionError(f"timed out; got {self.kinds()}")

    async def notification(self, title: str):
        event = await self.wait_for(
            lambda e: e.event == "notification" and title in e.data and json_ok(e)
        )
        return json.loads(event.data)

    def notifications(self) -> list[dict]:
        return [json.loads(e.data) for e in self.events if e.event == "notification"]

    def titles(self) -> list[str]:
        return [n["title"] for n in self.notifications()]

    def counts(self) -> list[int]:
        return [json.loads(e.data)["count"] for e in self.events if e.event == "unread"]

    async def count(self, value: int, timeout: float = WAIT) -> None:
        """Wait until the latest ``unread`` count is ``value``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            counts = self.counts()
            if counts and counts[-1] == value:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"count never became {value}: {self.counts()}")

    def kinds(self) -> list[str]:
        return [f"{e.event}#{e.id}" for e in self.events]


def json_ok(event) -> bool:
    try:
        json.loads(event.data)
    except ValueError:
        return False
    return True


@pytest.fixture
def token(api_token):
    return sync_to_async(api_token)


async def test_each_user_gets_their_own_and_the_broadcasts(live_server, alice, bob, token):
    async with (
        Feed(live_server.url, await token(alice)) as a,
        Feed(live_server.url, await token(bob)) as b,
    ):
        assert a.counts() == [0] and b.counts() == [0]
        await send(alice, title="for alice")
        await send(bob, title="for bob")
        await send(None, title="for everyone", level="warning")
        await a.notification("for everyone")
        await b.notification("for everyone")
        await a.count(2)
        await b.count(2)
        await asyncio.sleep(0.6)  # one more poll: nothing else arrives
        assert a.titles() == ["for alice", "for everyone"]
        assert b.titles() == ["for bob", "for everyone"]
        assert a.counts() == [0, 1, 2] and b.counts() == [0, 1, 2]
        first = a.notifications()[0]
        assert set(first) == {"id", "topic", "level", "title", "body", "url", "data",
                              "created_at", "read"}  # fmt: skip
        assert first["read"] is False
        # Ids only grow, and every event has one.
        ids = [int(e.id) for e in a.events]
        assert ids == sorted(ids) and all(e.id for e in a.events)


async def test_manage_py_notify_in_another_process_reaches_an_open_feed(live_server, alice, token):
    async with Feed(live_server.url, await token(alice)) as feed:
        result = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "manage.py", "notify", "--user", "alice", "--title", "From the CLI",
             "--topic", "cli", "--data", '{"via": "manage.py"}'],
            cwd=ROOT, env=server_env(), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        got = await feed.notification("From the CLI")
        assert got["topic"] == "cli" and got["data"] == {"via": "manage.py"}
        await feed.count(1)
        result = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "manage.py", "notify", "--all", "--title", "CLI broadcast"],
            cwd=ROOT, env=server_env(), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        await feed.notification("CLI broadcast")
        await feed.count(2)


class Checker(html.parser.HTMLParser):
    """Well-formedness: every element closed in order; text collected."""

    VOID = {"br", "img", "input", "meta", "link", "hr", "path", "circle", "rect"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.text, self.attrs = [], [], []

    def handle_starttag(self, tag, attrs):
        self.attrs.append((tag, dict(attrs)))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.attrs.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack}"
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


async def test_html_fragments_are_well_formed_and_escaped(live_server, alice, token):
    async with Feed(live_server.url, await token(alice), "?format=html") as feed:
        await send(
            alice,
            title="<script>alert(1)</script>",
            body='line one\n<img src=x onerror="alert(2)">\nline three',
            url="/chat/?a=1&b=2",
            topic="security",
        )
        event = await feed.wait_for(lambda e: e.event == "notification")
        fragment = event.data
        assert "<script>" not in fragment and "<img" not in fragment
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in fragment
        assert "&lt;img src=x onerror=&quot;alert(2)&quot;&gt;" in fragment
        assert 'href="/chat/?a=1&amp;b=2"' in fragment
        checker = Checker()
        checker.feed(fragment)
        checker.close()
        assert checker.stack == []
        assert checker.attrs[0][0] == "li" and "unread" in checker.attrs[0][1]["class"]
        text = " ".join(checker.text)
        assert "<script>alert(1)</script>" in text  # arrives as text
        assert "line one\n<img" in text  # the body's line breaks survive the data: lines
        # The count still comes as JSON.
        await feed.count(1)

        # A stored URL that is not http(s) or a site path is never a link.
        def store_bad_url():
            made = notifications.notify(alice, title="Bad link")
            Notification.objects.filter(pk=made.pk).update(url="javascript:alert(3)")
            made.url = "javascript:alert(3)"
            services.resend([made])

        await sync_to_async(store_bad_url)()
        event = await feed.wait_for(lambda e: e.event == "notification" and "Bad link" in e.data)
        assert "javascript:" not in event.data and "<a " not in event.data


async def test_topics_filter_notifications_but_the_count_counts_all(live_server, alice, token):
    async with Feed(live_server.url, await token(alice), "?topics=billing,ops") as feed:
        await send(alice, title="invoice", topic="billing")
        await send(alice, title="chatter", topic="general")
        await send(None, title="outage", topic="ops")
        await feed.notification("outage")
        await feed.count(3)
        assert feed.titles() == ["invoice", "outage"]


@pytest.mark.parametrize(
    ("query", "field"),
    [("?format=xml", "format"), ("?topics=a,b%20c", "topics"), ("?format=JSONP", "format")],
)
async def test_bad_query_parameters_get_400(live_server, alice, token, query, field):
    headers = {"Authorization": f"Bearer {await token(alice)}"}
    async with httpx.AsyncClient(base_url=live_server.url, timeout=10) as http:
        response = await http.get(STREAM + query, headers=headers)
        assert response.status_code == 400
        assert response.json()["field"] == field
        # Unknown parameters are ignored.
        async with http.stream("GET", STREAM + "?friends=true", headers=headers) as ok:
            assert ok.status_code == 200


async def test_resume_with_last_event_id_loses_nothing(live_server, alice, token):
    tok = await token(alice)
    async with Feed(live_server.url, tok) as feed:
        await send(alice, title="one")
        await feed.notification("one")
        await feed.count(1)
        last = feed.events[-1].id
    # Sent while nobody listens.
    await send(alice, title="two")
    await send(None, title="three")
    await send(alice, title="four", topic="other")
    async with Feed(live_server.url, tok, last_id=last) as again:
        # What the server had stored comes as backlog, what it had not yet
        # seen (SQLite is polled) comes live: either way, each once, in order.
        await again.notification("four")
        await again.count(4)
        assert again.titles() == ["two", "three", "four"], (last, again.kinds())
        assert all(int(e.id) > int(last) for e in again.events if e.event == "notification")
        await send(alice, title="five")
        await again.notification("five")
        await again.count(5)
        assert again.titles() == ["two", "three", "four", "five"]
    # The lastEventId query parameter does the same (htmx's reconnects).
    async with Feed(live_server.url, tok, f"?lastEventId={last}") as third:
        await third.notification("five")
        assert third.titles() == ["two", "three", "four", "five"]
        assert third.counts() == [5]  # all of it was stored: the backlog, then the count
    # An id from nowhere gets `reset`, then goes on live.
    async with Feed(live_server.url, tok, "?lastEventId=999999999") as lost:
        assert lost.events[0].event == "reset"
        assert lost.titles() == []


async def test_read_in_one_feed_updates_the_other(live_server, alice, bob, token):
    tok = await token(alice)
    made = [await send(alice, title=f"n{i}") for i in range(3)]
    everyone = await send(None, title="all")
    headers = {"Authorization": f"Bearer {tok}"}
    async with (
        Feed(live_server.url, tok) as tab1,
        Feed(live_server.url, tok, "?format=html") as tab2,
        Feed(live_server.url, await token(bob)) as bobs,
        httpx.AsyncClient(base_url=live_server.url, headers=headers, timeout=10) as api,
    ):
        for feed, count in [(tab1, 4), (tab2, 4), (bobs, 1)]:
            await feed.count(count)
        response = await api.post(f"/api/notifications/{made[0].pk}/read/")
        assert response.json() == {"unread_count": 3}
        await tab1.count(3)
        await tab2.count(3)
        await api.post(f"/api/notifications/{everyone.pk}/read/")
        await tab1.count(2)
        await tab2.count(2)
        await api.post("/api/notifications/read-all/")
        await tab1.count(0)
        await tab2.count(0)
        await asyncio.sleep(0.6)
        assert bobs.counts()[-1] == 1  # bob's broadcast is still unread for him
        # Another process (here: the test) changes it: the same.
        await sync_to_async(services.set_read)([made[1]], False)
        await tab1.count(1)


async def test_admin_sends_and_resends_live(live_server, alice, bob, token, make_user):
    staff = await sync_to_async(make_user)("staff", is_staff=True)
    await sync_to_async(staff.user_permissions.add)(
        *await sync_to_async(list)(Permission.objects.filter(codename__endswith="_notification"))
    )

    def admin_post(path: str, data: dict) -> int:
        client = Client()
        client.force_login(staff)
        return client.post(path, data).status_code

    async with (
        Feed(live_server.url, await token(alice)) as a,
        Feed(live_server.url, await token(bob)) as b,
    ):
        # Saving a new one in the admin sends it.
        status = await sync_to_async(admin_post)(
            "/admin/notifications/notification/add/",
            {"recipient": alice.pk, "level": "warning", "topic": "admin", "title": "From admin",
             "body": "", "url": "", "data": "{}"},
        )  # fmt: skip
        assert status == 302
        await a.notification("From admin")
        await a.count(1)
        # A broadcast: the recipient left empty (or the "broadcast" add form).
        status = await sync_to_async(admin_post)(
            "/admin/notifications/notification/add/?broadcast=1",
            {"level": "info", "topic": "admin", "title": "Admin to all", "body": "", "url": "",
             "data": "{}"},
        )  # fmt: skip
        assert status == 302
        await a.notification("Admin to all")
        await b.notification("Admin to all")
        await a.count(2)
        await b.count(1)

        everyone = await Notification.objects.aget(title="Admin to all")
        direct = await Notification.objects.aget(title="From admin")
        changelist = "/admin/notifications/notification/"
        # Mark read (a broadcast: for every user), then send again: unread, counted once.
        ids = [str(direct.pk), str(everyone.pk)]
        status = await sync_to_async(admin_post)(
            changelist, {"action": "mark_read", "_selected_action": ids}
        )
        assert status == 302
        await a.count(0)
        await b.count(0)
        status = await sync_to_async(admin_post)(
            changelist, {"action": "send_again", "_selected_action": ids}
        )
        assert status == 302
        await a.wait_for(lambda e: e.event == "notification" and "From admin" in e.data
                         and int(e.id) > direct.event_id)  # fmt: skip
        await a.count(2)
        await b.count(1)
        assert a.titles().count("From admin") == 2


@pytest.mark.postgres
async def test_a_feed_on_one_worker_gets_notifications_sent_on_another(start_server, alice, token):
    server = start_server(workers=2)
    tok = await token(alice)
    feeds = [Feed(server.url, tok) for _ in range(4)]  # spread over both workers
    for feed in feeds:
        await feed.__aenter__()
    try:
        headers = {"Authorization": f"Bearer {tok}"}
        sender = await sync_to_async(Permission.objects.get)(codename="add_notification")
        await sync_to_async(alice.user_permissions.add)(sender)
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=10) as api:
            for i in range(3):
                response = await api.post(
                    "/api/notifications/", json={"recipient": "alice", "title": f"w{i}"}
                )
                assert response.status_code == 201
        for feed in feeds:
            await feed.notification("w2")
            await feed.count(3)
            assert feed.titles() == ["w0", "w1", "w2"]
    finally:
        for feed in feeds:
            await feed.__aexit__(None, None, None)


def test_page_position_is_never_behind_what_the_page_shows(monkeypatch):
    """A page reads its stream position, then its list. On SQLite (ids commit in order)
    the position is the newest stored id even when this process's hub has not polled
    another process's writes yet: otherwise older events would be replayed over the
    newer list (a read notification shown unread again). On PostgreSQL it stays the
    hub's gap-free horizon."""
    from types import SimpleNamespace

    from notifications import views
    from ssechat.streams.log import publish

    event_id = publish("test:position", "tick", {})
    hub = SimpleNamespace(loop=object(), broker=SimpleNamespace(name="local"), horizon=0)
    monkeypatch.setattr(views, "get_hub", lambda: hub)
    assert views.stream_position() == event_id
    hub.broker.name = "postgres"
    assert views.stream_position() == 0
