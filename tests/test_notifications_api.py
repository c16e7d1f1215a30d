"""The notifications JSON API on the live server, notify() and manage.py notify."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth.models import Permission
from django.core.management import CommandError, call_command
from django.utils import timezone

import notifications
from notifications.models import Notification, NotificationRead
from notifications.presenters import fragment_context
from notifications.services import InvalidNotification, list_for, unread_count
from ssechat.streams.models import Event

pytestmark = pytest.mark.django_db(transaction=True)

KEYS = {"id", "topic", "level", "title", "body", "url", "data", "created_at", "read"}


class Api:
    """httpx against the live server as one user (Bearer token)."""

    def __init__(self, base_url: str, token: str | None):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.AsyncClient(base_url=base_url, headers=headers, timeout=15)

    async def __aenter__(self) -> Api:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.http.aclose()

    async def get(self, path: str = "/api/notifications/", **params) -> httpx.Response:
        return await self.http.get(path, params=params)

    async def post(self, path: str, body=None, **kwargs) -> httpx.Response:
        if body is not None:
            kwargs["json"] = body
        return await self.http.post(path, **kwargs)


@pytest.fixture
def as_user(live_server, api_token):
    async def make(user) -> Api:
        token = await sync_to_async(api_token)(user) if user is not None else None
        return Api(live_server.url, token)

    return make


@pytest.fixture
def sender(make_user):
    user = make_user("sender")
    user.user_permissions.add(Permission.objects.get(codename="add_notification"))
    return user


send = sync_to_async(notifications.notify)


def assert_error(response: httpx.Response, status: int, field: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) >= {"error", "detail"} and body["detail"]
    if field is not None:
        assert body.get("field") == field, body
        assert field in body["detail"], body
    return body


# -- listing -------------------------------------------------------------------------------
async def test_list_shows_own_and_broadcasts_newest_first(alice, bob, as_user):
    a1 = await send(alice, title="For alice", body="hello", topic="billing", data={"k": 1})
    await send(bob, title="For bob")
    everyone = await send(None, title="For everyone", level="warning", url="/chat/")
    async with await as_user(alice) as api:
        response = await api.get()
        assert response.status_code == 200
        body = response.json()
        assert body["unread_count"] == 2
        assert [n["id"] for n in body["results"]] == [everyone.pk, a1.pk]
        first, second = body["results"]
        assert set(first) == KEYS
        assert first == {
            "id": everyone.pk, "topic": "general", "level": "warning", "title": "For everyone",
            "body": "", "url": "/chat/", "data": {}, "created_at": everyone.created_at.isoformat(),
            "read": False,
        }  # fmt: skip
        assert second["data"] == {"k": 1} and second["topic"] == "billing"
    async with await as_user(bob) as api:
        titles = [n["title"] for n in (await api.get()).json()["results"]]
        assert titles == ["For everyone", "For bob"]


async def test_list_filters_and_paging(alice, as_user):
    made = [
        await send(alice, title=f"n{i}", topic="billing" if i % 2 else "general") for i in range(7)
    ]
    ids = [n.pk for n in reversed(made)]  # newest first
    async with await as_user(alice) as api:
        page = (await api.get(limit=3)).json()["results"]
        assert [n["id"] for n in page] == ids[:3]
        page = (await api.get(limit=3, before=ids[2])).json()["results"]
        assert [n["id"] for n in page] == ids[3:6]
        page = (await api.get(limit=3, before=ids[5])).json()["results"]
        assert [n["id"] for n in page] == ids[6:]
        # The default page is 20 and the limit goes up to 100.
        assert len((await api.get()).json()["results"]) == 7
        assert len((await api.get(limit=100)).json()["results"]) == 7

        billing = (await api.get(topic="billing")).json()["results"]
        assert {n["title"] for n in billing} == {"n1", "n3", "n5"}

        await api.post(f"/api/notifications/{made[0].pk}/read/")
        await api.post(f"/api/notifications/{made[1].pk}/read/")
        unread = (await api.get(unread="true")).json()
        assert unread["unread_count"] == 5
        assert [n["id"] for n in unread["results"]] == ids[:5]
        assert all(not n["read"] for n in unread["results"])
        everything = (await api.get(unread="false")).json()["results"]
        assert {n["id"]: n["read"] for n in everything}[made[0].pk] is True
        both = (await api.get(unread="1", topic="billing", limit=1)).json()["results"]
        assert [n["title"] for n in both] == ["n5"]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "101"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"limit": "-1"}, "limit"),
        ({"before": "abc"}, "before"),
        ({"before": "0"}, "before"),
        ({"unread": "maybe"}, "unread"),
        ({"topic": "no spaces"}, "topic"),
    ],
)
async def test_list_rejects_bad_parameters(alice, as_user, params, field):
    async with await as_user(alice) as api:
        assert_error(await api.get(**params), 400, field)


async def test_anonymous_gets_401_json_never_a_redirect(live_server):
    async with httpx.AsyncClient(base_url=live_server.url, timeout=10) as http:
        for method, path in [
            ("GET", "/api/notifications/"),
            ("GET", "/api/notifications/stream/"),
        ]:
            response = await http.request(method, path)
            assert response.status_code == 401, path
            assert response.json()["error"] == "not_authenticated"
            assert "location" not in response.headers
        # Unsafe methods meet the CSRF check first: JSON either way.
        for path in ["/api/notifications/", "/api/notifications/1/read/",
                     "/api/notifications/read-all/"]:  # fmt: skip
            response = await http.post(path, json={})
            assert response.status_code in (401, 403), path
            assert response.json()["error"] in ("not_authenticated", "csrf_failed")
        # The page itself redirects a browser to the login page.
        response = await http.get("/notifications/")
        assert response.status_code == 302
        assert response.headers["location"].startswith("/accounts/login/")


async def test_session_posts_need_the_csrf_token(live_server, alice, login_cookies):
    cookies = await sync_to_async(login_cookies)(alice)
    async with httpx.AsyncClient(base_url=live_server.url, cookies=cookies, timeout=10) as http:
        response = await http.post("/api/notifications/read-all/")
        assert response.status_code == 403 and response.json()["error"] == "csrf_failed"
        page = await http.get("/notifications/")
        token = page.text.split('name="csrf-token" content="')[1].split('"')[0]
        response = await http.post("/api/notifications/read-all/", headers={"X-CSRFToken": token})
        assert response.status_code == 200 and response.json() == {"unread_count": 0}


# -- read state ------------------------------------------------------------------------------
async def test_mark_one_read_and_all_read(alice, bob, as_user):
    mine = [await send(alice, title=f"a{i}") for i in range(3)]
    everyone = await send(None, title="all")
    async with await as_user(alice) as api:
        response = await api.post(f"/api/notifications/{mine[0].pk}/read/")
        assert response.status_code == 200 and response.json() == {"unread_count": 3}
        # Idempotent.
        assert (await api.post(f"/api/notifications/{mine[0].pk}/read/")).json() == {
            "unread_count": 3
        }
        response = await api.post(f"/api/notifications/{everyone.pk}/read/")
        assert response.json() == {"unread_count": 2}
        response = await api.post("/api/notifications/read-all/")
        assert response.status_code == 200 and response.json() == {"unread_count": 0}
        assert all(n["read"] for n in (await api.get()).json()["results"])
        assert (await api.get("/api/notifications/read-all/")).status_code == 405
    # A broadcast is read per user, and never copied per user.
    assert await Notification.objects.acount() == 4
    assert await NotificationRead.objects.filter(notification=everyone).acount() == 1
    async with await as_user(bob) as api:
        body = (await api.get()).json()
        assert body["unread_count"] == 1
        assert body["results"][0]["read"] is False


async def test_someone_elses_notification_is_404(alice, bob, as_user):
    theirs = await send(bob, title="bob's")
    async with await as_user(alice) as api:
        assert_error(await api.post(f"/api/notifications/{theirs.pk}/read/"), 404)
        assert_error(await api.post("/api/notifications/999999/read/"), 404)
        assert_error(await api.post(f"/api/notifications/{10**20}/read/"), 404)
        response = await api.get(f"/api/notifications/{theirs.pk}/read/")
        assert response.status_code == 405 and response.headers["allow"] == "POST"
    assert (await Notification.objects.aget(pk=theirs.pk)).read_at is None


async def test_broadcasts_from_before_a_user_joined_are_not_theirs(make_user, as_user):
    old = await send(None, title="old news")
    carol = await sync_to_async(make_user)("carol")
    new = await send(None, title="fresh")
    async with await as_user(carol) as api:
        body = (await api.get()).json()
        assert [n["id"] for n in body["results"]] == [new.pk]
        assert body["unread_count"] == 1
        assert_error(await api.post(f"/api/notifications/{old.pk}/read/"), 404)


# -- sending ---------------------------------------------------------------------------------
async def test_sending_needs_the_permission(alice, sender, as_user):
    body = {"recipient": "alice", "title": "Hi"}
    async with await as_user(alice) as api:
        response = await api.post("/api/notifications/", body)
        assert_error(response, 403)
        assert "notifications.add_notification" in response.json()["detail"]
    async with await as_user(sender) as api:
        response = await api.post(
            "/api/notifications/",
            {"recipient": "alice", "topic": "deploys", "level": "success", "title": "Deployed",
             "body": "v2 is out", "url": "https://example.com/releases/2", "data": {"v": 2}},
        )  # fmt: skip
        assert response.status_code == 201, response.text
        created = response.json()
        assert set(created) == KEYS
        assert created["read"] is False and created["data"] == {"v": 2}
        assert created["level"] == "success" and created["topic"] == "deploys"
        # null: a broadcast; defaults for what is left out.
        response = await api.post("/api/notifications/", {"recipient": None, "title": "All"})
        assert response.status_code == 201
        broadcast = response.json()
        assert (broadcast["level"], broadcast["topic"], broadcast["body"]) == (
            "info", "general", "")  # fmt: skip
    row = await Notification.objects.aget(pk=created["id"])
    assert row.recipient_id == alice.pk and row.event_id is not None
    event = await Event.objects.aget(pk=row.event_id)
    assert event.channel == f"notifications:user:{alice.pk}" and event.type == "notification"
    assert json.loads(event.data) == created
    row = await Notification.objects.aget(pk=broadcast["id"])
    assert row.recipient_id is None
    assert (await Event.objects.aget(pk=row.event_id)).channel == "notifications:broadcast"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"recipient": "alice", "title": "x", "level": "urgent"}, "level"),
        ({"recipient": "alice"}, "title"),
        ({"recipient": "alice", "title": "   "}, "title"),
        ({"recipient": "alice", "title": 5}, "title"),
        ({"recipient": "alice", "title": "x" * 201}, "title"),
        ({"recipient": "nobody", "title": "x"}, "recipient"),
        ({"recipient": 7, "title": "x"}, "recipient"),
        ({"title": "x"}, "recipient"),
        ({"recipient": "alice", "title": "x", "body": "b" * 10_001}, "body"),
        ({"recipient": "alice", "title": "x", "body": ["b"]}, "body"),
        ({"recipient": "alice", "title": "x", "topic": "two words"}, "topic"),
        ({"recipient": "alice", "title": "x", "url": "javascript:alert(1)"}, "url"),
        ({"recipient": "alice", "title": "x", "url": "//evil.example/"}, "url"),
        ({"recipient": "alice", "title": "x", "data": [1, 2]}, "data"),
        ({"recipient": "alice", "title": "x", "colour": "red"}, "colour"),
    ],
)
async def test_bad_input_gets_400_naming_the_field(alice, sender, as_user, body, field):
    async with await as_user(sender) as api:
        assert_error(await api.post("/api/notifications/", body), 400, field)
    assert await Notification.objects.acount() == 0


async def test_body_limit_comes_from_settings(alice, sender, as_user):
    async with await as_user(sender) as api:
        ok = {"recipient": "alice", "title": "x", "body": "b" * 10_000}
        assert (await api.post("/api/notifications/", ok)).status_code == 201
        response = await api.post("/api/notifications/", {**ok, "body": "b" * 10_001})
        detail = assert_error(response, 400, "body")["detail"]
        assert "SSECHAT_NOTIFICATION_MAX_BODY_CHARS" in detail


async def test_non_json_bodies_get_400(sender, as_user):
    async with await as_user(sender) as api:
        headers = {"Content-Type": "application/json"}
        for raw in [b"{not json", b"[1, 2]", b"", b"\xff\xfe"]:
            response = await api.post("/api/notifications/", content=raw, headers=headers)
            assert response.status_code == 400, raw
            assert response.json()["error"] == "invalid_json"


# -- Python and command-line senders ------------------------------------------------------------
def test_notify_validates_like_the_api(alice):
    with pytest.raises(InvalidNotification) as info:
        notifications.notify(alice, title="x", level="loud")
    assert info.value.field == "level"
    with pytest.raises(InvalidNotification) as info:
        notifications.notify(alice, title="")
    assert info.value.field == "title"
    with pytest.raises(ValueError):
        notifications.notify(alice, title="x", data={"when": timezone.now()})
    with pytest.raises(TypeError):
        notifications.notify("alice", title="x")
    assert Notification.objects.count() == 0
    made = notifications.notify(alice, title="  Trimmed  ", data=None)
    assert made.title == "Trimmed" and made.data == {} and made.event_id


@pytest.fixture
def stream_db_pool():
    """anotify runs on the stream database pool: close its connections afterwards
    (PostgreSQL cannot drop a test database still in use)."""
    yield
    from django.db import connections

    from ssechat.streams import db

    executor = db._get_executor()
    size = executor._max_workers
    barrier = threading.Barrier(size)

    def close():
        barrier.wait(10)  # one call per thread of the pool
        connections.close_all()

    for future in [executor.submit(close) for _ in range(size)]:
        future.result(15)


async def test_anotify_from_async_code(alice, stream_db_pool):
    made = await notifications.anotify(alice, title="from async", level="error")
    assert made.pk and made.level == "error"
    everyone = await notifications.anotify(None, title="to all")
    assert everyone.recipient_id is None
    assert await sync_to_async(unread_count)(alice) == 2


def test_manage_py_notify(alice, bob, capsys):
    call_command("notify", "--user", "alice", "--user", "bob", "--title", "Hi", "--level",
                 "success", "--data", '{"n": 1}', "--url", "/chat/")  # fmt: skip
    out = capsys.readouterr().out
    assert "to alice" in out and "to bob" in out
    assert Notification.objects.filter(title="Hi", data={"n": 1}).count() == 2
    call_command("notify", "--all", "--title", "Everyone", "--topic", "ops")
    assert Notification.objects.get(title="Everyone").recipient_id is None
    for args, needle in [
        (["--user", "nobody", "--title", "x"], "no such user: nobody"),
        (["--all", "--title", "x", "--level", "loud"], "--level"),
        (["--all", "--title", " "], "--title"),
        (["--all", "--title", "x", "--data", "{oops"], "--data"),
        (["--all", "--title", "x", "--url", "javascript:alert(1)"], "--url"),
    ]:
        with pytest.raises(CommandError, match=needle):
            call_command("notify", *args)
    assert Notification.objects.count() == 3


def test_list_for_marks_broadcast_reads_per_user(alice, bob):
    everyone = notifications.notify(None, title="all")
    NotificationRead.objects.create(notification=everyone, user=alice)
    assert list_for(alice)[0]["read"] is True
    assert list_for(bob)[0]["read"] is False
    assert unread_count(alice) == 0 and unread_count(bob) == 1


def test_fragment_links_only_safe_urls():
    base = {"id": 1, "title": "t", "level": "info", "created_at": "2024-01-01T00:00:00+00:00"}
    for url in ["javascript:alert(1)", "JaVaScRiPt:x", "data:text/html,x", "//evil.example",
                "/\\evil.example", " /x", "http://", "vbscript:x"]:  # fmt: skip
        assert fragment_context({**base, "url": url})["link"] == "", url
    for url in ["/chat/1/", "https://example.com/a?b=1", "http://localhost:8000/"]:
        assert fragment_context({**base, "url": url})["link"] == url
    assert fragment_context({**base, "level": "weird"})["level"] == "info"


# -- the htmx page's HTML endpoints ------------------------------------------------------------
async def test_htmx_endpoints(live_server, alice, bob, login_cookies):
    made = [await send(alice, title=f"<i>n{i}</i>") for i in range(25)]
    theirs = await send(bob, title="bob's")
    cookies = await sync_to_async(login_cookies)(alice)
    async with httpx.AsyncClient(base_url=live_server.url, cookies=cookies, timeout=10) as http:
        page = await http.get("/notifications/htmx/")
        assert page.status_code == 200
        text = page.text
        assert 'sse-swap="notification"' in text and "hx-sse-2.min.js" in text
        assert "/api/notifications/stream/?format=html&amp;lastEventId=" in text
        assert text.count('class="notif level-info unread"') == 20  # the first page
        assert "&lt;i&gt;n24&lt;/i&gt;" in text and "<i>n" not in text
        token = text.split('name="csrf-token" content="')[1].split('"')[0]
        htmx = {"HX-Request": "true", "X-CSRFToken": token}

        older = await http.get(f"/notifications/htmx/items/?before={made[5].pk}")
        assert older.status_code == 200
        assert older.text.count('<li class="notif ') == 5 and "Load older" not in older.text
        assert (await http.get("/notifications/htmx/items/?before=x")).status_code == 400

        response = await http.post(f"/notifications/htmx/{made[0].pk}/read/", headers=htmx)
        assert response.status_code == 200
        assert response.text.startswith(
            f'<li class="notif level-info" id="notification-{made[0].pk}"'
        )
        unread = await http.get("/notifications/htmx/unread/")
        assert "<strong>24</strong> unread" in unread.text
        response = await http.post(f"/notifications/htmx/{theirs.pk}/read/", headers=htmx)
        assert response.status_code == 404
        response = await http.post("/notifications/htmx/read-all/", headers=htmx)
        assert response.status_code == 200 and "unread" not in response.text.split('"notif ')[1]
        # Without htmx, the form posts come back to the page.
        response = await http.post(
            f"/notifications/htmx/{made[1].pk}/read/", headers={"X-CSRFToken": token}
        )
        assert (
            response.status_code == 302 and response.headers["location"] == "/notifications/htmx/"
        )
        assert "You're all caught up" in (await http.get("/notifications/htmx/unread/")).text
    assert await Notification.objects.filter(recipient=bob, read_at__isnull=True).acount() == 1


async def test_page_and_bell_render(live_server, alice, login_cookies):
    await send(alice, title="one")
    cookies = await sync_to_async(login_cookies)(alice)
    async with httpx.AsyncClient(base_url=live_server.url, cookies=cookies, timeout=10) as http:
        text = (await http.get("/notifications/")).text
        assert 'id="notif-list"' in text and "js/notifications.js" in text
        # The bell on every page: its count comes with the page, then from the stream.
        demo = (await http.get("/demo/")).text
        assert 'data-bell data-user="' in demo and 'data-unread="1"' in demo
        assert '<span class="badge" id="bell-badge">1</span>' in demo
        assert "js/bell.js" in demo and "css/notifications.css" in demo
