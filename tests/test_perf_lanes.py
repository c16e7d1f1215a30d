"""The lean lanes: the JSON API lane answers exactly as Django's full path does,
and the stream lane's session lookup (plain SQL, cached rows) stays exact."""

from __future__ import annotations

import asyncio
import json

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AnonymousUser, Permission
from django.db import DatabaseError
from django.utils import timezone

from ssechat.accounts.fastauth import StreamAuthenticator, get_authenticator
from ssechat.accounts.models import ApiToken, hash_token
from ssechat.streams.handler import ASGIHandler

from .conftest import session_cookies

pytestmark = pytest.mark.django_db(transaction=True)


async def call(app, method: str, path: str, *, token: str | None = None, body=None, **headers):
    """One request to an ASGI app in this process: (status, headers, body bytes)."""
    path, _, query = path.partition("?")
    raw = b""
    if body is not None:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    head = [(b"host", b"localhost")]
    if token is not None:
        head.append((b"authorization", f"Bearer {token}".encode()))
    if body is not None:
        head.append((b"content-length", str(len(raw)).encode()))
        head.append((b"content-type", headers.pop("content_type", "application/json").encode()))
    for name, value in headers.items():
        head.append((name.replace("_", "-").encode(), value.encode()))
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
        "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
        "query_string": query.encode(), "root_path": "", "headers": head,
        "client": ("127.0.0.1", 40000), "server": ("localhost", 80),
    }  # fmt: skip
    sent: list[dict] = []
    pending = [{"type": "http.request", "body": raw, "more_body": False}]

    async def receive():
        if pending:
            return pending.pop()
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    await asyncio.wait_for(app(scope, receive, send), 20)
    start = sent[0]
    names = {k.decode().lower(): v.decode() for k, v in start["headers"]}
    return start["status"], names, b"".join(m.get("body", b"") for m in sent[1:])


@pytest.fixture
def apps():
    """(lane, full): the same handler with the API lane on, and off."""
    lane, full = ASGIHandler(), ASGIHandler()
    full.apilane.enabled = False
    return lane, full


@pytest.fixture
def staff(make_user, api_token):
    user = make_user("staffer", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="add_notification"))
    return user, api_token(user)


def _same(a, b):
    """Two answers are the same but for ids and times."""
    status_a, headers_a, body_a = a
    status_b, headers_b, body_b = b
    assert status_a == status_b
    assert headers_a == headers_b
    data_a, data_b = json.loads(body_a), json.loads(body_b)
    for data in (data_a, data_b):
        for key in ("id", "created_at"):
            data.pop(key, None)
        for item in data.get("results", []):
            item.pop("id", None)
            item.pop("created_at", None)
    assert data_a == data_b
    return status_a, data_a


NOTE = {"recipient": None, "title": "Hello", "body": "x", "topic": "ops"}


async def test_publish_takes_the_lane_and_answers_as_django_does(apps, staff, alice, api_token):
    lane, full = apps
    _, token = staff
    plain = await asyncio.to_thread(api_token, alice)
    cases = [
        ("POST", "/api/notifications/", token, NOTE, {}),
        ("POST", "/api/notifications/", token, {**NOTE, "recipient": "alice"}, {}),
        ("POST", "/api/notifications/", plain, NOTE, {}),  # 403: no permission
        ("POST", "/api/notifications/", token, b"{nope", {}),
        ("POST", "/api/notifications/", token, b"", {}),
        ("POST", "/api/notifications/", token, NOTE, {"content_type": "text/html"}),
        ("POST", "/api/notifications/", token, {**NOTE, "colour": 1}, {}),
        ("POST", "/api/notifications/", token, {**NOTE, "recipient": "nobody"}, {}),
        ("POST", "/api/notifications/", token, {**NOTE, "level": "loud"}, {}),
        ("POST", "/api/notifications/", "ssc_not-a-token", NOTE, {}),
        ("GET", "/api/notifications/?limit=5", token, None, {}),
        ("GET", "/api/notifications/?limit=abc", token, None, {}),
        ("GET", "/api/notifications/?unread=true&topic=ops", plain, None, {}),
        ("PUT", "/api/notifications/", token, NOTE, {}),
        ("POST", "/api/notifications/999999/read/", plain, b"", {}),
        ("POST", "/api/notifications/read-all/", plain, b"", {}),
        ("GET", "/api/notifications/read-all/", plain, None, {}),
    ]
    statuses = []
    for method, path, tok, body, extra in cases:
        before = lane.apilane.served
        on_lane = await call(lane, method, path, token=tok, body=body, **extra)
        assert lane.apilane.served == before + 1, (method, path)
        on_full = await call(full, method, path, token=tok, body=body, **extra)
        assert full.apilane.served == 0
        status, data = _same(on_lane, on_full)
        statuses.append(status)
        if status >= 400:
            assert set(data) >= {"error", "detail"}, data
    assert statuses == [201, 201, 403, 400, 400, 415, 400, 400, 400, 401, 200, 400, 200, 405,
                        404, 200, 405]  # fmt: skip


