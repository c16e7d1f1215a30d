"""Notifications in headless Chromium: live list, badge, tabs, htmx, restart, ten tabs, admin."""

from __future__ import annotations

import http.server
import re
import subprocess
import sys
import threading
import time

import pytest
from playwright.sync_api import expect

import notifications
from notifications import services
from notifications.models import Notification

from .browser import login, off_browser_loop, screenshot
from .live import ROOT, server_env

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

LIVE_TIMEOUT = 20_000  # ms: a busy machine, SQLite polled every 0.5 s
ROWS = "#notif-list > li.notif:not(.notif-skeleton)"
UNREAD = re.compile(r"(^|\s)unread(\s|$)")
NEW = re.compile(r"(^|\s)notif-new(\s|$)")


def send(recipient, **fields) -> Notification:
    with off_browser_loop():
        return notifications.notify(recipient, **fields)


def open_page(context, base_url: str, path: str):
    page = context.new_page()
    response = page.goto(base_url + path)
    assert response.status == 200, path
    return page


def expect_live(page, timeout: int = LIVE_TIMEOUT) -> None:
    expect(page.locator("[data-bell]")).to_have_attribute("data-state", "live", timeout=timeout)


def expect_badge(page, count: int, timeout: int = LIVE_TIMEOUT) -> None:
    badge = page.locator("#bell-badge")
    if count:
        expect(badge).to_have_text(str(count), timeout=timeout)
        expect(badge).to_be_visible()
    else:
        expect(badge).to_be_hidden(timeout=timeout)


def streams_open(server) -> int:
    return server.stats()["stats"]["streams"]


def settled_streams(server) -> int:
    """The server's open stream count once streams of earlier tests are gone."""
    last, deadline = streams_open(server), time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = streams_open(server)
        if now == last:
            return now
        last = now
    return last


def seed(alice) -> None:
    """A realistic inbox: every level, a read one, a broadcast."""
    send(
        alice,
        title="Your weekly usage report is ready",
        topic="reports",
        body="You sent 1,284 messages this week, up 12% from last week.",
        url="/chat/",
    )
    old = send(
        alice,
        title="Invoice #1042 is due in 3 days",
        level="warning",
        topic="billing",
        body="The card ending in 4242 will be charged $49.00 on Friday.",
    )
    send(
        alice,
        title="Nightly backup failed",
        level="error",
        topic="ops",
        body="The backup job exited with code 2 at 03:12 UTC: the storage quota is exceeded.",
    )
    send(
        None,
        title="Scheduled maintenance on Sunday, 02:00-03:00 UTC",
        level="warning",
        topic="announcements",
        body="Chat stays available; answers may pause for a minute.",
    )
    send(
        alice,
        title="Deploy finished: ssechat v2.4.1 is live",
        level="success",
        topic="deploys",
        body="14 changes, all checks green.",
        url="https://example.com/releases",
    )
    with off_browser_loop():
        services.mark_read(alice, old.pk)  # fmt: skip


