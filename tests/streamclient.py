"""Helpers to read a channel stream of the test servers with a real SSE client."""

from __future__ import annotations

import asyncio
import json
import random

import httpx
from httpx_sse import aconnect_sse


async def read_events(
    base_url: str,
    path: str,
    *,
    last_id: str | None = None,
    max_events: int | None = None,
    timeout: float = 15.0,
    headers: dict[str, str] | None = None,
    stop=None,
    idle: float | None = None,
) -> list:
    """Read events (with data) until ``max_events``, ``stop(event)``, or ``idle``
    seconds without an event (keep-alives do not count); then disconnect."""
    got = []
    hdrs = dict(headers or {})
    if last_id is not None:
        hdrs["Last-Event-ID"] = last_id
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout) as client:
        async with aconnect_sse(client, "GET", path, headers=hdrs) as source:
            source.response.raise_for_status()
            events = source.aiter_sse()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + idle if idle is not None else None
            while True:
                try:
                    if deadline is None:
                        event = await events.__anext__()
                    else:
                        event = await asyncio.wait_for(
                            events.__anext__(), max(0.0, deadline - loop.time())
                        )
                except (StopAsyncIteration, TimeoutError):
                    break
                if not event.data:
                    continue
                if idle is not None:
                    deadline = loop.time() + idle
                got.append(event)
                if max_events is not None and len(got) >= max_events:
                    break
                if stop is not None and stop(event):
                    break
    return got


async def read_with_random_disconnects(
    urls: list[str], path: str, expected: int, *, rng: random.Random, max_batch: int = 25
) -> list:
    """Keep reconnecting (to a random server of ``urls``) with the last id until
    ``expected`` tick events arrived; return every event received."""
    received: list = []
    last_id: str | None = None
    ticks = 0
    rounds = 0
    while ticks < expected:
        rounds += 1
        assert rounds < 10 * expected + 50, "no progress"
        batch = min(rng.randint(1, max_batch), expected - ticks)
        events = await read_events(
            rng.choice(urls), path, last_id=last_id, max_events=batch, timeout=20
        )
        for event in events:
            assert event.event != "reset", f"unexpected reset: {event.data}"
            received.append(event)
            last_id = event.id
            ticks += event.event == "tick"
    return received


def tick_values(events) -> list[int]:
    return [json.loads(e.data)["n"] for e in events if e.event == "tick"]