async def test_unusual_requests_keep_djangos_path(apps, staff, alice, settings):
    lane, _ = apps
    _, token = staff
    jar = await asyncio.to_thread(session_cookies, alice)
    cookies = "; ".join(f"{k}={v}" for k, v in jar.items())
    too_big = b"x" * (settings.DATA_UPLOAD_MAX_MEMORY_SIZE + 1)
    cases = [
        ("POST", "/api/notifications/", token, NOTE, {"cookie": cookies}, 201),
        ("POST", "/api/notifications/", None, NOTE, {}, 401),  # no token: Django's 401
        ("POST", "/api/notifications/", token, too_big, {}, 413),
        ("GET", "/api/chat/conversations/", token, None, {}, 200),  # not a lane view
        ("GET", "/api/notifications/", token, None, {"host": "evil.example"}, 400),
    ]
    for method, path, tok, body, extra, expected in cases:
        host = extra.pop("host", None)
        if host is not None:
            status, _, _ = await call_with_host(lane, method, path, tok, host)
        else:
            status, _, _ = await call(lane, method, path, token=tok, body=body, **extra)
        assert status == expected, (method, path, extra)
    assert lane.apilane.served == 0


async def call_with_host(app, method, path, token, host):
    """A request whose Host header is not an allowed host."""
    pending = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive():
        if pending:
            return pending.pop()
        await asyncio.sleep(3600)

    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
        "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
        "query_string": b"", "root_path": "", "client": ("127.0.0.1", 40000),
        "server": ("localhost", 80),
        "headers": [(b"host", host.encode()), (b"authorization", f"Bearer {token}".encode())],
    }  # fmt: skip
    await asyncio.wait_for(app(scope, receive, send), 20)
    return sent[0]["status"], {}, b""


async def test_database_errors_are_503_on_both_lanes(apps, staff, monkeypatch):
    from notifications import services

    def down(*args, **kwargs):
        raise DatabaseError("the database is down")

    monkeypatch.setattr(services, "notify", down)
    lane, full = apps
    _, token = staff
    on_lane = await call(lane, "POST", "/api/notifications/", token=token, body=NOTE)
    on_full = await call(full, "POST", "/api/notifications/", token=token, body=NOTE)
    assert _same(on_lane, on_full)[0] == 503
    assert lane.apilane.served == 1


async def test_lane_sees_a_revoked_token_and_a_lost_permission(apps, staff):
    lane, _ = apps
    user, token = staff
    assert (await call(lane, "POST", "/api/notifications/", token=token, body=NOTE))[0] == 201
    # Permissions changed in this process: the cached user is dropped at once.
    await asyncio.to_thread(user.user_permissions.clear)
    assert (await call(lane, "POST", "/api/notifications/", token=token, body=NOTE))[0] == 403
    await asyncio.to_thread(lambda: ApiToken.objects.get(user=user).revoke())
    status, _, body = await call(lane, "POST", "/api/notifications/", token=token, body=NOTE)
    assert status == 401 and json.loads(body)["error"] == "invalid_token"


# -- the stream lane's session lookup ------------------------------------------------


def _session_key(user) -> str:
    from django.conf import settings

    return session_cookies(user)[settings.SESSION_COOKIE_NAME]


def test_session_user_is_the_orm_user(alice):
    auth = StreamAuthenticator()
    key = _session_key(alice)
    cold = auth.user_for_session(key)  # session, then the user's row
    warm = auth.user_for_session(key)  # both in one query
    orm = get_user_model().objects.get(pk=alice.pk)
    for user in (cold, warm):
        assert user.is_authenticated
        for field in orm._meta.concrete_fields:
            assert getattr(user, field.attname) == getattr(orm, field.attname), field.name
    assert warm is cold  # the same row: the same instance, its hash computed once


