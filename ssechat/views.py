"""Project-wide views: the health check and the public /demo/ stream."""

from __future__ import annotations

import asyncio
import os
import random
import threading
from datetime import UTC, datetime

from django.conf import settings
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from ssechat import collector
from ssechat.streams.brokers import broker_name
from ssechat.streams.db import run_db
from ssechat.streams.hub import CLOSE, KEEPALIVE_SIGNAL, get_hub
from ssechat.streams.response import EventStreamResponse, event_stream_view
from ssechat.streams.stream import KEEPALIVE_ITEM, resume_id
from ssechat.streams.wire import encode_json_event


def _ping_database() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


async def healthz(request: HttpRequest) -> JsonResponse:
    try:
        await run_db(_ping_database)
    except Exception as exc:
        return JsonResponse(
            {
                "status": "error",
                "database": "down",
                "detail": str(exc)[:200],
                "broker": broker_name(),
            },
            status=503,
        )
    body = {"status": "ok", "database": "ok", "broker": broker_name()}
    if settings.SSECHAT_STATS:
        body["stats"] = process_stats()
    return JsonResponse(body)


def process_stats() -> dict:
    """Counters that show leaks: open streams, asyncio tasks, OS threads, file descriptors."""
    hub = get_hub()
    broker = hub.broker
    try:
        fds = len(os.listdir("/proc/self/fd"))
    except OSError:
        fds = -1
    return {
        "pid": os.getpid(),
        "streams": len(hub.connections),
        "tasks": len(asyncio.all_tasks()),
        "threads": threading.active_count(),
        "fds": fds,
        "horizon": hub.horizon,
        "dispatched": hub.dispatched,
        "handed_over": hub.handed_over,
        "recalled": hub.recalled,
        "overflows": hub.overflows,
        "broker": getattr(broker, "name", None),
        "listening": getattr(broker, "listening", None),
        "gc": collector.snapshot(),
    }


@require_GET
def demo_page(request: HttpRequest) -> HttpResponse:
    return render(request, "demo/index.html")


DEMO_INTERVAL_SECONDS = 1.0


async def _random_values(first_id: int):
    """A random value a second, until the client leaves or the server stops."""
    hub = get_hub()
    await hub.start()
    conn = hub.open(())
    loop = asyncio.get_running_loop()
    try:
        next_id, due = first_id, loop.time()
        while True:
            value = random.randint(1, 100)
            at = datetime.now(UTC).isoformat(timespec="milliseconds")
            conn.wrote()
            yield encode_json_event({"value": value, "at": at}, id=next_id)
            next_id += 1
            due += DEMO_INTERVAL_SECONDS
            while (remaining := due - loop.time()) > 0:
                item = await conn.get(timeout=remaining)
                if item is None:
                    break
                if item is CLOSE:
                    return
                if item is KEEPALIVE_SIGNAL:
                    yield KEEPALIVE_ITEM
    finally:
        hub.release(conn)


@event_stream_view(login_required=False)
async def demo_stream(request: HttpRequest) -> EventStreamResponse:
    last = resume_id(request)
    first_id = int(last) + 1 if last is not None and last.isdigit() and len(last) < 18 else 1
    return EventStreamResponse(_random_values(first_id), label=request.path)