def test_page_shows_new_notifications_live_and_the_badge_counts(
    live_server, browser_context, alice
):
    seed(alice)
    login(browser_context, live_server.url, alice)
    page = open_page(browser_context, live_server.url, "/notifications/")
    expect_live(page)
    expect(page.locator("#conn-state")).to_have_text("Live")
    expect(page.locator(ROWS)).to_have_count(5)
    expect_badge(page, 4)
    expect(page.locator(f"{ROWS}.unread")).to_have_count(4)

    # Sent from another process: manage.py notify.
    result = subprocess.run(
        [sys.executable, "manage.py", "notify", "--user", "alice", "--title",
         "Alice mentioned you in “Q3 planning”", "--topic", "chat.mention", "--body",
         "Can you take the onboarding section? Draft due Thursday."],
        cwd=ROOT, env=server_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    first = page.locator(ROWS).first
    expect(first.locator(".notif-title")).to_have_text(
        "Alice mentioned you in “Q3 planning”", timeout=LIVE_TIMEOUT
    )
    expect(first).to_have_class(UNREAD)
    expect(first).to_have_class(NEW)
    expect_badge(page, 5)
    expect(page.locator("#unread-summary")).to_have_text("5 unread")
    expect(page.locator(ROWS)).to_have_count(6)
    page.wait_for_timeout(600)  # let the arrival animation end
    screenshot(page, "notifications-page")

    # Mark read: the row, the badge and the count follow.
    first.locator(".notif-read-btn").click()
    expect(first).not_to_have_class(UNREAD)
    expect_badge(page, 4)
    # Filters: unread only, then a topic.
    page.click("#tab-unread")
    expect(page.locator(ROWS)).to_have_count(4)
    page.click("#tab-all")
    page.select_option("#topic-filter", "billing")
    expect(page.locator(ROWS)).to_have_count(1)
    expect(page.locator(ROWS).first.locator(".notif-title")).to_have_text(
        "Invoice #1042 is due in 3 days"
    )
    assert browser_context.console_errors == []


def test_reading_in_one_tab_updates_the_others(live_server, browser_context, alice):
    login(browser_context, live_server.url, alice)
    inbox = open_page(browser_context, live_server.url, "/notifications/")
    other = open_page(browser_context, live_server.url, "/demo/")
    inbox2 = open_page(browser_context, live_server.url, "/notifications/")
    for page in (inbox, other, inbox2):
        expect_live(page)
    made = [send(alice, title=f"Build #{n} passed", level="success", topic="ci") for n in (1, 2)]
    for page in (inbox, other, inbox2):
        expect_badge(page, 2)
    expect(inbox.locator(ROWS)).to_have_count(2)

    inbox.locator(f"#notification-{made[0].pk} .notif-read-btn").click()
    for page in (inbox, other, inbox2):
        expect_badge(page, 1)
    expect(inbox2.locator(f"#notification-{made[0].pk}")).not_to_have_class(UNREAD)
    expect(inbox2.locator(f"#notification-{made[1].pk}")).to_have_class(UNREAD)

    # Read elsewhere (another process): every tab follows too.
    with off_browser_loop():
        services.mark_all_read(alice)
    for page in (inbox, other, inbox2):
        expect_badge(page, 0)
    expect(inbox.locator(f"#notification-{made[1].pk}")).not_to_have_class(UNREAD)
    expect(inbox.locator("#unread-summary")).to_have_text("You're all caught up")

    # A toast on other pages.
    send(alice, title="Someone replied to your message", topic="chat", body="“Sounds good!”")
    toast = other.locator(".toasts .notif-toast", has_text="Someone replied to your message")
    expect(toast).to_be_visible(timeout=LIVE_TIMEOUT)
    other.wait_for_timeout(1000)  # the toast slides in
    screenshot(other, "notifications-toast")
    assert browser_context.console_errors == []


def test_htmx_page_swaps_fragments_in(live_server, browser_context, alice):
    seed(alice)
    login(browser_context, live_server.url, alice)
    page = open_page(browser_context, live_server.url, "/notifications/htmx/")
    expect(page.locator("#conn-state")).to_have_attribute("data-state", "live", timeout=20_000)
    expect(page.locator(ROWS)).to_have_count(5)
    expect(page.locator("#unread-summary")).to_have_text("4 unread")

    made = send(alice, title='<img src=x onerror="window.pwned=1">Security review', level="error",
                topic="security", body="Two <b>critical</b> findings.")  # fmt: skip
    row = page.locator(f"#notification-{made.pk}")
    expect(row).to_be_visible(timeout=LIVE_TIMEOUT)
    expect(page.locator(ROWS).first).to_have_id(f"notification-{made.pk}")
    expect(row.locator(".notif-title")).to_have_text(
        '<img src=x onerror="window.pwned=1">Security review'
    )
    expect(row.locator(".notif-body")).to_have_text("Two <b>critical</b> findings.")
    assert page.evaluate("window.pwned") is None
    expect(page.locator("#unread-summary")).to_have_text("5 unread", timeout=LIVE_TIMEOUT)
    expect_badge(page, 5)
    page.wait_for_timeout(600)
    screenshot(page, "notifications-htmx")

    # Mark read through htmx (hx-post; the page's hx-headers add the CSRF token).
    row.locator(".notif-read-btn").click()
    expect(row).not_to_have_class(UNREAD)
    expect(page.locator("#unread-summary")).to_have_text("4 unread", timeout=LIVE_TIMEOUT)
    expect_badge(page, 4)
    # A notification sent again replaces its row instead of doubling it.
    with off_browser_loop():
        services.resend([Notification.objects.get(pk=made.pk)])
    expect(row).to_have_class(UNREAD, timeout=LIVE_TIMEOUT)
    expect(page.locator(f"#notification-{made.pk}")).to_have_count(1)
    assert browser_context.console_errors == []


class _Unavailable(http.server.BaseHTTPRequestHandler):
    """What a proxy says while the app restarts: EventSource gives up on it (CLOSED)."""

    def do_GET(self):
        self.send_response(503)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", "11")
        self.end_headers()
        self.wfile.write(b"restarting\n")

    def log_message(self, *args):
        pass


def test_pages_reconnect_after_a_restart_and_show_what_was_sent_meanwhile(
    start_server, browser_context, alice
):
    server = start_server(SSECHAT_KEEPALIVE_SECONDS="1", SSECHAT_RETRY_MS="500")
    login(browser_context, server.url, alice)
    # Record the URLs htmx's extension gives EventSource (it re-creates one after CLOSED).
    browser_context.add_init_script(
        """(() => { const ES = window.EventSource; window.esUrls = [];
            window.EventSource = function (url, init) { window.esUrls.push(String(url));
              return new ES(url, init); };
            window.EventSource.prototype = ES.prototype;
            Object.assign(window.EventSource, {CONNECTING: 0, OPEN: 1, CLOSED: 2}); })();"""
    )
    htmx_page = open_page(browser_context, server.url, "/notifications/htmx/")
    inbox = open_page(browser_context, server.url, "/notifications/")
    expect(htmx_page.locator("#conn-state")).to_have_attribute("data-state", "live", timeout=20_000)
    expect_live(inbox)
    before = send(alice, title="Before the restart")
    expect(htmx_page.locator(f"#notification-{before.pk}")).to_be_visible(timeout=LIVE_TIMEOUT)
    expect(inbox.locator(f"#notification-{before.pk}")).to_be_visible(timeout=LIVE_TIMEOUT)

    server.stop()
    # While it is down: a proxy answers 503 for a while (the EventSources give up
    # and are made anew), and notifications are sent.
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", server.port), _Unavailable)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        expect(htmx_page.locator("#conn-state")).to_have_attribute(
            "data-state", "reconnecting", timeout=10_000
        )
        expect(inbox.locator("#conn-state")).to_have_attribute(
            "data-state", "reconnecting", timeout=10_000
        )
        during = [send(alice, title=f"Sent while down #{n}") for n in (1, 2)]
        everyone = send(None, title="Broadcast while down")
        # htmx's extension gave up on its EventSource and made a new one.
        htmx_page.wait_for_function("window.esUrls.length >= 2", timeout=15_000)
    finally:
        proxy.shutdown()
        proxy.server_close()
    server.start()

    for page in (htmx_page, inbox):
        for made in [*during, everyone]:
            expect(page.locator(f"#notification-{made.pk}")).to_be_visible(timeout=30_000)
            expect(page.locator(f"#notification-{made.pk}")).to_have_count(1)
        expect(page.locator("#conn-state")).to_have_attribute("data-state", "live")
        expect(page.locator(f"#notification-{before.pk}")).to_have_count(1)
    expect_badge(inbox, 4)
    # htmx's re-created EventSource resumed from the last id it had seen.
    urls = htmx_page.evaluate("window.esUrls")
    assert len(urls) >= 2, urls
    first_position = urls[0].partition("lastEventId=")[2]
    assert any("lastEventId=" in u and u.partition("lastEventId=")[2] != first_position
               for u in urls[1:]), urls  # fmt: skip
    screenshot(htmx_page, "notifications-htmx-after-restart")