def test_password_change_and_deactivation_take_effect_at_once_even_unsignalled(alice):
    """Another process changes the user (no signal here): the next connect sees it."""
    auth = StreamAuthenticator()
    key = _session_key(alice)
    assert auth.user_for_session(key).is_authenticated
    User = get_user_model()
    User.objects.filter(pk=alice.pk).update(is_active=False)  # no post_save
    assert isinstance(auth.user_for_session(key), AnonymousUser)
    User.objects.filter(pk=alice.pk).update(is_active=True)
    assert auth.user_for_session(key).is_authenticated
    alice.set_password("a new one")
    User.objects.filter(pk=alice.pk).update(password=alice.password)
    assert isinstance(auth.user_for_session(key), AnonymousUser)


def test_user_saved_drops_cached_token_users(alice, api_token):
    auth = get_authenticator()
    token = api_token(alice)
    assert auth.user_for_token(token).pk == alice.pk
    alice.is_active = False
    alice.save()  # post_save: this process forgets the user's cached token
    assert auth.user_for_token(token) is None


def test_a_fresh_token_lookup_fills_the_cache_and_a_refused_one_empties_it(alice, api_token):
    """The API middleware reads every token afresh (a revoked one is refused at once)
    and leaves the user in the lanes' cache; a token it finds revoked leaves it."""
    auth = get_authenticator()
    token = api_token(alice)
    assert auth.cached_user_for_token(token) is None
    assert auth.user_for_token(token, fresh=True).pk == alice.pk
    assert auth.cached_user_for_token(token).pk == alice.pk
    # Revoked where no signal reaches this process (another host): only a fresh read sees it.
    ApiToken.objects.filter(key_hash=hash_token(token)).update(revoked_at=timezone.now())
    assert auth.cached_user_for_token(token).pk == alice.pk
    assert auth.user_for_token(token, fresh=True) is None
    assert auth.cached_user_for_token(token) is None


def test_sessions_of_a_deleted_user_or_a_logged_out_session_are_anonymous(alice, make_user):
    auth = StreamAuthenticator()
    key = _session_key(alice)
    assert auth.user_for_session(key).is_authenticated
    from django.contrib.sessions.models import Session

    Session.objects.filter(session_key=key).delete()  # logout
    assert isinstance(auth.user_for_session(key), AnonymousUser)
    bob = make_user("bob")
    key = _session_key(bob)
    assert auth.user_for_session(key).is_authenticated
    bob.delete()
    assert isinstance(auth.user_for_session(key), AnonymousUser)
    assert isinstance(auth.user_for_session("not a key!"), AnonymousUser)
    assert isinstance(auth.user_for_session(None), AnonymousUser)


def test_plain_insert_stores_what_the_orm_stores(alice):
    from notifications.models import Notification
    from ssechat.streams.models import Event
    from ssechat.streams.rows import insert

    fields = {"recipient": alice, "title": "Tëst", "topic": "ops", "data": {"k": [1, "é"]}}
    ours = insert(Notification(**fields), "default")
    theirs = Notification.objects.create(**fields)
    assert ours.pk and not ours._state.adding and ours._state.db == "default"
    stored, expected = (Notification.objects.get(pk=n.pk) for n in (ours, theirs))
    for field in Notification._meta.concrete_fields:
        if field.name not in ("id", "created_at"):
            assert getattr(stored, field.attname) == getattr(expected, field.attname), field.name
    assert stored.created_at == ours.created_at
    event = insert(Event(channel="c", type="t", data="{}"), "default")
    assert Event.objects.filter(pk=event.pk, channel="c", parent="", type="t").exists()


async def test_stream_prefetch_runs_in_the_authentication_call(alice, monkeypatch):
    """A stream view's ``stream_prefetch`` gets the user and horizon, on the db pool."""
    import threading

    from notifications import feed, services

    calls = []

    def prefetch(user, horizon):
        calls.append((user.pk, horizon, threading.current_thread().name))
        return services.feed_prefetch(user, horizon)

    monkeypatch.setattr(feed.notification_stream, "stream_prefetch", prefetch, raising=False)
    jar = await asyncio.to_thread(session_cookies, alice)
    cookie = "; ".join(f"{k}={v}" for k, v in jar.items())
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": "/api/notifications/stream/",
        "raw_path": b"/api/notifications/stream/", "query_string": b"", "root_path": "",
        "headers": [(b"host", b"localhost"), (b"cookie", cookie.encode())],
        "client": ("127.0.0.1", 40000), "server": ("localhost", 80),
    }  # fmt: skip
    first = asyncio.Event()
    gone = asyncio.Event()
    sent: list[dict] = []
    pending = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive():
        if pending:
            return pending.pop()
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)
        if message.get("body"):
            first.set()

    task = asyncio.create_task(ASGIHandler()(scope, receive, send))
    await asyncio.wait_for(first.wait(), 20)
    gone.set()
    await asyncio.wait_for(task, 20)
    assert sent[0]["status"] == 200
    assert len(calls) == 1 and calls[0][0] == alice.pk
    assert calls[0][2].startswith("ssechat-db")
    count = await asyncio.to_thread(services.feed_prefetch, alice, calls[0][1])
    assert count == (calls[0][1], 0)


