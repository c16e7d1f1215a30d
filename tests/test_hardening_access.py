"""Access: nothing read or written that is not yours.

- Every URL of the project's URLconf (admin and static aside) x {anonymous, other user,
  owner, staff, a Bearer token of each, a revoked token}: the exact status, streams
  included; a URL added without an entry here fails the suite.
- CSRF: every unsafe method with a session needs the token; Bearer requests are exempt.
- The per-user cap on open streams (the cap on answers is tested in tests/test_chat_api.py,
  revocation in tests/test_revocation.py, login throttling in tests/test_login_throttle.py).
- Production settings: ``manage.py check --deploy`` clean, SECRET_KEY required, DEBUG off
  by default, secure cookies and headers.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.urls import URLPattern, URLResolver, get_resolver
from django.utils import timezone

from chat.models import Conversation, Message
from notifications.models import Notification
from ssechat.accounts.models import ApiToken

from .conftest import session_cookies
from .hardening_tools import record
from .live import ROOT, server_env

pytestmark = pytest.mark.django_db(transaction=True)

ROLES = (
    "anonymous", "other", "owner", "staff",
    "other_bearer", "owner_bearer", "staff_bearer", "revoked",
)  # fmt: skip
SESSIONS = ("other", "owner", "staff")
BEARERS = ("other_bearer", "owner_bearer", "staff_bearer")
CSRF = "c" * 32  # a CSRF secret the client picks: cookie and header must match


# -- the world the requests are about -----------------------------------------------------


class World:
    """Three users (``staff`` is staff and may send notifications), their sessions and
    tokens, a revoked token, and the owner's conversation, answer and notification."""

    def __init__(self) -> None:
        User = get_user_model()
        self.owner = User.objects.create_user("owner", password="x")
        self.other = User.objects.create_user("other", password="x")
        self.staff = User.objects.create_user("staffer", password="x", is_staff=True)
        self.staff.user_permissions.add(Permission.objects.get(codename="add_notification"))
        users = {"owner": self.owner, "other": self.other, "staff": self.staff}
        self.cookies = {role: session_cookies(user) for role, user in users.items()}
        self.tokens = {
            f"{role}_bearer": ApiToken.create_for(user, name="t")[1] for role, user in users.items()
        }
        revoked, self.tokens["revoked"] = ApiToken.create_for(self.owner, name="old")
        revoked.revoke()
        self.conversation = self.fresh_conversation()
        self.answer = self.fresh_answer()
        self.notification = Notification.objects.create(recipient=self.owner, title="yours").pk

    def fresh_conversation(self) -> int:
        now = timezone.now()
        return Conversation.objects.create(
            owner=self.owner, title="mine", created_at=now, updated_at=now
        ).pk

    def fresh_answer(self) -> int:
        """A finished answer (to ``[demo:echo] ok``) in a conversation of its own."""
        conversation = Conversation.objects.get(pk=self.fresh_conversation())
        question = Message.objects.create(
            conversation=conversation, role="user", content="[demo:echo] ok",
            completed_at=timezone.now(),
        )  # fmt: skip
        return Message.objects.create(
            conversation=conversation, role="assistant", content="ok", status="complete",
            reply_to=question, completed_at=timezone.now(),
        ).pk  # fmt: skip

    def headers(self, role: str) -> dict[str, str]:
        headers = {"X-CSRFToken": CSRF}
        cookies = {"csrftoken": CSRF, **self.cookies.get(role, {})}
        headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in cookies.items())
        if role in self.tokens:
            headers["Authorization"] = f"Bearer {self.tokens[role]}"
        return headers


# -- the table ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    method: str
    path: Callable[[World], str]
    expect: dict[str, int]
    body: dict | None = None
    stream: bool = False
    htmx: bool = False
    last: bool = False  # logs the session out: run after everything else


def everyone(status: int) -> dict[str, int]:
    return dict.fromkeys(ROLES, status)


def page(ok: int = 200, *, owner_only: bool = False) -> dict[str, int]:
    """A page: sessions only; a token is no login there (so: the login page)."""
    expect = {role: 302 for role in ROLES}
    for role in SESSIONS:
        expect[role] = ok if (role == "owner" or not owner_only) else 404
    return expect


def api(ok: int = 200, *, owner_only: bool = False, needs_perm: bool = False) -> dict[str, int]:
    """An API or stream URL: sessions and tokens; never a redirect."""
    expect = {"anonymous": 401, "revoked": 401}
    for role in SESSIONS + BEARERS:
        user = role.removesuffix("_bearer")
        if needs_perm:
            expect[role] = ok if user == "staff" else 403
        else:
            expect[role] = ok if (user == "owner" or not owner_only) else 404
    return expect


