"""Browser tests of the shared layout, the login page and /demo/."""

from __future__ import annotations

import time

import pytest
from playwright.sync_api import expect

from .browser import login, screenshot, set_server_password

pytestmark = pytest.mark.browser


def rows(page) -> int:
    return page.locator("#data > *").count()


def test_demo_start_close_clear(live_server, browser_context):
    page = browser_context.new_page()
    page.goto(live_server.url + "/demo/")
    expect(page.locator("#state")).to_have_text("idle")
    assert rows(page) == 0

    page.click("#start")
    page.click("#start")  # idempotent: still one connection
    expect(page.locator("#data > *")).to_have_count(2, timeout=4_000)
    expect(page.locator("#state")).to_have_text("live")
    expect(page.locator("#state")).to_have_class("pill conn-live")

    first = page.locator("#data > *").first
    value = int(first.get_attribute("data-value"))
    assert 1 <= value <= 100
    expect(first.locator(".value")).to_have_text(str(value))

    expect(page.locator("#data > *")).to_have_count(4, timeout=4_000)
    ids = page.locator("#data .seq").all_text_contents()
    assert ids == [f"#{n}" for n in range(1, len(ids) + 1)], ids  # one stream, no duplicates
    screenshot(page, "demo-running")

    page.click("#close")
    expect(page.locator("#state")).to_have_text("closed")
    seen = rows(page)
    time.sleep(2.5)
    assert rows(page) == seen, "values kept arriving after Close"
    assert page.locator("#count").text_content() == str(seen)
    screenshot(page, "demo-closed")

    page.click("#clear")
    expect(page.locator("#data > *")).to_have_count(0)
    expect(page.locator("#count")).to_have_text("0")
    expect(page.locator("#data-empty")).to_be_visible()
    assert browser_context.console_errors == []


def test_demo_restart_resumes_after_last_id(live_server, browser_context):
    page = browser_context.new_page()
    page.goto(live_server.url + "/demo/")
    page.click("#start")
    expect(page.locator("#data > *")).to_have_count(2, timeout=4_000)
    page.click("#close")
    last = int(page.locator("#data .seq").last.text_content().lstrip("#"))
    page.click("#start")
    expect(page.locator("#state")).to_have_text("live")
    expect(page.locator("#data > *")).to_have_count(last + 1, timeout=4_000)
    assert page.locator("#data .seq").nth(last).text_content() == f"#{last + 1}"
    page.click("#close")


def test_login_form_logs_in_and_keeps_next(live_server, browser_context, alice):
    set_server_password(alice, "correct horse battery")
    page = browser_context.new_page()
    page.goto(live_server.url + "/accounts/login/?next=/demo/")
    expect(page).to_have_title("Log in · ssechat")
    screenshot(page, "login")

    page.fill("#id_username", "alice")
    page.fill("#id_password", "wrong password")
    page.click("button[type=submit]")
    expect(page.locator(".alert-error")).to_be_visible()
    expect(page.locator("#id_username")).to_have_value("alice")
    screenshot(page, "login-error")

    page.fill("#id_password", "correct horse battery")
    page.click("button[type=submit]")
    page.wait_for_url(live_server.url + "/demo/")
    expect(page.locator(".topbar [data-username]")).to_have_text("alice")
    expect(page.locator(".topbar [data-bell]")).to_be_visible()
    expect(page.locator(".topbar")).not_to_contain_text("Log in")
    screenshot(page, "demo-logged-in")

    page.click(".topbar form[action='/accounts/logout/'] button")
    page.wait_for_url("**/accounts/login/**")
    expect(page.locator(".topbar [data-username]")).to_have_count(0)


def test_session_cookie_login_helper(live_server, browser_context, alice):
    login(browser_context, live_server.url, alice)
    page = browser_context.new_page()
    page.goto(live_server.url + "/demo/")
    expect(page.locator(".topbar [data-username]")).to_have_text("alice")
    expect(page.locator(".topbar a[href='/admin/']")).to_have_count(0)
    csrf = page.locator("meta[name=csrf-token]").get_attribute("content")
    assert csrf
    assert page.evaluate("typeof window.ssechat.fetchJSON") == "function"


def test_fetch_json_raises_server_detail(live_server, browser_context, alice):
    login(browser_context, live_server.url, alice)
    page = browser_context.new_page()
    page.goto(live_server.url + "/demo/")
    page.wait_for_function("typeof window.ssechat?.fetchJSON === 'function'")
    health = page.evaluate("window.ssechat.fetchJSON('/healthz')")
    assert health["status"] == "ok"
    # A path that does not exist answers with a non-2xx; the helper must throw.
    message = page.evaluate(
        """async () => {
            try { await window.ssechat.fetchJSON('/no-such-page/', {method: 'POST', body: {}}); }
            catch (e) { return e.status + ' ' + e.message; }
            return 'no error';
        }"""
    )
    assert message.startswith(("403 ", "404 ")), message


def test_anonymous_demo_and_phone_width(live_server, chromium_browser):
    context = chromium_browser.new_context(viewport={"width": 390, "height": 844})
    try:
        page = context.new_page()
        response = page.goto(live_server.url + "/demo/")
        assert response.status == 200
        assert page.url == live_server.url + "/demo/"
        expect(page.locator(".topbar a", has_text="Log in")).to_be_visible()
        expect(page.locator(".topbar [data-bell]")).to_have_count(0)
        page.click("#start")
        expect(page.locator("#data > *")).to_have_count(2, timeout=4_000)
        expect(page.locator("#state")).to_have_text("live")
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, f"page scrolls sideways on a phone ({width}px)"
        screenshot(page, "demo-phone")
        page.click("#close")
    finally:
        context.close()
