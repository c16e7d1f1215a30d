"""HTML: every place user or model text reaches a page or an HTML fragment is escaped.

Payloads with a script, event handlers, attribute break-outs and ``javascript:`` URLs are
stored in every user-writable field (straight through the ORM, as if validation had been
bypassed), then every server-rendered page and fragment that shows them is fetched from a
live server and parsed: the payloads must appear as text, never as a script, an event
handler, a new element or a ``javascript:`` link. The notification fragment is also fuzzed
with hypothesis. (Pages built by JavaScript render text with textContent; the chat's
Markdown, built as DOM nodes, is tested with these payloads in tests/test_chat_browser.py.)
"""

from __future__ import annotations

import json
from html.parser import HTMLParser
from urllib.parse import quote

import httpx
import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone
from hypothesis import given, settings
from hypothesis import strategies as st

from chat.models import Conversation, Message
from notifications import services
from notifications.feed import html_frame
from notifications.models import Notification
from ssechat.accounts.models import ApiToken
from ssechat.streams.hub import StoredEvent

from .conftest import session_cookies
from .hardening_tools import record
from .sse import parse

pytestmark = pytest.mark.django_db(transaction=True)

MARK = "xss-"
PAYLOADS = [
    '<script>alert("xss-1")</script>',
    '"><img src=x onerror=alert("xss-2")>',
    "' onmouseover='alert(\"xss-3\")' x='",
    '<svg/onload=alert("xss-4")>',
    "</textarea></title><iframe srcdoc=\"<script>alert('xss-5')</script>\">",
    "<a href=javascript:alert('xss-6')>x</a>",
]
ALL = " ".join(PAYLOADS)
JS_URL = 'javascript:alert("xss-7")'
CSRF = "c" * 32
URL_ATTRS = {"href", "src", "action", "formaction", "xlink:href", "data", "poster"}