def v1(ok: int = 200) -> dict[str, int]:
    """The OpenAI-compatible API: Bearer tokens only (a session cookie is no key)."""
    expect = {role: 401 for role in ROLES}
    for role in BEARERS:
        expect[role] = ok
    return expect


def conversation_url(w: World) -> str:
    return f"/api/chat/conversations/{w.conversation}/"


TABLE: dict[str, list[Entry]] = {
    "": [Entry("GET", lambda w: "/", everyone(302))],
    "healthz": [Entry("GET", lambda w: "/healthz", everyone(200))],
    "demo/": [Entry("GET", lambda w: "/demo/", everyone(200))],
    "demo/stream/": [Entry("GET", lambda w: "/demo/stream/", everyone(200), stream=True)],
    "accounts/login/": [
        # A logged-in user is sent on (redirect_authenticated_user).
        Entry(
            "GET", lambda w: "/accounts/login/", {**everyone(200), **dict.fromkeys(SESSIONS, 302)}
        ),
        Entry(
            "POST",
            lambda w: "/accounts/login/",
            {**everyone(200), **dict.fromkeys(SESSIONS, 302)},
            body={"username": "nobody", "password": "wrong"},
        ),
    ],
    "accounts/logout/": [Entry("POST", lambda w: "/accounts/logout/", everyone(302), last=True)],
    "chat/": [Entry("GET", lambda w: "/chat/", page())],
    "chat/<int:pk>/": [Entry("GET", lambda w: f"/chat/{w.conversation}/", page(owner_only=True))],
    "api/chat/conversations/": [
        Entry("GET", lambda w: "/api/chat/conversations/", api()),
        Entry("POST", lambda w: "/api/chat/conversations/", api(201), body={"title": "t"}),
    ],
    "api/chat/conversations/<int:pk>/": [
        Entry("GET", conversation_url, api(owner_only=True)),
        Entry("PATCH", conversation_url, api(owner_only=True), body={"title": "renamed"}),
        Entry(
            "DELETE",
            lambda w: f"/api/chat/conversations/{w.fresh_conversation()}/",
            api(204, owner_only=True),
        ),
    ],
    "api/chat/conversations/<int:pk>/messages/": [
        Entry(
            "POST",
            lambda w: f"/api/chat/conversations/{w.fresh_conversation()}/messages/",
            api(201, owner_only=True),
            body={"content": "[demo:echo] hi"},
        ),
    ],
    "api/chat/messages/<int:pk>/cancel/": [
        Entry("POST", lambda w: f"/api/chat/messages/{w.answer}/cancel/", api(owner_only=True))
    ],
    "api/chat/messages/<int:pk>/regenerate/": [
        Entry(
            "POST",
            lambda w: f"/api/chat/messages/{w.fresh_answer()}/regenerate/",
            api(201, owner_only=True),
        ),
    ],
    "api/chat/conversations/<int:pk>/stream/": [
        Entry(
            "GET",
            lambda w: f"/api/chat/conversations/{w.conversation}/stream/",
            api(owner_only=True),
            stream=True,
        ),
    ],
    "api/chat/messages/<int:pk>/stream/": [
        Entry(
            "GET",
            lambda w: f"/api/chat/messages/{w.answer}/stream/",
            api(owner_only=True),
            stream=True,
        ),
    ],
    "api/notifications/": [
        Entry("GET", lambda w: "/api/notifications/", api()),
        Entry(
            "POST",
            lambda w: "/api/notifications/",
            api(201, needs_perm=True),
            body={"recipient": "owner", "title": "from the table"},
        ),
    ],
    "api/notifications/read-all/": [Entry("POST", lambda w: "/api/notifications/read-all/", api())],
    "api/notifications/stream/": [
        Entry("GET", lambda w: "/api/notifications/stream/", api(), stream=True)
    ],
    "api/notifications/<int:pk>/read/": [
        Entry("POST", lambda w: f"/api/notifications/{w.notification}/read/", api(owner_only=True)),
    ],
    "notifications/": [Entry("GET", lambda w: "/notifications/", page())],
    "notifications/htmx/": [Entry("GET", lambda w: "/notifications/htmx/", page())],
    "notifications/htmx/items/": [Entry("GET", lambda w: "/notifications/htmx/items/", page())],
    "notifications/htmx/unread/": [Entry("GET", lambda w: "/notifications/htmx/unread/", page())],
    "notifications/htmx/read-all/": [
        Entry("POST", lambda w: "/notifications/htmx/read-all/", page(), htmx=True)
    ],
    "notifications/htmx/<int:pk>/read/": [
        Entry(
            "POST",
            lambda w: f"/notifications/htmx/{w.notification}/read/",
            page(owner_only=True),
            htmx=True,
        ),
    ],
    "v1/chat/completions": [
        # Streamed: the status is known once the stream starts (the answer then ends alone).
        Entry(
            "POST",
            lambda w: "/v1/chat/completions",
            v1(),
            body={
                "model": "m",
                "stream": True,
                "messages": [{"role": "user", "content": "[demo:echo] hi"}],
            },
            stream=True,
        ),
    ],
    "v1/models": [Entry("GET", lambda w: "/v1/models", v1())],
    "v1/models/<path:model>": [Entry("GET", lambda w: "/v1/models/ssechat-demo", v1())],
    "^v1/": [Entry("GET", lambda w: "/v1/no-such-thing", {**everyone(404), "revoked": 401})],
}


