"""The stream response on a real uvicorn server: headers, retry, keep-alive, stops."""

import asyncio
import signal
import time

import httpx
import pytest
from asgiref.sync import sync_to_async
from httpx_sse import aconnect_sse

from .rawsse import RawStream

pytestmark = pytest.mark.django_db(transaction=True)


async def test_headers_and_retry_come_first(live_server):
    async with httpx.AsyncClient(base_url=live_server.url, timeout=5) as client:
        async with client.stream("GET", "/test/channels/quiet/stream/") as response:
            assert response.status_code == 200
            assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
            assert response.headers["cache-control"] == "no-cache"
            assert response.headers["x-accel-buffering"] == "no"
            # No event exists on this channel: the retry line must still arrive at once.
            first = await asyncio.wait_for(response.aiter_raw().__anext__(), 2)
            assert first.startswith(b"retry: ")


async def test_keepalive_comments_when_idle(live_server):
    # The session server runs with SSECHAT_KEEPALIVE_SECONDS=1.
    stream = await RawStream.open("127.0.0.1", live_server.port, "/test/channels/idle/stream/")
    try:
        assert await stream.until(lambda p: len(p.comments) >= 2, timeout=5)
        assert stream.parser.events == []
    finally:
        stream.close()


@pytest.mark.parametrize(
    ("accept", "status"),
    [
        ("text/event-stream", 200),
        ("*/*", 200),
        ("text/*", 200),
        ("application/json, text/event-stream;q=0.5", 200),
        ("application/json", 406),
        ("text/html", 406),
        ("text/event-stream;q=0", 406),
    ],
)
async def test_accept_negotiation(live_server, accept, status):
    async with (
        httpx.AsyncClient(base_url=live_server.url, timeout=5) as client,
        client.stream("GET", "/test/channels/x/stream/", headers={"Accept": accept}) as response,
    ):
        assert response.status_code == status
        if status == 406:
            body = await response.aread()
            assert b'"error": "not_acceptable"' in body


async def test_no_accept_header_is_fine(live_server):
    stream = await RawStream.open("127.0.0.1", live_server.port, "/demo/stream/")
    stream.close()
    assert stream.status == 200


async def test_anonymous_gets_401_json_never_a_redirect(live_server):
    async with httpx.AsyncClient(base_url=live_server.url, timeout=5) as client:
        response = await client.get(
            "/test/channels/x/private/", headers={"Accept": "text/event-stream"}
        )
        assert response.status_code == 401
        assert response.json()["error"] == "not_authenticated"
        assert "location" not in response.headers


async def test_post_to_a_stream(live_server, alice, api_token, login_cookies):
    cookies = await sync_to_async(login_cookies)(alice)
    async with httpx.AsyncClient(base_url=live_server.url, timeout=5, cookies=cookies) as client:
        # A browser-style POST without a CSRF token is refused before the view, in JSON.
        response = await client.post("/demo/stream/")
        assert response.status_code == 403
        assert response.json()["error"] == "csrf_failed"
    async with httpx.AsyncClient(base_url=live_server.url, timeout=5) as client:
        # Without a session either: "who are you?" (401), never a redirect.
        response = await client.post("/api/test/channels/x/stream/")
        assert response.status_code == 401
        # A Bearer request is exempt from CSRF and gets the method answer.
        token = await sync_to_async(api_token)(alice)
        response = await client.post(
            "/api/test/channels/x/stream/", headers={"Authorization": f"Bearer {token}"}
        )
        assert response.status_code == 405
        assert response.headers["allow"] == "GET"


async def test_disconnect_leaves_nothing_behind(live_server):
    before = live_server.stats()["stats"]
    streams = [
        await RawStream.open("127.0.0.1", live_server.port, f"/test/channels/d{i}/stream/")
        for i in range(50)
    ]
    for s in streams:
        assert await s.until(lambda p: p.retry is not None)
    during = live_server.stats()["stats"]
    assert during["streams"] == before["streams"] + 50
    # No thread per stream, and no database connection held.
    assert during["threads"] <= before["threads"] + 2
    for s in streams:
        s.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        after = live_server.stats()["stats"]
        if after["streams"] == before["streams"] and after["tasks"] <= before["tasks"]:
            break
        await asyncio.sleep(0.1)
    assert after["streams"] == before["streams"]
    assert after["tasks"] <= before["tasks"]
    assert after["fds"] <= before["fds"] + 2


async def test_max_lifetime_ends_the_stream(start_server):
    server = start_server(SSECHAT_STREAM_MAX_SECONDS="1")
    stream = await RawStream.open("127.0.0.1", server.port, "/test/channels/life/stream/")
    started = time.monotonic()
    ended = await stream.until(lambda p: False, timeout=10)
    assert ended is False  # the server ended the response
    assert time.monotonic() - started < 5
    stream.close()


async def test_sigterm_ends_open_streams_and_the_process_exits(start_server):
    server = start_server()
    streams = [
        await RawStream.open("127.0.0.1", server.port, f"/test/channels/s{i}/stream/")
        for i in range(20)
    ]
    for s in streams:
        assert await s.until(lambda p: p.retry is not None)
    started = time.monotonic()
    server.signal(signal.SIGTERM)
    for s in streams:
        assert await s.until(lambda p: False, timeout=5) is False
    server.proc.wait(10)
    elapsed = time.monotonic() - started
    # uvicorn shuts down gracefully, then re-raises SIGTERM on itself (its documented way).
    assert server.proc.returncode in (0, -signal.SIGTERM)
    log = server.log()
    assert "Application shutdown complete" in log
    assert "Finished server process" in log
    # Ended well within uvicorn's patience; recorded, the real bound is the wait above.
    print(f"shutdown with 20 open streams took {elapsed:.2f}s")
    for s in streams:
        s.close()


async def test_demo_stream_resumes_its_counter(live_server):
    async with (
        httpx.AsyncClient(base_url=live_server.url, timeout=5) as client,
        aconnect_sse(client, "GET", "/demo/stream/", headers={"Last-Event-ID": "41"}) as source,
    ):
        async for event in source.aiter_sse():
            if not event.data:  # httpx-sse reports the bare `retry:` frame too
                continue
            assert event.id == "42"
            assert 1 <= int(__import__("json").loads(event.data)["value"]) <= 100
            break