class Injections(HTMLParser):
    """Where a marked payload became markup: a script, a handler, an element, a link."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.found: list[str] = []
        self.text: list[str] = []
        self._script: str | None = None

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            value = value or ""
            if name.startswith("on") and MARK in value:
                self.found.append(f"<{tag} {name}={value!r}>")
            if name in URL_ATTRS and value.strip().lower().startswith("javascript:"):
                self.found.append(f"<{tag} {name}={value!r}>")
            if name == "srcdoc" and MARK in value:
                self.found.append(f"<{tag} srcdoc>")
            if tag in ("img", "svg", "iframe") and name in ("src", "srcdoc") and value == "x":
                self.found.append(f"<{tag} {name}=x>")
        if tag == "script":
            kind = dict(attrs).get("type") or ""
            self._script = kind
        if tag in ("svg", "iframe") and any(MARK in (v or "") for _, v in attrs):
            self.found.append(f"<{tag}>")

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag):
        if tag == "script":
            self._script = None

    def handle_data(self, data):
        if self._script is not None:
            if "json" in self._script:
                if "<" in data:  # json_script escapes it: a "</script>" could end the block
                    self.found.append("unescaped '<' in a JSON script block")
            elif MARK in data:
                self.found.append(f"script: {data[:80]!r}")
            return
        self.text.append(data)


def injections(html: str) -> tuple[list[str], str]:
    parser = Injections()
    parser.feed(html)
    parser.close()
    return parser.found, "".join(parser.text)


def check(html: str, where: str, *, must_show: tuple[str, ...] = ()) -> int:
    """No injection in ``html``; the payloads listed in ``must_show`` are there, as text."""
    found, text = injections(html)
    assert not found, (where, found)
    for payload in must_show:
        assert payload in text, (where, payload, text[:500])
    return len(must_show)


# -- the world ---------------------------------------------------------------------------


def hostile_world():
    """Every user-writable field holds the payloads."""
    User = get_user_model()
    owner = User.objects.create_user(
        "victim", password="x", first_name=PAYLOADS[1][:150], last_name=PAYLOADS[3]
    )
    admin = User.objects.create_user("root", password="x", is_staff=True, is_superuser=True)
    linked = Notification.objects.create(
        recipient=owner, title=PAYLOADS[0][:200], body=ALL, url="/chat/?q=" + PAYLOADS[1],
        topic="t' onmouseover='alert(\"xss-8\")", level='"><svg onload=alert("xss-9")>'[:16],
    )  # fmt: skip
    js = Notification.objects.create(
        recipient=owner, title=PAYLOADS[1], body=PAYLOADS[2], url=JS_URL, topic="general"
    )
    broadcast = Notification.objects.create(recipient=None, title=PAYLOADS[3], body=PAYLOADS[4])
    services.resend([linked, js, broadcast])  # their events, for the live feed
    now = timezone.now()
    conversation = Conversation.objects.create(
        owner=owner, title=PAYLOADS[4][:200], created_at=now, updated_at=now
    )
    question = Message.objects.create(
        conversation=conversation, role="user", content=ALL, completed_at=now
    )
    answer = Message.objects.create(
        conversation=conversation, role="assistant", content=ALL + "\n[x](" + JS_URL + ")",
        status="failed", error=PAYLOADS[0], model=PAYLOADS[2][:100], reply_to=question,
        completed_at=now,
    )  # fmt: skip
    token, _ = ApiToken.create_for(owner, name=PAYLOADS[1][:100])
    return {
        "owner": owner, "admin": admin, "notifications": [linked.pk, js.pk, broadcast.pk],
        "conversation": conversation.pk, "messages": [question.pk, answer.pk], "token": token.pk,
    }  # fmt: skip


def test_pages_and_fragments_escape_user_and_model_text(live_server):
    world = hostile_world()
    csrf = {"csrftoken": CSRF}  # a secret the client picks, sent back as X-CSRFToken
    owner_cookies = {**session_cookies(world["owner"]), **csrf}
    js = world["notifications"][1]
    pages = 0
    shown = 0
    with httpx.Client(base_url=live_server.url, timeout=30, cookies=owner_cookies) as http:
        for path, must_show in [
            ("/notifications/htmx/", (PAYLOADS[0], ALL, PAYLOADS[1], PAYLOADS[3])),
            ("/notifications/htmx/items/", (PAYLOADS[0], ALL)),
            ("/notifications/", ()),  # the topics (and the bell); the list comes as JSON
            ("/chat/", ()),
            (f"/chat/{world['conversation']}/", ()),
            ("/demo/?q=" + quote(ALL), ()),  # the query string, echoed in the login link
        ]:
            response = http.get(path)
            assert response.status_code == 200, path
            shown += check(response.text, path, must_show=must_show)
            pages += 1
        # The topic holding a payload is an <option> on the notifications page: as text.
        assert "t' onmouseover='alert(\"xss-8\")" in injections(http.get("/notifications/").text)[1]
        # The htmx fragment after marking one read.
        response = http.post(
            f"/notifications/htmx/{js}/read/", headers={"X-CSRFToken": CSRF, "HX-Request": "true"}
        )
        assert response.status_code == 200
        shown += check(response.text, "htmx read fragment", must_show=(PAYLOADS[1], PAYLOADS[2]))
        assert "javascript:" not in response.text  # an unsafe link is no link at all
        pages += 1
        # The live feed's HTML fragments (from the start of the log, which this test
        # process wrote: the server has read it once its hub's horizon is there).
        live_server.wait_for_log()
        parser_events = _html_feed(http)
        for data in parser_events:
            shown += check(data, "feed fragment")
        assert len(parser_events) == 3
        pages += len(parser_events)
        # JSON is served as JSON (nosniff): a browser never renders it as HTML.
        for path in ("/api/notifications/", f"/api/chat/conversations/{world['conversation']}/"):
            response = http.get(path)
            assert response.headers["content-type"] == "application/json", path
            assert response.headers["x-content-type-options"] == "nosniff", path

    # Pages anyone sees: the login page echoes `next` and the username.
    with httpx.Client(base_url=live_server.url, timeout=30, cookies=csrf) as http:
        response = http.get("/accounts/login/?next=" + quote(PAYLOADS[1]))
        shown += check(response.text, "login next")
        response = http.post(
            "/accounts/login/?next=" + quote(JS_URL),
            data={"username": PAYLOADS[1][:150], "password": "x", "next": JS_URL},
            headers={"X-CSRFToken": CSRF},
        )
        assert response.status_code == 200  # a failed login: the form again
        shown += check(response.text, "login failed")
        assert "javascript:" not in response.headers.get("location", "")
        response = http.get("/" + quote(PAYLOADS[0]) + "/")
        assert response.status_code == 404
        shown += check(response.text, "404")
        pages += 3
    # A successful login with a javascript: `next` goes to the default page, not the URL.
    with httpx.Client(base_url=live_server.url, timeout=30, cookies=csrf) as http:
        response = http.post(
            "/accounts/login/",
            data={"username": "victim", "password": "x", "next": JS_URL},
            headers={"X-CSRFToken": CSRF},
        )
        assert response.status_code == 302
        assert response.headers["location"] == "/chat/"
    record("html_escaping", pages_and_fragments=pages, payloads=len(PAYLOADS) + 1,
           payloads_seen_as_text=shown, injections=0)  # fmt: skip


def test_admin_pages_escape_user_and_model_text(start_server):
    """The admin's lists, forms and messages. On a server of its own: the admin caches
    content type ids, which the database flush after each test changes, and a shared
    server would then fail the next test's admin writes."""
    server = start_server()
    world = hostile_world()
    admin_cookies = {**session_cookies(world["admin"]), "csrftoken": CSRF}
    linked, js, _ = world["notifications"]
    pages = shown = 0
    with httpx.Client(base_url=server.url, timeout=30, cookies=admin_cookies) as http:
        answer = world["messages"][1]
        for path, must_show in [
            ("/admin/notifications/notification/", (PAYLOADS[0], PAYLOADS[1], PAYLOADS[3])),
            (f"/admin/notifications/notification/{linked}/change/", (PAYLOADS[0],)),
            (f"/admin/notifications/notification/{js}/change/", (PAYLOADS[1],)),
            ("/admin/chat/conversation/", (PAYLOADS[4][:200],)),
            (f"/admin/chat/conversation/{world['conversation']}/change/", ()),
            ("/admin/chat/message/", ()),
            (f"/admin/chat/message/{answer}/change/", (PAYLOADS[0],)),
            ("/admin/accounts/apitoken/", (PAYLOADS[1][:100],)),
            ("/admin/auth/user/", (PAYLOADS[1],)),
            (f"/admin/auth/user/{world['owner'].pk}/change/", ()),
        ]:
            response = http.get(path)
            assert response.status_code == 200, path
            shown += check(response.text, path, must_show=must_show)
            pages += 1
        # Sending one from the admin: the confirmation repeats the title.
        response = http.post(
            "/admin/notifications/notification/add/",
            data={"recipient": "", "level": "info", "topic": "general", "title": PAYLOADS[1],
                  "body": PAYLOADS[0], "url": "", "data": "{}"},
            headers={"X-CSRFToken": CSRF}, follow_redirects=True,
        )  # fmt: skip
        assert response.status_code == 200
        shown += check(response.text, "admin add + message", must_show=(PAYLOADS[1],))
        assert f"Sent “{PAYLOADS[1]}”" in injections(response.text)[1]
        pages += 1

    record("html_escaping_admin", pages=pages, payloads_seen_as_text=shown, injections=0)


