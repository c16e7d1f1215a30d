"""Playwright fixtures for browser tests (Debian's /usr/bin/chromium, never a download).

Use in a test marked ``@pytest.mark.browser``::

    def test_x(live_server, browser_context, alice):
        login(browser_context, live_server.url, alice)
        page = browser_context.new_page()
        page.goto(live_server.url + "/chat/")
        screenshot(page, "chat")
"""

from __future__ import annotations

import asyncio
import re
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from django.utils import asyncio as django_asyncio

from .conftest import ARTIFACTS, session_cookies

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
]
SCREENSHOTS = ARTIFACTS / "screenshots"
VIEWPORT = {"width": 1280, "height": 800}

__all__ = [
    "CHROMIUM",
    "SCREENSHOTS",
    "_playwright_loop_guard",
    "browser_context",
    "chromium_browser",
    "login",
    "off_browser_loop",
    "playwright_instance",
    "screenshot",
    "set_server_password",
]

# Playwright's sync API drives its own asyncio loop in a greenlet of the main
# thread and, between calls, leaves that loop marked as the thread's running
# loop. Django would then refuse database calls ("You cannot call this from an
# async context") and pytest-asyncio could not run its loop. So: Django is told
# that Playwright's loop is not an async context, and the mark is taken off
# after every browser test (and put back before the next one).
_playwright_loop: list[asyncio.AbstractEventLoop] = []


def _django_get_running_loop() -> asyncio.AbstractEventLoop:
    loop = asyncio.get_running_loop()
    if _playwright_loop and loop is _playwright_loop[0]:
        raise RuntimeError("Playwright's loop, not an async context")
    return loop


def _mark_playwright_loop(running: bool) -> None:
    if _playwright_loop:
        asyncio._set_running_loop(_playwright_loop[0] if running else None)


@contextmanager
def off_browser_loop():
    """Run Django code that refuses a running loop (test Client, async_to_sync) here."""
    current = asyncio._get_running_loop()
    if _playwright_loop and current is _playwright_loop[0]:
        asyncio._set_running_loop(None)
        try:
            yield
        finally:
            asyncio._set_running_loop(current)
    else:
        yield


@pytest.fixture(scope="session")
def playwright_instance():
    from playwright.sync_api import sync_playwright

    manager = sync_playwright()
    playwright = manager.start()
    _playwright_loop.append(asyncio._get_running_loop())
    original = django_asyncio.get_running_loop
    django_asyncio.get_running_loop = _django_get_running_loop
    try:
        yield playwright
    finally:
        _mark_playwright_loop(True)
        try:
            playwright.stop()
        finally:
            _playwright_loop.clear()
            asyncio._set_running_loop(None)
            django_asyncio.get_running_loop = original


@pytest.fixture(scope="session")
def chromium_browser(playwright_instance):
    browser = playwright_instance.chromium.launch(
        executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
    )
    yield browser
    _mark_playwright_loop(True)
    browser.close()


@pytest.fixture(autouse=True)
def _playwright_loop_guard(request):
    """Around every test that uses the browser: Playwright's loop on, then off again."""
    if "chromium_browser" not in request.fixturenames:
        yield
        return
    _mark_playwright_loop(True)
    try:
        yield
    finally:
        _mark_playwright_loop(False)


@pytest.fixture
def browser_context(chromium_browser):
    """A fresh context (own cookies and storage) per test; console errors are kept."""
    context = chromium_browser.new_context(viewport=VIEWPORT, locale="en-US")
    context.set_default_timeout(10_000)
    context.console_errors = []  # type: ignore[attr-defined]

    def on_page(page):
        page.on(
            "console",
            lambda msg: context.console_errors.append(msg.text) if msg.type == "error" else None,
        )
        page.on("pageerror", lambda exc: context.console_errors.append(str(exc)))

    context.on("page", on_page)
    yield context
    context.close()


def login(context_or_page, live_server_url: str, user) -> None:
    """Log ``user`` in by giving the browser a Django session cookie for the live server."""
    context = getattr(context_or_page, "context", context_or_page)
    host = urlsplit(live_server_url).hostname or "127.0.0.1"
    with off_browser_loop():
        cookies = session_cookies(user)
    context.add_cookies(
        [
            {"name": name, "value": value, "domain": host, "path": "/"}
            for name, value in cookies.items()
        ]
    )


def set_server_password(user, password: str) -> None:
    """Give ``user`` a password the live server can check (the test process hashes with MD5)."""
    from django.contrib.auth.hashers import PBKDF2PasswordHasher

    user.password = PBKDF2PasswordHasher().encode(password, "browsertestsalt")
    with off_browser_loop():
        user.save(update_fields=["password"])


def screenshot(page, name: str, *, full_page: bool = False) -> Path:
    """Save a PNG under test-artifacts/screenshots/ and return its path."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "page"
    path = SCREENSHOTS / f"{safe}.png"
    page.screenshot(path=str(path), full_page=full_page)
    return path
