"""Faults and load, tried for real on 127.0.0.1: nothing lost, nothing repeated, nothing leaked.

Each test prints its figures (``-s``) and appends them to
test-artifacts/hardening-figures.jsonl; docs/HARDENING.md shows them.

- a worker killed with SIGKILL while 200 clients stream (PostgreSQL: two servers);
- every database connection terminated, three times, while notifications are published
  (PostgreSQL; the machine's cluster itself is never restarted);
- a client that stops reading while 16 MB of events go by;
- 1,000 clients connecting and disconnecting in a storm: tasks, fds, connections counted;
- SIGTERM with 1,000 open streams.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth.models import Permission
from django.db import connections, transaction

from chat.recovery import DEAD_PROCESS
from notifications.models import Notification
from ssechat.streams.log import publish

from .hardening_tools import (
    Frames,
    connect,
    open_many,
    open_stream,
    other_backends,
    record,
    request_bytes,
    rss_kib,
    settle,
    start_servers,
    terminate_backends,
)
from .test_chat_helpers import FAST, ChatClient

pytestmark = pytest.mark.django_db(transaction=True)

__all__ = ["start_servers"]  # the fixture


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def publish_batch(channel: str, start: int, count: int) -> list[int]:
    """``count`` tick events in one transaction, from the test process."""
    with transaction.atomic():
        return [publish(channel, "tick", {"n": n}) for n in range(start, start + count)]


async def follow(
    ports: list[int],
    path: str,
    done,
    *,
    headers: dict[str, str] | None = None,
) -> tuple[list[tuple[str, str, bytes]], int]:
    """Read a stream until ``done(new_events)`` says so (it is called with each batch of
    new events); when the connection fails or ends first, reconnect with the last id, to
    the next port of ``ports`` (the last one is kept)."""
    events: list[tuple[str, str, bytes]] = []
    reconnects, index, finished = 0, 0, False
    while not finished:
        hdrs = dict(headers or {})
        if events:
            hdrs["Last-Event-ID"] = events[-1][0]
        try:
            stream = await open_stream(ports[index], path, hdrs)
        except (OSError, ValueError, IndexError):
            index = min(index + 1, len(ports) - 1)
            reconnects += 1
            await asyncio.sleep(0.05)
            continue
        frames = Frames()
        try:
            assert stream.status == 200, stream.status
            while not finished:
                chunk = await stream.read_chunk()
                if not chunk:
                    break
                if frames.feed(chunk):
                    events.extend(frames.events)
                    finished = done(frames.events)
                    frames.events = []
        except (OSError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            stream.close()
        if not finished:
            # The server went away (or ended the stream): go on elsewhere with the last id.
            reconnects += 1
            index = min(index + 1, len(ports) - 1)
    return events, reconnects


def counter(total: int, kind: str = "tick"):
    """A ``done`` for :func:`follow`: true once ``total`` events of ``kind`` arrived."""
    seen = 0

    def done(new) -> bool:
        nonlocal seen
        seen += sum(k == kind for _, k, _ in new)
        return seen >= total

    return done


def ticks(events) -> list[int]:
    return [json.loads(data)["n"] for _, kind, data in events if kind == "tick"]


# -- a worker killed -----------------------------------------------------------------


@pytest.mark.postgres
async def test_sigkill_a_worker_while_200_clients_stream(start_servers, alice, api_token):
    """Two servers on one PostgreSQL, 100 clients on each; events are published from
    another process while one server is killed with SIGKILL. Its clients reconnect to
    the other with their last id; every client ends with every event exactly once. An
    answer the dead server was writing ends ``failed`` with its ``done``."""
    a, b = start_servers(2, **FAST)
    clients, total = 200, 300
    channel = unique("sigkill")
    path = f"/test/channels/{channel}/stream/?from=start"

    # An answer being written by A, read from A.
    token = await sync_to_async(api_token)(alice)
    async with ChatClient(a.url, token) as chat:
        conversation = await chat.conversation()
        posted = await chat.send(conversation["id"], "[demo:slow] " + "tell me more " * 20)
    answer_id = posted["assistant_message"]["id"]
    answer_path = f"/api/chat/messages/{answer_id}/stream/"
    auth = {"Authorization": f"Bearer {token}"}
    answer_task = asyncio.create_task(
        follow([a.port, b.port], answer_path, counter(1, "done"), headers=auth)
    )

    tasks = [
        asyncio.create_task(
            follow(
                [a.port, b.port] if i < clients // 2 else [b.port],
                path,
                counter(total),
            )
        )
        for i in range(clients)
    ]
    await asyncio.sleep(1.0)  # let every client connect (the first event is sent from 0)
    killed_at = 0
    for start in range(0, total, 10):
        await sync_to_async(publish_batch)(channel, start, 10)
        if start == 100:
            a.kill()  # SIGKILL: no shutdown hook runs, its sockets just close
            killed_at = start + 10
        await asyncio.sleep(0.02)
    await sync_to_async(connections.close_all)()

    results = await asyncio.wait_for(asyncio.gather(*tasks), 90)
    answer_events, _ = await asyncio.wait_for(answer_task, 60)

    losses = repeats = resets = reconnects = 0
    for events, count in results:
        values = ticks(events)
        losses += len(set(range(total)) - set(values))
        repeats += len(values) - len(set(values))
        resets += sum(kind == "reset" for _, kind, _ in events)
        reconnects += count
        assert values == list(range(total))
        ids = [int(i) for i, _, _ in events]
        assert ids == sorted(set(ids))
    assert resets == 0
    assert reconnects >= clients // 2  # every client of A came back on B

    deltas = "".join(json.loads(d)["text"] for _, k, d in answer_events if k == "delta")
    done = json.loads(answer_events[-1][2])
    assert answer_events[-1][1] == "done"
    assert done["status"] == "failed" and done["error"] == DEAD_PROCESS
    assert deltas == done["content"]
    record(
        "sigkill_worker",
        clients=clients, events=total, killed_after_events=killed_at, reconnects=reconnects,
        losses=losses, repeats=repeats, answer="failed",
    )  # fmt: skip


# -- the database's connections terminated -------------------------------------------


def _sender():
    from django.contrib.auth import get_user_model

    user = get_user_model().objects.create_user("sender", password="x", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="add_notification"))
    return user


@pytest.mark.postgres
async def test_database_connections_terminated_while_publishing(start_servers, alice, api_token):
    """Notifications are POSTed to two servers while every connection to the test database
    is terminated three times (what a PostgreSQL restart does to the servers). A publish
    either succeeds (201) or fails with a clear JSON error; the brokers reconnect; feed
    clients that resume with their last id end with every committed notification once."""
    servers = start_servers(2)
    sender_token = await sync_to_async(api_token)(await sync_to_async(_sender)())
    alice_token = await sync_to_async(api_token)(alice)
    feed = "/api/notifications/stream/"
    clients, total = 20, 90
    end_title = unique("the end")

    def finished(new) -> bool:
        return any(k == "notification" and end_title.encode() in d for _, k, d in new)

    readers = [
        asyncio.create_task(
            follow(
                [servers[i % 2].port],
                feed,
                finished,
                headers={"Authorization": f"Bearer {alice_token}"},
            )
        )
        for i in range(clients)
    ]
    await asyncio.sleep(1.0)

    statuses: dict[int, int] = {}
    errors: list[tuple[int, str, str]] = []
    acknowledged: set[int] = set()
    kills: list[int] = []

    async def send(http: httpx.AsyncClient, n: int) -> None:
        response = await http.post(
            servers[n % 2].url + "/api/notifications/",
            json={"recipient": "alice", "title": f"n{n}", "data": {"n": n}},
            headers={"Authorization": f"Bearer {sender_token}"},
        )
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        if response.status_code == 201:
            acknowledged.add(response.json()["id"])
        else:
            errors.append((response.status_code, response.headers["content-type"],
                           response.text[:200]))  # fmt: skip

    async with httpx.AsyncClient(timeout=30) as http:
        queue = list(range(total))

        async def publisher() -> None:
            while queue:
                await send(http, queue.pop(0))

        async def killer() -> None:
            # Mid-flight: three publishers have requests open when the connections go.
            for at in (total // 4, total // 2, 3 * total // 4):
                while total - len(queue) < at:
                    await asyncio.sleep(0.005)
                kills.append(await sync_to_async(terminate_backends)())

        await asyncio.gather(publisher(), publisher(), publisher(), killer())
        await asyncio.sleep(0.5)  # let the last kill's reconnects happen
        for _attempt in range(20):  # the end marker must get through: retry it
            response = await http.post(
                servers[0].url + "/api/notifications/",
                json={"recipient": "alice", "title": end_title},
                headers={"Authorization": f"Bearer {sender_token}"},
            )
            if response.status_code == 201:
                break
            await asyncio.sleep(0.2)
        assert response.status_code == 201, response.text

    results = await asyncio.wait_for(asyncio.gather(*readers), 60)
    stored = set(
        await sync_to_async(
            lambda: list(Notification.objects.filter(recipient=alice).values_list("id", flat=True))
        )()
    )
    assert acknowledged <= stored  # a 201 was committed
    losses = repeats = reconnects = 0
    for events, count in results:
        got = [json.loads(d)["id"] for _, k, d in events if k == "notification"]
        losses += len(stored - set(got))
        repeats += len(got) - len(set(got))
        reconnects += count
        assert sorted(got) == sorted(stored)
        assert not any(k == "reset" for _, k, _ in events)

    # A publish whose connection died mid-request failed (nothing half-done was sent).
    # That it says so clearly (503 JSON) is test_request_losing_its_connection_gets_503.
    for status, _content_type, text in errors:
        assert status in (500, 503), (status, text)
    for server in servers:  # the broker listens again (it may be in a back-off sleep)
        stats = await settle(server.stats, lambda s: s["stats"]["listening"] is True)
        assert stats["stats"]["listening"] is True
    record(
        "postgres_connections_terminated",
        clients=clients, published=total, committed=len(stored) - 1,
        failed_publishes=len(errors), failed_statuses=sorted({e[0] for e in errors}),
        terminated_connections=sum(kills), kill_rounds=len(kills),
        reconnects=reconnects, losses=losses, repeats=repeats,
    )  # fmt: skip


LOCKED_REQUESTS = {
    "notification": (
        "notifications_notification", "/api/notifications/",
        {"recipient": None, "title": "locked out"},
    ),
    "conversation": ("chat_conversation", "/api/chat/conversations/", {"title": "locked out"}),
    "openai": (
        "chat_conversation", "/v1/chat/completions",
        {"model": "m", "messages": [{"role": "user", "content": "[demo:echo] hi"}]},
    ),
}  # fmt: skip


@pytest.mark.postgres
@pytest.mark.parametrize("case", sorted(LOCKED_REQUESTS))
def test_request_losing_its_connection_gets_503(live_server, make_user, case):
    """The request is made to wait on a table lock, and its connection is terminated
    while it waits: the client must be told clearly (503 JSON), not given an HTML page."""
    import threading

    import psycopg

    from ssechat.accounts.models import ApiToken
    from ssechat.streams.brokers import pg_conninfo

    table, path, body = LOCKED_REQUESTS[case]
    user = make_user("locked", is_superuser=True)
    token = ApiToken.create_for(user, name="t")[1]
    result: dict = {}

    def request() -> None:
        result["response"] = httpx.post(
            live_server.url + path, json=body, headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )  # fmt: skip

    def terminate_waiters(cursor, holder_pid: int, seconds: float) -> list[int]:
        """Terminate the connections waiting on the lock (within ``seconds``)."""
        deadline = time.monotonic() + seconds
        while True:
            cursor.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock' AND pid <> %s",
                [holder_pid],
            )
            waiting = [row[0] for row in cursor.fetchall()]
            if waiting or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        if waiting:
            cursor.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) pid", [waiting])
        return waiting

    with psycopg.connect(pg_conninfo()) as holder:
        holder.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        thread = threading.Thread(target=request)
        thread.start()
        with connections["default"].cursor() as cursor:
            pid = holder.info.backend_pid
            assert terminate_waiters(cursor, pid, 20), "the request never waited on the lock"
            # The stream pool retries once on a new connection (made for a restarted
            # database): that one is terminated too, so the request does fail.
            terminate_waiters(cursor, pid, 2)
        holder.rollback()
    thread.join(30)
    response = result["response"]
    assert response.status_code == 503, (response.status_code, response.text[:200])
    assert response.headers["content-type"] == "application/json"
    assert "error" in response.json()


# -- a client that stops reading ------------------------------------------------------


def publish_padded(channel: str, start: int, count: int, size: int, batch: int = 500) -> None:
    pad = "x" * size
    for first in range(start, start + count, batch):
        with transaction.atomic():
            for n in range(first, min(first + batch, start + count)):
                publish(channel, "tick", {"n": n, "pad": pad})
    connections.close_all()


async def test_a_client_that_stops_reading(start_server):
    """One client stops reading (tiny receive buffer, full socket) while 16 MB of events
    go by. The server's memory does not grow with what it cannot send (its mailbox holds
    ``SSECHAT_SUBSCRIBER_QUEUE`` events, then it catches up from the database); the other
    clients get everything meanwhile; when it reads again it gets every event once."""
    server = start_server(SSECHAT_SUBSCRIBER_QUEUE="100")
    channel = unique("stall")
    path = f"/test/channels/{channel}/stream/"
    pid = server.stats()["stats"]["pid"]
    size, phases, per_phase = 4000, 8, 500
    readers = await open_many(server.port, [path] * 3)
    frames = [Frames() for _ in readers]
    published = 0

    async def publish_and_wait(count: int, batch: int = 500) -> float:
        """Publish ``count`` events; how long after the commit the slowest reader had all."""
        nonlocal published
        await sync_to_async(publish_padded)(channel, published, count, size, batch)
        published += count
        committed = time.monotonic()

        async def read_all(stream, parsed) -> float:
            while len(parsed.events) < published:
                chunk = await stream.read_chunk()
                assert chunk, "a reader's stream ended"
                parsed.feed(chunk)
            return time.monotonic() - committed

        readers_done = [read_all(s, f) for s, f in zip(readers, frames, strict=True)]
        return max(await asyncio.wait_for(asyncio.gather(*readers_done), 60))

    # Warm up: the broker reads its biggest batch (2,000 events) once, with no one stalled.
    lag_alone = await publish_and_wait(2000, batch=2000)
    stalled = await open_stream(server.port, path, rcvbuf=4096)
    assert await stalled.until(lambda p: p.retry is not None)
    first_id = published  # the stalled client starts live: it wants every later event
    rss, lags = [], []
    for _ in range(phases):
        lags.append(await publish_and_wait(per_phase))
        rss.append(rss_kib(pid))
    # Bounded: the server dropped its mailbox rather than hold what it cannot send ...
    stats = server.stats()["stats"]
    assert stats["overflows"] >= 1, stats
    # ... so each 2 MB more that it cannot send does not make it bigger (an unbounded
    # queue adds it twice, text and frame: about 4 MiB a phase). While it warms up the
    # server holds a catch-up page (up to 1,000 events) and the kernel's send buffer
    # grows, and the allocator grows in steps now and then: the growth after the third
    # phase counts, and must stay under half of what an unbounded queue would add.
    phase_mib = per_phase * size / 2**20
    warm = 2
    growth_mib = (rss[-1] - rss[warm]) / 1024
    unbounded_mib = 2 * phase_mib * (phases - 1 - warm)
    assert growth_mib < unbounded_mib / 2, (growth_mib, unbounded_mib, rss)

    # It reads again: every event it missed arrives, once, in order (caught up from the log).
    caught = Frames()
    while len([1 for _, k, _ in caught.events if k == "tick"]) < published - first_id:
        chunk = await asyncio.wait_for(stalled.read_chunk(), 30)
        assert chunk, "the stalled stream ended"
        caught.feed(chunk)
    stalled.close()
    values = [json.loads(data)["n"] for _, kind, data in caught.events if kind == "tick"]
    resets = sum(kind == "reset" for _, kind, _ in caught.events)
    assert resets == 0 and values == list(range(first_id, published))
    for stream, parsed in zip(readers, frames, strict=True):
        stream.close()
        assert [json.loads(d)["n"] for _, _, d in parsed.events] == list(range(published))
    record(
        "stalled_reader",
        readers=len(readers), stalled=1, events=published, event_bytes=size,
        unread_mib=round(phases * per_phase * size / 2**20, 1),
        rss_mib=[round(r / 1024, 1) for r in rss], rss_growth_mib=round(growth_mib, 2),
        overflows=stats["overflows"],
        reader_lag_s_alone=round(lag_alone, 2), reader_lag_s_stalled=round(max(lags), 2),
        losses=len(set(range(first_id, published)) - set(values)),
        repeats=len(values) - len(set(values)),
    )  # fmt: skip


# -- a connect/disconnect storm --------------------------------------------------------


async def storm_client(port: int, kind: int, i: int, tokens: list[str]) -> str:
    """One client of the storm; returns how it behaved."""
    channel = f"storm-{i % 50}"
    if kind == 0:  # reads the first bytes, hangs up (FIN)
        stream = await open_stream(port, f"/test/channels/{channel}/stream/")
        await stream.until(lambda p: p.retry is not None)
        stream.close()
        return "graceful"
    if kind == 1:  # vanishes: RST
        stream = await open_stream(port, f"/test/channels/{channel}/stream/", linger0=True)
        await stream.until(lambda p: p.retry is not None)
        stream.close()
        return "reset"
    if kind == 2:  # half a request, then gone
        _reader, writer = await connect(port)
        writer.write(request_bytes(port, f"/test/channels/{channel}/stream/")[:30])
        await writer.drain()
        writer.close()
        return "half-request"
    if kind == 3:  # a whole request, gone before the answer
        _reader, writer = await connect(port, linger0=True)
        writer.write(request_bytes(port, "/demo/stream/"))
        await writer.drain()
        writer.close()
        return "fire-and-forget"
    # An authenticated feed (one database query on connect), read until `unread`.
    token = tokens[(i // 5) % len(tokens)]
    stream = await open_stream(
        port, "/api/notifications/stream/", {"Authorization": f"Bearer {token}"}
    )
    assert stream.status == 200, stream.status
    await stream.until(lambda p: any(e.type == "unread" for e in p.events))
    stream.close()
    return "feed"


async def test_connect_disconnect_storm_leaks_nothing(live_server, make_user, api_token):
    """1,000 clients connect and leave in every way a client can (FIN, RST, half a
    request, gone before the answer, an authenticated feed), 200 at a time. Afterwards the
    server has the streams, tasks, threads and file descriptors it had before, and no
    more database connections (PostgreSQL)."""
    users = [await sync_to_async(make_user)(f"storm{n}") for n in range(5)]
    tokens = [await sync_to_async(api_token)(user) for user in users]
    port = live_server.port
    on_postgres = connections["default"].vendor == "postgresql"
    # Warm up (the stream pool opens its connections on first use), then count.
    await asyncio.gather(*[storm_client(port, i % 5, i, tokens) for i in range(40)])
    quiet = await settle(live_server.stats, lambda s: s["stats"]["streams"] == 0)
    before = quiet["stats"]
    db_before = await sync_to_async(other_backends)() if on_postgres else None

    total, batch = 1000, 200
    kinds: dict[str, int] = {}
    errors: list[str] = []
    started = time.monotonic()
    for first in range(0, total, batch):
        results = await asyncio.gather(
            *[storm_client(port, i % 5, i, tokens) for i in range(first, first + batch)],
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                errors.append(repr(result))
            else:
                kinds[result] = kinds.get(result, 0) + 1
    storm_seconds = time.monotonic() - started
    assert errors == [], errors[:5]

    def settled(stats) -> bool:
        s = stats["stats"]
        return (
            s["streams"] == before["streams"]
            and s["tasks"] <= before["tasks"]
            and s["fds"] <= before["fds"]
            and s["threads"] <= before["threads"]
        )

    after = (await settle(live_server.stats, settled))["stats"]
    db_after = await sync_to_async(other_backends)() if on_postgres else None
    assert after["streams"] == before["streams"]
    assert after["tasks"] <= before["tasks"]
    assert after["threads"] <= before["threads"]
    assert after["fds"] <= before["fds"] + 2
    if on_postgres:
        assert db_after <= db_before
    # And it still serves.
    stream = await open_stream(port, "/demo/stream/")
    assert stream.status == 200 and await stream.until(lambda p: len(p.events) >= 1)
    stream.close()
    record(
        "storm",
        clients=total, concurrent=batch, kinds=kinds, seconds=round(storm_seconds, 1),
        streams=f"{before['streams']}->{after['streams']}",
        tasks=f"{before['tasks']}->{after['tasks']}",
        threads=f"{before['threads']}->{after['threads']}",
        fds=f"{before['fds']}->{after['fds']}",
        db_connections=f"{db_before}->{db_after}" if on_postgres else "n/a (SQLite)",
        leaks=max(0, after["tasks"] - before["tasks"]) + max(0, after["fds"] - before["fds"]),
    )  # fmt: skip


# -- graceful shutdown ----------------------------------------------------------------


async def test_sigterm_with_1000_open_streams(start_server):
    """SIGTERM while 1,000 streams are open: every stream ends and the process exits
    within a few seconds (uvicorn alone would wait for the streams for ever)."""
    server = start_server()
    paths = [
        "/demo/stream/" if i % 5 == 0 else f"/test/channels/bye-{i % 100}/stream/"
        for i in range(1000)
    ]
    streams = await open_many(server.port, paths, batch=200)
    assert server.stats()["stats"]["streams"] == len(streams)
    started = time.monotonic()
    server.signal(signal.SIGTERM)

    async def ended(stream) -> float:
        try:
            while await stream.read_chunk():
                pass
        except (OSError, asyncio.IncompleteReadError):
            pass
        return time.monotonic() - started

    times = await asyncio.wait_for(asyncio.gather(*[ended(s) for s in streams]), 30)
    await asyncio.to_thread(server.proc.wait, 30)
    exited = time.monotonic() - started
    for stream in streams:
        stream.close()
    assert server.proc.returncode in (0, -signal.SIGTERM)
    # The bound that matters is the wait above; this one says "a few seconds".
    assert exited < 15, exited
    record(
        "graceful_shutdown",
        streams=len(streams), all_streams_ended_s=round(max(times), 2),
        process_exited_s=round(exited, 2), exit_code=server.proc.returncode,
    )  # fmt: skip