def project_routes() -> list[str]:
    """Every route of the project's URLconf (ssechat.urls), admin and static aside."""

    def walk(patterns, prefix: str = ""):
        for pattern in patterns:
            route = prefix + str(pattern.pattern)
            if isinstance(pattern, URLResolver):
                if route.startswith("admin/"):
                    continue
                yield from walk(pattern.url_patterns, route)
            elif isinstance(pattern, URLPattern):
                yield route

    return [r for r in walk(get_resolver("ssechat.urls").url_patterns) if "static" not in r]


def test_every_url_has_an_entry_in_the_access_table():
    routes = project_routes()
    missing = sorted(set(routes) - set(TABLE))
    assert not missing, f"URLs without an access entry in {__file__}: {missing}"
    stale = sorted(set(TABLE) - set(routes))
    assert not stale, f"access entries for URLs that no longer exist: {stale}"
    for route, entries in TABLE.items():
        for entry in entries:
            assert set(entry.expect) == set(ROLES), route


def request(
    http: httpx.Client, world: World, entry: Entry, role: str, *, csrf: bool = True,
    path: str | None = None,
):  # fmt: skip
    """One request of the table: (status, content type, response, first bytes)."""
    headers = world.headers(role)
    if not csrf:
        headers.pop("X-CSRFToken")
    if entry.htmx:
        headers["HX-Request"] = "true"
    path = path or entry.path(world)
    kwargs = {}
    if entry.body is not None:
        if path.startswith(("/api/", "/v1/")):
            kwargs["json"] = entry.body
        else:
            kwargs["data"] = entry.body
    try:
        with http.stream(entry.method, path, headers=headers, **kwargs) as response:
            if entry.stream and response.status_code == 200:
                first = next(response.iter_raw(), b"")  # a stream: its first bytes, then leave
            else:
                first = response.read()
    except httpx.HTTPError as exc:
        raise AssertionError(f"{entry.method} {path} as {role}: {exc!r}") from exc
    return response.status_code, response.headers.get("content-type", ""), response, first


def check_answer(route: str, entry: Entry, role: str, path: str, result) -> str | None:
    """None if the answer is the table's; otherwise what is wrong."""
    status, content_type, response, first = result
    want = entry.expect[role]
    where = f"{entry.method} /{route} as {role}"
    if status != want:
        return f"{where}: {status}, expected {want}: {first[:120]!r}"
    if path.startswith(("/api/", "/v1/")):
        # Never a redirect to a login page; errors and answers in JSON.
        if "location" in response.headers:
            return f"{where}: redirects to {response.headers['location']}"
        if entry.stream and status == 200:
            ours = not path.startswith("/v1/")  # OpenAI's streams send no retry: line
            if not content_type.startswith("text/event-stream") or (
                ours and not first.startswith(b"retry:")
            ):
                return f"{where}: not an event stream: {content_type} {first[:40]!r}"
        elif status != 204:
            if not content_type.startswith("application/json"):
                return f"{where}: {content_type}"
            json.loads(first)
    elif status == 302 and role not in SESSIONS and route not in ("", "accounts/logout/"):
        location = response.headers["location"]
        if not location.startswith("/accounts/login/?next="):
            return f"{where}: redirects to {location}"
    return None