def _html_feed(http: httpx.Client) -> list[str]:
    """The notification fragments of the owner's feed, from the start of the log."""
    events = []
    with http.stream(
        "GET", "/api/notifications/stream/?format=html&lastEventId=0",
        headers={"Accept": "text/event-stream"},
    ) as response:  # fmt: skip
        assert response.status_code == 200
        raw = b""
        for chunk in response.iter_raw():
            raw += chunk
            events = parse(raw).events
            if any(e.type == "unread" for e in events):
                break
    return [e.data for e in events if e.type == "notification"]


# -- the fragment, fuzzed ----------------------------------------------------------------

FRAGMENT_TEXT = st.lists(
    st.sampled_from([*PAYLOADS, JS_URL, "<", ">", '"', "'", "&", "&amp;", "\n", "{{", "{%"])
    | st.text(max_size=10),
    max_size=8,
).map("".join)


@settings(max_examples=100, deadline=None, derandomize=True, database=None)
@given(title=FRAGMENT_TEXT, body=FRAGMENT_TEXT, url=FRAGMENT_TEXT, topic=FRAGMENT_TEXT)
def test_notification_fragment_fuzzed(title, body, url, topic):
    """Whatever a stored notification holds, its fragment shows it as text."""
    payload = {
        "id": 7, "topic": topic, "level": "info", "title": title, "body": body, "url": url,
        "data": {}, "created_at": "2026-01-01T00:00:00+00:00", "read": False,
    }  # fmt: skip
    event = StoredEvent(7, "notifications:user:1", "", "notification", json.dumps(payload))
    frames = parse(html_frame(event)).events
    assert len(frames) == 1 and frames[0].type == "notification"
    found, text = injections(frames[0].data)
    assert not found, found
    if title.strip():  # (titles are stored stripped; {% spaceless %} drops blank ones)
        assert title.replace("\r\n", "\n").replace("\r", "\n") in text


# -- pages built by script -----------------------------------------------------------------

