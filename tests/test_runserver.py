"""`manage.py runserver` serves ASGI through uvicorn: streams arrive live."""

import time

import httpx
import pytest

from .sse import EventStreamParser

pytestmark = pytest.mark.django_db(transaction=True)


def first_event_after(url: str) -> tuple[float, EventStreamParser]:
    parser = EventStreamParser()
    started = time.monotonic()
    with httpx.stream("GET", url, timeout=10) as response:
        assert response.status_code == 200
        for chunk in response.iter_raw():
            parser.feed(chunk)
            if parser.events:
                return time.monotonic() - started, parser
    raise AssertionError("the stream ended before its first event")


@pytest.mark.parametrize("reload", [False, True], ids=["noreload", "autoreload"])
def test_first_event_arrives_within_a_second(start_server, reload):
    server = start_server("runserver", reload=reload)
    elapsed, parser = first_event_after(server.url + "/demo/stream/")
    # Django's WSGI runserver would hold this response back until it ends (never).
    assert elapsed < 1.0, f"first event after {elapsed:.2f}s"
    assert parser.retry is not None
    assert parser.events[0].last_event_id == "1"
    log = server.log()
    assert "Starting ASGI development server (uvicorn)" in log


def test_runserver_serves_static_files_and_pages(start_server):
    server = start_server("runserver")
    response = httpx.get(server.url + "/static/admin/css/base.css", timeout=5)
    assert response.status_code == 200
    assert "text/css" in response.headers["content-type"]
    assert httpx.get(server.url + "/demo/", timeout=5).status_code == 200