def test_access_table(live_server):
    world = World()
    failures: list[str] = []
    checked = 0
    entries = [(route, e) for route, es in TABLE.items() for e in es]
    entries.sort(key=lambda item: item[1].last)  # logouts at the end
    with (
        httpx.Client(base_url=live_server.url, timeout=30) as http,
        ThreadPoolExecutor(len(ROLES)) as pool,
    ):
        for route, entry in entries:
            # The paths first (some make a fresh object of the owner), then the 8 roles at once.
            paths = {role: entry.path(world) for role in ROLES}
            results = pool.map(
                lambda role, e=entry, p=paths: request(http, world, e, role, path=p[role]), ROLES
            )
            for role, result in zip(ROLES, results, strict=True):
                checked += 1
                problem = check_answer(route, entry, role, paths[role], result)
                if problem:
                    failures.append(problem)
    assert not failures, "\n".join(failures)
    record("access_table", urls=len(TABLE), entries=len(entries), roles=len(ROLES),
           requests=checked, mismatches=0)  # fmt: skip
    _wait_for_answers(live_server, world)


def _wait_for_answers(live_server, world: World) -> None:
    """Answers the table started must end before the test does (PostgreSQL flush)."""
    import time

    deadline = time.monotonic() + 30
    while Message.objects.filter(status="streaming").exists():
        assert time.monotonic() < deadline, "answers still streaming"
        time.sleep(0.1)


def test_csrf_on_every_unsafe_session_request_and_not_on_bearer(live_server):
    """Without the CSRF token a session's unsafe request is refused (403, JSON on API
    URLs) before it does anything; the same request with a Bearer token is not."""
    world = World()
    refused = exempt = 0
    with httpx.Client(base_url=live_server.url, timeout=30) as http:
        for route, entries in TABLE.items():
            for entry in entries:
                if entry.method == "GET":
                    continue
                path = entry.path(world)
                status, content_type, _, first = request(http, world, entry, "owner", csrf=False)
                where = f"{entry.method} /{route}"
                if route == "v1/chat/completions":
                    assert status == 401, where  # exempt, and a session is no key there
                    continue
                assert status == 403, (where, status, first[:200])
                if path.startswith("/api/"):
                    assert content_type == "application/json", where
                    assert json.loads(first)["error"] == "csrf_failed"
                refused += 1
                if path.startswith(("/api/", "/v1/")):
                    status, *_ = request(http, world, entry, "owner_bearer", csrf=False)
                    assert status == entry.expect["owner_bearer"], (where, status)
                    exempt += 1
    record("csrf", unsafe_session_requests_refused=refused, bearer_requests_exempt=exempt)
    _wait_for_answers(live_server, world)


def test_per_user_cap_on_open_streams(live_server, make_user, api_token):
    """``SSECHAT_MAX_STREAMS_PER_USER`` (20) streams of one user: the next one is 429 JSON;
    another user is not affected; closing one lets the next one in."""
    import time

    owner = make_user("capped")
    headers = {"Authorization": f"Bearer {api_token(owner)}"}
    other = {"Authorization": f"Bearer {api_token(make_user('uncapped'))}"}
    path = "/api/notifications/stream/"
    limits = httpx.Limits(max_connections=50)
    with httpx.Client(base_url=live_server.url, timeout=30, limits=limits) as http:
        streams = [http.stream("GET", path, headers=headers) for _ in range(20)]
        opened = [s.__enter__() for s in streams]
        try:
            assert [r.status_code for r in opened] == [200] * 20
            refused = http.get(path, headers=headers)
            assert refused.status_code == 429
            assert refused.json()["error"] == "too_many_streams"
            with http.stream("GET", path, headers=other) as response:
                assert response.status_code == 200
            streams.pop().__exit__(None, None, None)
            deadline = time.monotonic() + 10
            while True:
                with http.stream("GET", path, headers=headers) as response:
                    if response.status_code == 200:
                        break
                assert time.monotonic() < deadline, "a closed stream still counted"
                time.sleep(0.1)
        finally:
            for stream in streams:
                stream.__exit__(None, None, None)
    record("stream_cap", cap=20, the_21st=429, after_closing_one=200)


# -- production settings ------------------------------------------------------------------

