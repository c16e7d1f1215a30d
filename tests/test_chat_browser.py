"""Browser tests of the chat page (/chat/) in headless Chromium, on real servers.

The answers come from the demo model: ``[demo:echo] <text>`` makes it answer
exactly ``<text>``, ``[demo:fail]`` makes it fail. A module server streams at
15 tokens a second, slow enough to watch, stop and reload an answer.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import expect

from .browser import login, screenshot
from .fake_llm import FakeLLMServer
from .live import uvicorn_server

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

PROSE = (
    "Server sent events keep one response open and the browser reads each event as it "
    "arrives so an answer can appear word by word while the model is still writing it "
    "and a dropped connection resumes from the last event id it saw"
)
WORDS = PROSE.split(" ")


def sentence(count: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(count)) + "."


@pytest.fixture(scope="module")
def slow_server(django_db_blocker, log_dir):
    """A server whose demo model writes 15 tokens a second: answers to watch.

    (The session's ``live_server`` writes 30 a second: the other tests use it.)
    """
    with django_db_blocker.unblock():
        server = uvicorn_server(
            log_dir,
            SSECHAT_DEMO_TOKENS_PER_SECOND="15",
            SSECHAT_KEEPALIVE_SECONDS="1",
            SSECHAT_RETRY_MS="500",  # EventSource reconnects half a second after a drop
        ).start()
    yield server
    server.stop()


def open_chat(context, server_or_url, user, path="/chat/"):
    url = getattr(server_or_url, "url", server_or_url)
    login(context, url, user)
    page = context.new_page()
    watch_errors(page)
    page.goto(url + path)
    page.wait_for_function("window.ssechatChat !== undefined")
    return page


def watch_errors(page) -> None:
    """Fail on script errors, on dialogs (alert() = injected script), and on chat requests
    that fail (other apps' assets are not this page's business)."""
    page.chat_errors = []

    def on_response(response):
        path = urlsplit(response.url).path
        if response.status >= 400 and (
            path.startswith("/static/js/chat") or path.startswith("/static/css/chat")
        ):
            page.chat_errors.append(f"{response.status} {path}")

    def on_dialog(dialog):
        page.chat_errors.append(f"dialog: {dialog.message}")
        dialog.dismiss()

    def on_console(message):
        if message.type == "error" and message.text.startswith("ssechat chat hub:"):
            page.chat_errors.append(message.text)

    page.on("response", on_response)
    page.on("dialog", on_dialog)
    page.on("console", on_console)
    page.on("pageerror", lambda exc: page.chat_errors.append(f"pageerror: {exc}"))


def no_errors(*pages) -> None:
    for page in pages:
        assert page.chat_errors == [], page.chat_errors


def send(page, text: str) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def api(page, path: str, method: str = "GET"):
    return page.evaluate("([p, m]) => window.ssechat.fetchJSON(p, {method: m})", [path, method])


def conversation_id(page) -> int:
    page.wait_for_url(re.compile(r"/chat/\d+/$"))
    return int(re.search(r"/chat/(\d+)/$", page.url).group(1))


def answers(page):
    return page.locator("#thread .msg-assistant")


def wait_finished(answer, timeout=20_000):
    expect(answer).to_have_attribute(
        "data-status", re.compile("complete|cancelled|failed"), timeout=timeout
    )


def api_messages(page, conv: int) -> list[dict]:
    return api(page, f"/api/chat/conversations/{conv}/")["messages"]


def test_send_and_watch_it_stream(slow_server, browser_context, alice):
    page = open_chat(browser_context, slow_server, alice)
    expect(page.locator("#empty-state")).to_be_visible()
    expect(page.locator("#send")).to_be_disabled()
    screenshot(page, "chat-empty")

    # Shift+Enter makes a new line and sends nothing.
    page.fill("#prompt", "first line")
    page.press("#prompt", "Shift+Enter")
    page.keyboard.type("second line")
    assert page.input_value("#prompt") == "first line\nsecond line"
    assert page.locator("#thread .msg").count() == 0

    text = sentence(60)  # four seconds at 15 tokens a second: seen streaming on a busy machine
    send(page, "[demo:echo] " + text)
    conv = conversation_id(page)
    expect(page.locator("#thread .msg-user")).to_have_text("[demo:echo] " + text)
    answer = answers(page).last
    expect(answer).to_have_attribute("data-status", "streaming")
    expect(page.locator("#stop")).to_be_visible()
    expect(page.locator("#send")).to_be_hidden()

    # The text grows while the answer streams.
    lengths = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        status = answer.get_attribute("data-status")
        lengths.append(len(answer.locator(".markdown").inner_text()))
        if status != "streaming":
            break
        if len(lengths) == 4:
            screenshot(page, "chat-streaming")
        time.sleep(0.25)
    assert len({n for n in lengths if 0 < n < len(text)}) >= 3, lengths
    assert lengths == sorted(lengths), "the shown text never shrinks"

    wait_finished(answer)
    messages = api_messages(page, conv)
    assert messages[-1]["status"] == "complete"
    assert messages[-1]["content"] == text
    assert answer.locator(".markdown").inner_text() == text
    expect(page.locator("#send")).to_be_visible()
    expect(page.locator("#stop")).to_be_hidden()
    # The sidebar lists the conversation under its title, as the current one.
    current = page.locator("#conversation-list a[aria-current=page]")
    expect(current).to_contain_text("[demo:echo] Server sent events")

    # Stop: the answer ends where it was, and keeps that text.
    long_text = sentence(90)
    send(page, "[demo:echo] " + long_text)
    answer = answers(page).last
    expect(answer).to_have_attribute("data-status", "streaming")
    expect(answer.locator(".markdown")).to_contain_text("Server sent events keep", timeout=10_000)
    page.click("#stop")
    expect(answer).to_have_attribute("data-status", "cancelled", timeout=10_000)
    expect(answer.locator(".msg-note")).to_have_text("Stopped")
    expect(page.locator("#stop")).to_be_hidden()
    expect(page.locator("#send")).to_be_visible()
    content = api_messages(page, conv)[-1]["content"]
    assert 0 < len(content) < len(long_text)
    assert long_text.startswith(content)
    assert answer.locator(".markdown").inner_text() == content.rstrip()
    time.sleep(0.3)  # nothing more arrives after Stop
    assert answer.locator(".markdown").inner_text() == content.rstrip()

    # The conversation takes a new message at once.
    send(page, "[demo:echo] And now?")
    expect(answers(page)).to_have_count(3)
    wait_finished(answers(page).last)
    expect(answers(page).last.locator(".markdown")).to_have_text("And now?")
    no_errors(page)


def sample_while_streaming(answer, limit: float = 30.0) -> list[str]:
    """The answer's shown text, every 0.1 s, until it is no longer streaming."""
    samples = []
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        status = answer.get_attribute("data-status")
        samples.append(answer.locator(".markdown").inner_text())
        if status != "streaming":
            break
        time.sleep(0.1)
    return samples


def assert_prefixes(samples: list[str], final: str) -> None:
    """Every text shown on the way was a prefix of the final text: no repeat, no hole."""
    for sample in samples:
        assert final.startswith(sample.rstrip()), (sample, final)


MARKDOWN_ANSWER = """Here is how a browser **resumes** a stream, in *three* steps:

1. It keeps the `id` of the last event.
2. It reconnects after the `retry` delay.
3. It sends `Last-Event-ID`, and the server replays what was missed.

```python
async def frames(last_id):
    async for event in stream(after=last_id):
        yield event
```

| header | meaning |
|---|---|
| `Last-Event-ID` | where to resume |
| `retry` | reconnection delay |

> Tip: the [spec](https://html.spec.whatwg.org/multipage/server-sent-events.html) has it."""


def test_markdown_answer_and_hostile_output_shown_as_text(live_server, browser_context, alice):
    page = open_chat(browser_context, live_server, alice)
    page.evaluate("window.__pwned = 0")

    # Exactly the output of the issue: tags come out as text, Markdown still works.
    hostile = (
        "<img src=x onerror=alert(1)> <script>alert(2)</script> **bold** ```js\nconsole.log(1)\n```"
    )
    send(page, "[demo:echo] " + hostile)
    conv = conversation_id(page)
    first = answers(page).nth(0)
    wait_finished(first)
    text = first.locator(".markdown").inner_text()
    assert "<img src=x onerror=alert(1)>" in text
    assert "<script>alert(2)</script>" in text
    expect(first.locator(".markdown strong")).to_have_text("bold")

    # A fenced block on its own lines, and more ways to try to run a script.
    nasty = (
        "<svg onload=alert(3)></svg> <iframe src=javascript:alert(4)></iframe> "
        "<a href=javascript:alert(5)>x</a> [click](javascript:alert(6)) "
        "![pixel](https://example.com/track.png) <b onmouseover=alert(7)>hover</b>\n"
        "```js\nconsole.log(1)\n```\n"
        "<img src=x onerror=window.__pwned=1>"
    )
    send(page, "[demo:echo] " + nasty)
    second = answers(page).nth(1)
    wait_finished(second)
    expect(second.locator("pre code.language-js")).to_have_text("console.log(1)")
    expect(second.locator(".code-lang")).to_have_text("js")
    assert "<img src=x onerror=window.__pwned=1>" in second.locator(".markdown").inner_text()
    # Only the image's https target became a link; no javascript: link exists.
    expect(second.locator(".markdown a")).to_have_count(1)
    assert second.locator(".markdown a").get_attribute("href") == "https://example.com/track.png"

    thread = page.locator("#thread")
    for tag in ("img", "script", "iframe", "svg.markdown", "b", "a[href^=javascript]"):
        assert thread.locator(tag).count() == 0, tag
    assert page.locator(".markdown svg, .markdown img, .msg-user img").count() == 0
    # The user's own messages and the title (sidebar, header) are text too.
    expect(page.locator("#thread .msg-user").first).to_have_text("[demo:echo] " + hostile)
    expect(page.locator("#conversation-list a[aria-current=page] .title")).to_contain_text(
        "<img src=x onerror=alert(1)>"
    )
    time.sleep(0.3)
    assert page.evaluate("window.__pwned") == 0
    messages = api_messages(page, conv)
    assert [m["content"] for m in messages if m["role"] == "assistant"] == [hostile, nasty]

    # A real Markdown answer, for the look of it.
    send(page, "[demo:echo] " + MARKDOWN_ANSWER)
    third = answers(page).nth(2)
    wait_finished(third)
    expect(third.locator("h1, h2, h3")).to_have_count(0)
    expect(third.locator("ol > li")).to_have_count(3)
    expect(third.locator("pre code.language-python")).to_contain_text("async for event")
    expect(third.locator("table tbody tr")).to_have_count(2)
    expect(third.locator("blockquote a")).to_have_attribute("rel", "noopener noreferrer nofollow")
    page.evaluate("document.getElementById('scroller').scrollTop = 1e6")
    screenshot(page, "chat-markdown-answer")

    # At phone width: no sideways scrolling, the list behind a menu button.
    page.set_viewport_size({"width": 390, "height": 844})
    expect(page.locator("#chat-sidebar")).not_to_be_in_viewport()
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the page scrolls sideways on a phone ({width}px)"
    page.evaluate("document.getElementById('scroller').scrollTop = 1e6")
    screenshot(page, "chat-phone")
    page.click("#sidebar-toggle")
    expect(page.locator("#chat-sidebar")).to_be_in_viewport()
    page.wait_for_timeout(300)  # the slide-in transition
    expect(page.locator("#conversation-list .conv")).to_have_count(1)
    screenshot(page, "chat-phone-sidebar")
    page.click("#sidebar-scrim", position={"x": 370, "y": 400})
    expect(page.locator("#chat-sidebar")).not_to_be_in_viewport()
    page.click("#header-new-chat")
    expect(page.locator("#empty-state")).to_be_visible()
    screenshot(page, "chat-phone-empty")
    no_errors(page)


def test_regenerate_the_last_answer(live_server, browser_context, alice):
    page = open_chat(browser_context, live_server, alice)
    send(page, "[demo:echo] The first answer.")
    conv = conversation_id(page)
    wait_finished(answers(page).last)
    first_id = int(answers(page).last.get_attribute("data-id"))

    regenerate = page.locator("#thread .msg-assistant.msg-last .regenerate-btn")
    expect(regenerate).to_be_visible()
    regenerate.click()
    answer = page.locator("#thread .msg-assistant").last
    expect(answer).not_to_have_attribute("data-id", str(first_id))
    wait_finished(answer)
    expect(answer.locator(".markdown")).to_have_text("The first answer.")
    expect(answer.locator(".pager-label")).to_have_text("2 / 2")
    # Only one answer is shown; the pager goes back to the first one.
    expect(answers(page)).to_have_count(1)
    answer.locator(".pager-prev").click()
    expect(answers(page).last).to_have_attribute("data-id", str(first_id))
    expect(answers(page).last.locator(".pager-label")).to_have_text("1 / 2")

    messages = api_messages(page, conv)
    assert [m["role"] for m in messages] == ["user", "assistant", "assistant"]
    assert all(m["status"] == "complete" for m in messages)

    # Reloaded, the page shows the newest version again.
    page.reload()
    expect(answers(page)).to_have_count(1)
    expect(answers(page).last.locator(".pager-label")).to_have_text("2 / 2")
    no_errors(page)


class DroppingProxy:
    """A TCP proxy in front of a server whose connections can all be cut at once."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.sockets: set[socket.socket] = set()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self.lock:
                self.sockets.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._close(src)
            self._close(dst)

    def _close(self, sock):
        with self.lock:
            self.sockets.discard(sock)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()

    def drop(self) -> int:
        """Cut every open connection (the listener stays up: clients reconnect)."""
        with self.lock:
            open_now = list(self.sockets)
        for sock in open_now:
            self._close(sock)
        return len(open_now)

    def close(self):
        self.listener.close()
        self.drop()


def test_answer_survives_a_network_drop_and_a_reload(slow_server, browser_context, alice):
    """The hub resumes its stream after a dropped connection (Last-Event-ID), and a
    reloaded page picks the answer up where it is; the text shown on the way is always
    a prefix of the answer and the end is exactly the stored answer."""
    proxy = DroppingProxy(slow_server.port)
    try:
        page = open_chat(browser_context, proxy.url, alice)
        text = sentence(120)  # still streaming after the drop and the reload
        send(page, "[demo:echo] " + text)
        conv = conversation_id(page)
        answer = answers(page).last
        expect(answer.locator(".markdown")).to_contain_text("the browser", timeout=10_000)

        before = len(answer.locator(".markdown").inner_text())
        assert proxy.drop() > 0
        samples = []
        deadline = time.monotonic() + 10
        while True:  # the text goes on growing once the stream is back
            shown = answer.locator(".markdown").inner_text()
            samples.append(shown)
            if len(shown) > before + 5:
                break
            assert time.monotonic() < deadline, "the answer did not resume"
            time.sleep(0.05)
        assert_prefixes(samples, text)

        page.reload()
        answer = answers(page).last
        expect(answer).to_have_attribute("data-status", "streaming")
        expect(page.locator("#stop")).to_be_visible()
        samples = sample_while_streaming(answer)
        wait_finished(answer)
        final = api_messages(page, conv)[-1]
        assert final["status"] == "complete"
        assert final["content"] == text
        assert answer.locator(".markdown").inner_text() == text
        assert_prefixes(samples, text)
        assert len({s for s in samples if s != text}) >= 3, "it kept streaming after the reload"
        no_errors(page)
    finally:
        proxy.close()


def test_second_tab_follows_the_answer(slow_server, browser_context, alice):
    page = open_chat(browser_context, slow_server, alice)
    send(page, "[demo:echo] Hello.")
    conv = conversation_id(page)
    wait_finished(answers(page).last)

    other = browser_context.new_page()
    watch_errors(other)
    other.goto(f"{slow_server.url}/chat/{conv}/")
    expect(answers(other)).to_have_count(1)

    # Long enough to stream for several seconds, so the follower is seen mid-answer
    # even when a busy machine makes each look at the page slow.
    text = sentence(100)
    page.bring_to_front()
    send(page, "[demo:echo] " + text)
    follower = answers(other).last
    expect(answers(other)).to_have_count(2)
    expect(follower).to_have_attribute("data-status", "streaming")
    samples = sample_while_streaming(follower)
    wait_finished(follower)
    assert follower.locator(".markdown").inner_text() == text
    assert_prefixes(samples, text)
    assert len({s for s in samples if s and s != text}) >= 3, "the other tab saw it stream"
    expect(other.locator("#thread .msg-user").last).to_have_text("[demo:echo] " + text)
    expect(other.locator("#stop")).to_be_hidden()
    no_errors(page, other)


def test_late_joiner_and_a_browser_without_shared_workers(
    slow_server, browser_context, chromium_browser, alice
):
    """Another browser opens the conversation mid-answer: its hub reads the answer
    from its start (the message stream), so it shows exactly the answer. That
    browser has no SharedWorker: the page runs the hub itself."""
    page = open_chat(browser_context, slow_server, alice)
    text = sentence(120)  # eight seconds: a second browser logs in and opens it mid-answer
    send(page, "[demo:echo] " + text)
    conv = conversation_id(page)
    expect(answers(page).last.locator(".markdown")).to_contain_text("the browser", timeout=10_000)

    context = chromium_browser.new_context()
    try:
        context.add_init_script("delete window.SharedWorker")
        late = open_chat(context, slow_server, alice, f"/chat/{conv}/")
        answer = answers(late).last
        expect(answer).to_have_attribute("data-status", "streaming")
        samples = sample_while_streaming(answer)
        wait_finished(answer)
        assert answer.locator(".markdown").inner_text() == text
        assert_prefixes(samples, text)
        assert api_messages(late, conv)[-1]["content"] == text
        # It can send too, and follows its own answer.
        send(late, "[demo:echo] From the other browser.")
        wait_finished(answers(late).last)
        expect(answers(late).last.locator(".markdown")).to_have_text("From the other browser.")
        # The first browser saw that exchange live.
        expect(answers(page).last.locator(".markdown")).to_have_text("From the other browser.")
        no_errors(page, late)
    finally:
        context.close()


def test_ten_tabs_all_keep_working(live_server, browser_context, alice):
    first = open_chat(browser_context, live_server, alice)
    ids = [api(first, "/api/chat/conversations/", "POST")["id"] for _ in range(10)]
    first.close()
    pages = []
    for conv in ids:  # all ten load at once
        page = browser_context.new_page()
        watch_errors(page)
        page.goto(f"{live_server.url}/chat/{conv}/", wait_until="commit")
        pages.append(page)
    for page in pages:
        page.wait_for_function("window.ssechatChat !== undefined")
        expect(page.locator("#empty-state")).to_be_visible()

    # Every tab can send, and sees its answer stream to the end.
    for n, page in enumerate(reversed(pages)):
        page.bring_to_front()
        text = f"Tab {n} answers this in a few words."
        send(page, "[demo:echo] " + text)
        answer = answers(page).last
        wait_finished(answer)
        expect(answer.locator(".markdown")).to_have_text(text)

    # Three answers at once (the most a user may have), in three tabs: all stream.
    text = sentence(40)
    busy = pages[:3]
    for page in busy:
        page.bring_to_front()
        send(page, "[demo:echo] " + text)
        expect(answers(page).last).to_have_attribute("data-status", "streaming")
    # A stream the hub has just closed (it moves to the answers' message streams) is
    # counted by the server until the disconnect reaches it: let the count settle.
    deadline = time.monotonic() + 2
    while (streams_while_busy := live_server.stats()["stats"]["streams"]) > 4:
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for page in busy:
        wait_finished(answers(page).last)
        expect(answers(page).last.locator(".markdown")).to_have_text(text)
    assert streams_while_busy <= 4, f"{streams_while_busy} streams open for 10 tabs"

    # A new tab still loads while the ten are open, and the server holds few streams.
    extra = browser_context.new_page()
    watch_errors(extra)
    extra.goto(f"{live_server.url}/chat/{ids[5]}/")
    expect(answers(extra)).to_have_count(1)
    streams = live_server.stats()["stats"]["streams"]
    assert streams <= 4, f"{streams} streams open for 11 tabs"
    no_errors(*pages, extra)


def test_failed_answer_shows_the_error_and_retry_works(start_server, browser_context, alice):
    with FakeLLMServer(mode="http_500", tokens_per_second=50) as fake:
        server = start_server(SSECHAT_LLM_BACKEND="openai", SSECHAT_LLM_URL=fake.url)
        page = open_chat(browser_context, server, alice)
        send(page, "Tell me something.")
        conv = conversation_id(page)
        answer = answers(page).last
        expect(answer).to_have_attribute("data-status", "failed", timeout=15_000)
        error = answer.locator(".msg-error-text")
        expect(error).to_be_visible()
        failed = api_messages(page, conv)[-1]
        assert failed["status"] == "failed" and failed["error"]
        expect(error.locator(".msg-error-detail")).to_have_text(failed["error"])
        expect(page.locator("#send")).to_be_visible()
        screenshot(page, "chat-error")

        fake.mode = "normal"
        fake.reply_text = "Sorry about that. Here is the answer."
        error.locator(".retry-btn").click()
        retried = answers(page).last
        expect(retried).not_to_have_attribute("data-id", str(failed["id"]))
        wait_finished(retried)
        expect(retried).to_have_attribute("data-status", "complete")
        expect(retried.locator(".markdown")).to_have_text("Sorry about that. Here is the answer.")
        expect(retried.locator(".msg-error-text")).to_be_hidden()
        expect(retried.locator(".pager-label")).to_have_text("2 / 2")
        no_errors(page)


def test_conversation_list_new_rename_delete(live_server, browser_context, alice):
    page = open_chat(browser_context, live_server, alice)
    send(page, "[demo:echo] One.")
    first = conversation_id(page)
    wait_finished(answers(page).last)
    page.click("#new-chat")
    page.wait_for_url(live_server.url + "/chat/")
    expect(page.locator("#empty-state")).to_be_visible()
    send(page, "[demo:echo] Two.")
    page.wait_for_url(re.compile(rf"/chat/(?!{first}/)\d+/$"))
    second = conversation_id(page)
    wait_finished(answers(page).last)
    items = page.locator("#conversation-list .conv")
    expect(items).to_have_count(2)
    expect(items.first).to_contain_text("Two.")  # newest first

    # Switch by clicking; back/forward follow.
    items.nth(1).locator("a").click()
    page.wait_for_url(f"{live_server.url}/chat/{first}/")
    expect(page.locator("#thread .msg-user")).to_have_text("[demo:echo] One.")
    page.go_back()
    page.wait_for_url(f"{live_server.url}/chat/{second}/")
    expect(page.locator("#thread .msg-user")).to_have_text("[demo:echo] Two.")

    # Rename inline.
    item = page.locator(f"#conversation-list .conv[data-id='{second}']")
    item.hover()
    screenshot(page, "chat-sidebar-hover")
    item.locator(".rename-btn").click()
    page.fill(".rename-input", "Renamed <b>chat</b>")
    # The list reloads while the title is being typed (as when an answer ends or the
    # window gets the focus): the edit goes on with what was typed.
    page.evaluate("document.querySelector('.rename-input').dataset.before = '1'")
    page.evaluate("window.dispatchEvent(new Event('focus'))")
    rerendered = page.locator(".rename-input:not([data-before])")
    expect(rerendered).to_have_count(1)
    expect(rerendered).to_have_value("Renamed <b>chat</b>")
    expect(rerendered).to_be_focused()
    page.press(".rename-input", "Enter")
    expect(item.locator(".title")).to_have_text("Renamed <b>chat</b>")
    expect(page.locator("#chat-title")).to_have_text("Renamed <b>chat</b>")
    assert api(page, f"/api/chat/conversations/{second}/")["title"] == "Renamed <b>chat</b>"

    # Delete the open one: confirm in the dialog, then a new chat.
    item.hover()
    item.locator(".delete-btn").click()
    expect(page.locator("#delete-dialog")).to_be_visible()
    expect(page.locator("#delete-name")).to_have_text("Renamed <b>chat</b>")
    page.click("#delete-confirm")
    page.wait_for_url(live_server.url + "/chat/")
    expect(items).to_have_count(1)
    listed = api(page, "/api/chat/conversations/")["results"]
    assert [c["id"] for c in listed] == [first]
    no_errors(page)


RENDER_CASES = [
    (
        "plain *em* **strong** ~~del~~ `a<b>`",
        "<p>plain <em>em</em> <strong>strong</strong> <del>del</del> <code>a&lt;b&gt;</code></p>",
    ),
    ("line one\nline two\n\nnext", "<p>line one<br>line two</p><p>next</p>"),
    ("# Title\n## Sub ##", "<h1>Title</h1><h2>Sub</h2>"),
    ("- a\n- b\n  - c\n- d", "<ul><li>a</li><li>b<ul><li>c</li></ul></li><li>d</li></ul>"),
    ("3. x\n4. y", '<ol start="3"><li>x</li><li>y</li></ol>'),
    ("1. a\n\n2. b", "<ol><li><p>a</p></li><li><p>b</p></li></ol>"),
    (
        "- [x] done\n- [ ] todo",
        '<ul><li class="task"><input type="checkbox" disabled="">'
        ' done</li><li class="task"><input type="checkbox" disabled=""> todo</li></ul>',
    ),
    ("> quoted **b**\n> more", "<blockquote><p>quoted <strong>b</strong><br>more</p></blockquote>"),
    ("---", "<hr>"),
    (
        "***bold em*** and *a **b** c*",
        "<p><strong><em>bold em</em></strong> and <em>a <strong>b</strong> c</em></p>",
    ),
    ("snake_case_name and 2 * 3 * 4", "<p>snake_case_name and 2 * 3 * 4</p>"),
    (r"\*not em\* and \`tick\`", "<p>*not em* and `tick`</p>"),
    (
        "see https://example.com/a_(b). ok",
        '<p>see <a href="https://example.com/a_(b)" target="_blank" '
        'rel="noopener noreferrer nofollow">https://example.com/a_(b)</a>. ok</p>',
    ),
    ("[x](javascript:alert(1)) [y](data:text/html,hi) [z](/relative)", "<p>x y z</p>"),
    (
        "<https://example.com>",
        '<p><a href="https://example.com/" target="_blank" rel="noopener noreferrer nofollow">'
        "https://example.com</a></p>",
    ),
    (
        "<script>alert(1)</script><img src=x onerror=alert(1)>",
        "<p>&lt;script&gt;alert(1)&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;</p>",
    ),
    (
        "| a | b |\n|:-|-:|\n| `|` | **2** |",
        '<div class="table-scroll"><table><thead><tr><th style="text-align: left;">a</th>'
        '<th style="text-align: right;">b</th></tr></thead><tbody><tr>'
        '<td style="text-align: left;"><code>|</code></td>'
        '<td style="text-align: right;"><strong>2</strong></td></tr></tbody></table></div>',
    ),
]


def test_markdown_renderer(live_server, browser_context):
    page = browser_context.new_page()
    page.goto(live_server.url + "/healthz")
    page.add_script_tag(url="/static/js/chat-markdown.js")

    def render(source: str) -> str:
        return page.evaluate(
            """(src) => { const d = document.createElement('div');
                ssechat.markdown.renderInto(d, src); return d.innerHTML; }""",
            source,
        )

    for source, html in RENDER_CASES:
        assert render(source) == html, source

    # Code blocks: a language class, the text as is, and an unclosed fence (streaming).
    block = render("```js\n<b>x</b>\n  y\n```\nafter")
    assert '<code class="language-js">&lt;b&gt;x&lt;/b&gt;\n  y</code>' in block
    assert block.endswith("<p>after</p>")
    assert 'class="code-block code-open"' in render("```py\nprint(1)")
    # An info string can only give letters, digits and +#._- to the class name.
    assert '<code class="language-script">x</code>' in render('```"><script>\nx\n```')
    # Nothing of the input ever becomes an element it did not ask for in Markdown.
    assert render("<b onmouseover=x>hi</b>") == "<p>&lt;b onmouseover=x&gt;hi&lt;/b&gt;</p>"
    # Deep nesting and long input stay fast and bounded.
    assert "<blockquote>" in render("> " * 200 + "deep")
    assert render("*a" * 3000 + "`" * 3000).startswith("<p>")