async def test_password_change_and_deactivation_refuse_the_next_connect_at_once(live_server, alice):
    """The server caches users; a change made elsewhere (here: the test process) still
    refuses that session's next connect, with no wait for any cache to expire."""
    import httpx
    from django.conf import settings

    jar = await asyncio.to_thread(session_cookies, alice)
    headers = {"Cookie": f"{settings.SESSION_COOKIE_NAME}={jar[settings.SESSION_COOKIE_NAME]}"}
    url = "/api/notifications/stream/"
    async with httpx.AsyncClient(base_url=live_server.url, timeout=10) as client:

        async def status() -> int:
            async with client.stream("GET", url, headers=headers) as response:
                return response.status_code

        assert await status() == 200
        assert await status() == 200  # now cached in the server

        def change_password():
            alice.set_password("another horse battery")
            alice.save()

        await asyncio.to_thread(change_password)
        assert await status() == 401
        jar = await asyncio.to_thread(session_cookies, alice)  # a new login works
        headers["Cookie"] = f"{settings.SESSION_COOKIE_NAME}={jar[settings.SESSION_COOKIE_NAME]}"
        assert await status() == 200
        await asyncio.to_thread(
            get_user_model().objects.filter(pk=alice.pk).update, is_active=False
        )
        assert await status() == 401


def test_permission_checks_are_cached_and_dropped_on_change(make_user, django_assert_num_queries):
    auth = get_authenticator()
    user = make_user("sender")
    perm = "notifications.add_notification"
    assert auth.has_perm(user, perm) is False
    user.user_permissions.add(Permission.objects.get(codename="add_notification"))
    fresh = get_user_model().objects.get(pk=user.pk)
    assert auth.has_perm(fresh, perm) is True
    with django_assert_num_queries(0):
        assert auth.has_perm(get_user_model()(pk=user.pk, is_active=True), perm) is True
    fresh.is_active = False
    fresh.save()
    assert auth.has_perm(fresh, perm) is False


async def test_token_lookup_failing_on_the_database_is_503_on_both_lanes(apps, staff, monkeypatch):
    from ssechat.accounts import middleware

    def down(token):
        raise DatabaseError("the database is down")

    monkeypatch.setattr(middleware, "user_for_token_sync", down)
    lane, full = apps
    _, token = staff
    get_authenticator().tokens.items.clear()
    on_lane = await call(lane, "POST", "/api/notifications/", token=token, body=NOTE)
    on_full = await call(full, "POST", "/api/notifications/", token=token, body=NOTE)
    assert _same(on_lane, on_full)[0] == 503


async def test_stream_lane_sets_the_script_prefix_of_a_root_path(monkeypatch):
    """The lane skips setting the prefix while every request has none; a request with
    a root_path gets it, and later root requests get "/" again."""
    from django.urls import get_script_prefix

    from ssechat.api import json_error
    from ssechat.streams.fastlane import FastLane

    seen: list[str] = []

    async def get_response(self, handler, scope, body, match):
        seen.append(get_script_prefix())
        return None, json_error(401, "not_authenticated", "no")

    monkeypatch.setattr(FastLane, "get_response", get_response)
    app = ASGIHandler()

    async def stream_request(root: str) -> None:
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
            "scheme": "http", "path": f"{root}/api/notifications/stream/",
            "raw_path": f"{root}/api/notifications/stream/".encode(), "query_string": b"",
            "root_path": root, "headers": [(b"host", b"localhost")],
            "client": ("127.0.0.1", 40000), "server": ("localhost", 80),
        }  # fmt: skip
        pending = [{"type": "http.request", "body": b"", "more_body": False}]

        async def receive():
            return pending.pop() if pending else await asyncio.sleep(3600)

        async def send(message):
            pass

        # Each request in a task of its own, from this context, as a server runs them.
        await asyncio.wait_for(asyncio.ensure_future(app(scope, receive, send)), 20)

    await stream_request("")
    await stream_request("/sub")
    await stream_request("")
    assert seen == ["/", "/sub/", "/"]