ROWS = "#notif-list > li.notif:not(.notif-skeleton)"
FIND_INJECTIONS = """() => {
  const bad = [];
  for (const el of document.querySelectorAll("*")) {
    for (const attr of el.attributes) {
      const value = attr.value || "";
      const where = el.tagName + " " + attr.name;
      if (attr.name.startsWith("on") && value.includes("xss-")) bad.push(where);
      if (["href", "src", "action", "formaction"].includes(attr.name)
          && /^\\s*javascript:/i.test(value)) bad.push(where);
      if (attr.name === "srcdoc") bad.push(el.tagName + " srcdoc");
    }
    if (el.tagName === "SCRIPT" && el.textContent.includes("xss-")) bad.push("script");
  }
  return bad;
}"""


@pytest.mark.browser
def test_script_built_pages_keep_hostile_text_as_text(live_server, browser_context):
    """The notifications page (list from the JSON API, new ones live) and the bell's toasts
    on other pages, in Chromium: the payloads are shown as text and nothing runs."""
    from playwright.sync_api import expect

    from .browser import login, off_browser_loop

    with off_browser_loop():
        world = hostile_world()
        # An unknown level is another matter: test_unknown_level_is_still_listed.
        Notification.objects.filter(level__startswith='"').update(level="warning")
    login(browser_context, live_server.url, world["owner"])
    dialogs: list[str] = []
    notifications = browser_context.new_page()
    notifications.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    notifications.goto(live_server.url + "/notifications/")
    expect(notifications.locator(ROWS)).to_have_count(3, timeout=20_000)
    chat = browser_context.new_page()
    chat.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    chat.goto(live_server.url + "/chat/")
    expect(chat.locator("[data-bell]")).to_have_attribute("data-state", "live", timeout=20_000)

    with off_browser_loop():  # a new one, live: the list and a toast
        live = Notification.objects.create(
            recipient=world["owner"], title=PAYLOADS[5], body=PAYLOADS[1], url=JS_URL
        )
        services.resend([live])
    expect(notifications.locator(ROWS)).to_have_count(4, timeout=20_000)
    expect(notifications.locator(ROWS).first.locator(".notif-title")).to_have_text(PAYLOADS[5])
    expect(chat.locator(".toasts", has_text=PAYLOADS[5]).first).to_be_visible(timeout=20_000)
    for page, texts in ((notifications, (PAYLOADS[0], PAYLOADS[1], PAYLOADS[3])),
                        (chat, (PAYLOADS[5],))):  # fmt: skip
        assert page.evaluate(FIND_INJECTIONS) == [], page.url
        body = page.locator("body").inner_text()
        for text in texts:
            assert text in body, (page.url, text)
    notifications.wait_for_timeout(300)  # an onerror would have fired by now
    assert dialogs == []
    assert browser_context.console_errors == []
    record("html_script_pages", pages=2, live_notifications=1, dialogs=0, injections=0)


@pytest.mark.browser
def test_unknown_level_is_still_listed(live_server, browser_context):
    from playwright.sync_api import expect

    from .browser import login, off_browser_loop

    with off_browser_loop():
        owner = get_user_model().objects.create_user("levels", password="x")
        Notification.objects.create(recipient=owner, title="odd level", level='x"]')
        Notification.objects.create(recipient=owner, title="plain", level="info")
    login(browser_context, live_server.url, owner)
    page = browser_context.new_page()
    page.goto(live_server.url + "/notifications/")
    expect(page.locator(ROWS).filter(has_text="plain")).to_have_count(1, timeout=20_000)
    expect(page.locator(ROWS)).to_have_count(2, timeout=2_000)


# The one HTML sink in the project's scripts: htmx swapping in a fragment the server
# rendered (and escaped), checked above.
HTML_SINKS_ALLOWED = {("notifications-htmx.js", 'swap: "innerHTML"')}


def test_no_script_parses_text_as_html():
    """Every script of the site builds DOM nodes: no innerHTML and the like anywhere."""
    import re

    from django.conf import settings as django_settings

    sinks = ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
             "new Function", "DOMParser", "createContextualFragment", "srcdoc")  # fmt: skip
    scripts = sorted((django_settings.BASE_DIR / "static" / "js").glob("*.js"))
    assert scripts
    for path in scripts:
        code = re.sub(r"/\*.*?\*/|(?<!:)//[^\n]*", "", path.read_text(), flags=re.S)
        for allowed_file, allowed in HTML_SINKS_ALLOWED:
            if path.name == allowed_file:
                code = code.replace(allowed, "")
        for sink in sinks:
            assert sink not in code, f"{path.name} uses {sink}"