def test_ten_tabs_share_one_stream_and_every_page_still_loads(live_server, browser_context, alice):
    login(browser_context, live_server.url, alice)
    before = settled_streams(live_server)
    paths = ["/notifications/", "/demo/", "/chat/"]  # the bell is on every page
    pages = [open_page(browser_context, live_server.url, paths[i % 3]) for i in range(10)]
    for page in pages:
        expect_live(page)
    assert streams_open(live_server) == before + 1  # ten tabs, one connection

    made = send(alice, title="To every tab", level="success")
    for page in pages:
        expect_badge(page, 1)
    for page in pages[::3]:
        expect(page.locator(f"#notification-{made.pk}")).to_be_visible()

    # An eleventh tab loads at once, its API calls too: no connection is starved.
    started = time.monotonic()
    extra = open_page(browser_context, live_server.url, "/notifications/")
    expect(extra.locator(f"#notification-{made.pk}")).to_be_visible(timeout=10_000)
    expect_live(extra)
    print(f"11th tab loaded in {time.monotonic() - started:.2f}s")
    assert extra.evaluate("window.ssechat.bell.mode") == "worker"
    assert streams_open(live_server) == before + 1
    assert browser_context.console_errors == []


def test_without_shared_worker_a_leader_tab_shares_the_stream(live_server, chromium_browser, alice):
    context = chromium_browser.new_context(viewport={"width": 1280, "height": 800})
    context.add_init_script("delete window.SharedWorker;")
    try:
        login(context, live_server.url, alice)
        before = settled_streams(live_server)
        pages = [open_page(context, live_server.url, "/notifications/") for _ in range(4)]
        for page in pages:
            expect_live(page)
        modes = sorted(page.evaluate("window.ssechat.bell.mode") for page in pages)
        assert modes == ["follower", "follower", "follower", "leader"]
        assert streams_open(live_server) == before + 1
        send(alice, title="Shared by election")
        for page in pages:
            expect_badge(page, 1)

        # The leader leaves: another tab takes over, resuming where it left off.
        leader = next(p for p in pages if p.evaluate("window.ssechat.bell.mode") == "leader")
        leader.close()
        pages.remove(leader)
        made = send(alice, title="After the leader left")
        for page in pages:
            expect(page.locator(f"#notification-{made.pk}")).to_be_visible(timeout=LIVE_TIMEOUT)
            expect_badge(page, 2)
        modes = sorted(page.evaluate("window.ssechat.bell.mode") for page in pages)
        assert modes == ["follower", "follower", "leader"]
    finally:
        context.close()