PRODUCTION = {
    "DEBUG": "0",
    "SECRET_KEY": secrets.token_urlsafe(60),
    "ALLOWED_HOSTS": "example.com",
    "SECURE_SSL_REDIRECT": "1",
    "SECURE_HSTS_SECONDS": "31536000",
    "SECURE_HSTS_INCLUDE_SUBDOMAINS": "1",
    "SECURE_HSTS_PRELOAD": "1",
    "SECURE_PROXY_SSL_HEADER": "1",
}
SHOW_SETTINGS = (
    "import json, django; django.setup(); from django.conf import settings as s; "
    "print(json.dumps({k: getattr(s, k, None) for k in ("
    "'DEBUG', 'SESSION_COOKIE_SECURE', 'CSRF_COOKIE_SECURE', 'SESSION_COOKIE_HTTPONLY', "
    "'SESSION_COOKIE_SAMESITE', 'CSRF_COOKIE_SAMESITE', 'SECURE_CONTENT_TYPE_NOSNIFF', "
    "'X_FRAME_OPTIONS', 'SECURE_REFERRER_POLICY', 'SECURE_CROSS_ORIGIN_OPENER_POLICY')}))"
)


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    base = server_env()
    for name in ("DEBUG", "SECRET_KEY", "ALLOWED_HOSTS", "SESSION_COOKIE_SECURE",
                 "CSRF_COOKIE_SECURE", "SSECHAT_STATS"):  # fmt: skip
        base.pop(name, None)
    base.update(DJANGO_SETTINGS_MODULE="ssechat.settings", **env)
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=base, capture_output=True, text=True, timeout=120
    )


def test_production_settings():
    """In subprocesses, side by side: the deploy check with production settings is clean;
    without SECRET_KEY the settings refuse to load; DEBUG is off unless asked for, and then
    cookies are secure and the security headers set."""
    jobs = {
        "deploy": (["manage.py", "check", "--deploy", "--fail-level", "WARNING"], PRODUCTION),
        "no_key": (["-c", "import django; django.setup()"], {}),
        "defaults": (["-c", SHOW_SETTINGS], {"SECRET_KEY": "k" * 50}),
    }
    with ThreadPoolExecutor(len(jobs)) as pool:
        done = dict(zip(jobs, pool.map(lambda job: _run(*job), jobs.values()), strict=True))
    deploy = done["deploy"]
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    assert "System check identified no issues" in deploy.stdout + deploy.stderr
    assert "WARNINGS" not in deploy.stdout + deploy.stderr
    assert done["no_key"].returncode != 0  # DEBUG unset: off, and then a key is required
    assert "SECRET_KEY must be set when DEBUG is off" in done["no_key"].stderr
    values = json.loads(done["defaults"].stdout.strip().splitlines()[-1])
    assert values == {
        "DEBUG": False,
        "SESSION_COOKIE_SECURE": True,
        "CSRF_COOKIE_SECURE": True,
        "SESSION_COOKIE_HTTPONLY": True,
        "SESSION_COOKIE_SAMESITE": "Lax",
        "CSRF_COOKIE_SAMESITE": "Lax",
        "SECURE_CONTENT_TYPE_NOSNIFF": True,
        "X_FRAME_OPTIONS": "DENY",
        "SECURE_REFERRER_POLICY": "same-origin",
        "SECURE_CROSS_ORIGIN_OPENER_POLICY": "same-origin",
    }
    record("production_settings", check_deploy_warnings=0, loads_without_secret_key=False,
           debug_default=False)  # fmt: skip


def test_security_headers_on_pages_api_and_streams(live_server, alice, api_token):
    """The test servers run the production settings (plain HTTP, so cookies not Secure)."""
    token = api_token(alice)
    with httpx.Client(base_url=live_server.url, timeout=30) as http:
        responses = {
            "page": http.get("/accounts/login/"),
            "api": http.get("/api/notifications/", headers={"Authorization": f"Bearer {token}"}),
        }
        with http.stream("GET", "/api/notifications/stream/",
                         headers={"Authorization": f"Bearer {token}"}) as stream:  # fmt: skip
            responses["stream"] = stream
        for kind, response in responses.items():
            assert response.headers["x-frame-options"] == "DENY", kind
            assert response.headers["x-content-type-options"] == "nosniff", kind
            assert response.headers["referrer-policy"] == "same-origin", kind
        cookie = responses["page"].headers["set-cookie"]
        assert "csrftoken=" in cookie and "SameSite=Lax" in cookie
        # Logging in: the session cookie is HttpOnly and SameSite=Lax.
        login = http.post(
            "/accounts/login/",
            data={"username": "alice", "password": "correct horse battery",
                  "csrfmiddlewaretoken": http.cookies["csrftoken"]},
        )  # fmt: skip
        assert login.status_code == 302
        session = [c for c in login.headers.get_list("set-cookie") if c.startswith("sessionid=")]
        assert session and "HttpOnly" in session[0] and "SameSite=Lax" in session[0]