def test_phone_width(live_server, chromium_browser, alice):
    seed(alice)
    context = chromium_browser.new_context(viewport={"width": 390, "height": 844})
    try:
        login(context, live_server.url, alice)
        page = open_page(context, live_server.url, "/notifications/")
        expect(page.locator(ROWS)).to_have_count(5)
        expect_live(page)
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, f"the page scrolls sideways on a phone ({width}px)"
        screenshot(page, "notifications-phone")
    finally:
        context.close()


def test_admin_lists_filters_and_sends(live_server, browser_context, alice, make_user):
    seed(alice)
    with off_browser_loop():
        admin = make_user("admin", is_staff=True, is_superuser=True)
    login(browser_context, live_server.url, admin)
    page = open_page(browser_context, live_server.url, "/admin/notifications/notification/")
    expect(page.locator("#result_list tbody tr")).to_have_count(5)
    expect(page.locator(".notif-admin-everyone")).to_have_text("Every user")
    screenshot(page, "admin-notifications")
    page.click("#changelist-filter a:has-text('Error')")
    expect(page.locator("#result_list tbody tr")).to_have_count(1)
    page.goto(live_server.url + "/admin/notifications/notification/?q=invoice")
    expect(page.locator("#result_list tbody tr")).to_have_count(1)

    # Send a broadcast from the admin: alice's open page gets it.
    inbox_context = browser_context.browser.new_context(viewport={"width": 1280, "height": 800})
    try:
        login(inbox_context, live_server.url, alice)
        inbox = open_page(inbox_context, live_server.url, "/notifications/")
        expect_live(inbox)
        page.goto(live_server.url + "/admin/notifications/notification/")
        page.click("a:has-text('Broadcast to every user')")
        expect(page.locator(".notif-admin-banner")).to_contain_text("every user")
        expect(page.locator("#id_recipient")).to_have_count(0)
        page.fill("#id_title", "Welcome to the new inbox")
        page.fill("#id_body", "Notifications now arrive live in every tab.")
        page.select_option("#id_level", "success")
        page.fill("#id_topic", "announcements")
        screenshot(page, "admin-notification-broadcast")
        page.click("input[name=_save]")
        expect(page.locator(".messagelist")).to_contain_text("to every user")
        expect(inbox.locator(ROWS).first.locator(".notif-title")).to_have_text(
            "Welcome to the new inbox", timeout=LIVE_TIMEOUT
        )
    finally:
        inbox_context.close()
