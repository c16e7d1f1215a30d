"""Event log, brokers and resume: no gap and no repeat, on SQLite and PostgreSQL."""

import asyncio
import json
import random
import threading
import time
import uuid

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.core.management import call_command
from django.db import connection, connections, transaction

from ssechat.streams.log import publish
from ssechat.streams.models import Event

from .streamclient import read_events, read_with_random_disconnects, tick_values

pytestmark = pytest.mark.django_db(transaction=True)


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def publish_ticks(channel: str, start: int, count: int, *, delay: float = 0.0) -> list[int]:
    ids = []
    for n in range(start, start + count):
        ids.append(publish(channel, "tick", {"n": n}))
        if delay:
            time.sleep(delay)
    connections.close_all()  # this runs on a worker thread: leave no connection behind
    return ids


async def publish_via(server_url: str, channel: str, start: int, count: int) -> list[int]:
    async with httpx.AsyncClient(base_url=server_url, timeout=10) as client:
        response = await client.post(
            f"/test/channels/{channel}/publish/", json={"start": start, "count": count}
        )
        response.raise_for_status()
        return response.json()["ids"]


async def test_events_from_another_process_reach_a_stream(live_server):
    channel = unique("other-process")
    reader = asyncio.create_task(
        read_events(live_server.url, f"/test/channels/{channel}/stream/", max_events=3)
    )
    await asyncio.sleep(0.5)
    # Published by this (test) process: the server learns of it through its broker.
    await sync_to_async(publish_ticks)(channel, 0, 3)
    events = await asyncio.wait_for(reader, 10)
    assert tick_values(events) == [0, 1, 2]
    ids = [int(e.id) for e in events]
    assert ids == sorted(ids)


async def test_events_published_by_the_server_are_handed_out_without_a_read_back(live_server):
    channel = unique("own-process")
    reader = asyncio.create_task(
        read_events(live_server.url, f"/test/channels/{channel}/stream/", max_events=20)
    )
    await asyncio.sleep(0.5)
    before = (await sync_to_async(live_server.stats)())["stats"]["handed_over"]
    ids = []
    for start in range(0, 20, 5):
        ids += await publish_via(live_server.url, channel, start, 5)
    events = await asyncio.wait_for(reader, 10)
    assert tick_values(events) == list(range(20))
    assert [int(e.id) for e in events] == ids
    after = (await sync_to_async(live_server.stats)())["stats"]["handed_over"]
    if connection.vendor == "sqlite":
        # Every one went from the commit to the hub; none was read back.
        assert after - before == 20
    else:
        # PostgreSQL's NOTIFY races the hand-over: the broker may read one first.
        assert after > before


async def test_rolled_back_publish_sends_nothing(live_server):
    channel = unique("rollback")

    def rolled_back_then_committed():
        try:
            with transaction.atomic():
                publish(channel, "tick", {"n": -1})
                raise RuntimeError("roll back")
        except RuntimeError:
            pass
        publish(channel, "tick", {"n": 1})

    reader = asyncio.create_task(
        read_events(live_server.url, f"/test/channels/{channel}/stream/", max_events=1)
    )
    await asyncio.sleep(0.5)
    await sync_to_async(rolled_back_then_committed)()
    events = await asyncio.wait_for(reader, 10)
    assert tick_values(events) == [1]


async def test_resume_with_random_disconnects(live_server):
    """A client disconnecting at random points while events are published gets
    every event exactly once, in order."""
    channel = unique("resume")
    total = 240
    rng = random.Random(1234)

    async def publisher():
        n = 0
        while n < total:
            count = rng.randint(1, 8)
            count = min(count, total - n)
            if rng.random() < 0.5:
                await publish_via(live_server.url, channel, n, count)
            else:
                await sync_to_async(publish_ticks)(channel, n, count)
            n += count
            await asyncio.sleep(rng.random() * 0.03)

    pub = asyncio.create_task(publisher())
    received = await read_with_random_disconnects(
        [live_server.url], f"/test/channels/{channel}/stream/?from=start", total, rng=rng
    )
    await pub
    assert tick_values(received) == list(range(total))
    ids = [int(e.id) for e in received]
    assert ids == sorted(set(ids))


async def test_resume_from_header_and_parameter(live_server):
    channel = unique("param")
    ids = await sync_to_async(publish_ticks)(channel, 0, 5)
    path = f"/test/channels/{channel}/stream/"
    # The query parameter works (htmx's SSE extension cannot send the header)...
    got = await read_events(live_server.url, f"{path}?lastEventId={ids[1]}", max_events=3)
    assert tick_values(got) == [2, 3, 4]
    # ...and the header wins over it.
    got = await read_events(
        live_server.url, f"{path}?lastEventId={ids[0]}", last_id=str(ids[3]), max_events=1
    )
    assert tick_values(got) == [4]


@pytest.mark.parametrize(
    ("bad_id", "reason"),
    [
        ("abc", "malformed"),
        ("-5", "malformed"),
        ("1.5", "malformed"),
        ("9" * 40, "malformed"),
        ("999999999999", "unknown"),
    ],
)
async def test_unusable_resume_ids_get_reset_then_live(live_server, bad_id, reason):
    channel = unique("reset")
    path = f"/test/channels/{channel}/stream/"
    reader = asyncio.create_task(read_events(live_server.url, path, last_id=bad_id, max_events=2))
    await asyncio.sleep(0.5)
    await sync_to_async(publish_ticks)(channel, 0, 1)
    reset, tick = await asyncio.wait_for(reader, 10)
    assert reset.event == "reset"
    assert reason in json.loads(reset.data)["reason"]
    assert reset.id.isdigit()
    assert tick_values([tick]) == [0]
    assert int(tick.id) > int(reset.id)


async def test_pruned_resume_id_gets_reset(live_server):
    channel = unique("pruned")
    ids = await sync_to_async(publish_ticks)(channel, 0, 5)
    await sync_to_async(publish_ticks)(unique("newer"), 0, 3)
    await sync_to_async(call_command)("prune_events", keep=3, max_age=10**9)
    assert not await Event.objects.filter(id__in=ids).aexists()
    got = await read_events(
        live_server.url, f"/test/channels/{channel}/stream/", last_id=str(ids[1]), max_events=1
    )
    assert got[0].event == "reset"
    assert "no longer stored" in json.loads(got[0].data)["reason"]


async def test_slow_subscriber_catches_up_from_the_database(start_server):
    """A client whose mailbox overflows is caught up from the database, in order."""
    server = start_server(SSECHAT_SUBSCRIBER_QUEUE="5")
    channel = unique("slow")
    path = f"/test/channels/{channel}/stream/"
    async with httpx.AsyncClient(base_url=server.url, timeout=20) as client:
        async with client.stream("GET", path) as response:
            from .sse import EventStreamParser

            parser = EventStreamParser()
            chunks = response.aiter_raw()
            parser.feed(await chunks.__anext__())  # retry: the stream is registered
            # 200 events at once, far more than the 5 the mailbox holds.
            await publish_via(server.url, channel, 0, 200)
            while len([e for e in parser.events if e.type == "tick"]) < 200:
                parser.feed(await asyncio.wait_for(chunks.__anext__(), 10))
    values = [json.loads(e.data)["n"] for e in parser.events if e.type == "tick"]
    assert values == list(range(200))


@pytest.mark.postgres
async def test_two_workers_share_events_and_resume_across_them(start_server):
    a = start_server()
    b = start_server()
    channel = unique("workers")
    path = f"/test/channels/{channel}/stream/"
    reader = asyncio.create_task(read_events(a.url, path, max_events=5))
    await asyncio.sleep(0.5)
    await publish_via(b.url, channel, 0, 5)  # published through the other worker
    first = await asyncio.wait_for(reader, 10)
    assert tick_values(first) == [0, 1, 2, 3, 4]
    # While the client is away, more is published through A; it resumes on B.
    await publish_via(a.url, channel, 5, 5)
    rest = await read_events(b.url, path, last_id=first[-1].id, max_events=5)
    assert tick_values(rest) == [5, 6, 7, 8, 9]


@pytest.mark.postgres
async def test_random_disconnects_across_two_workers(start_server):
    a = start_server()
    b = start_server()
    channel = unique("cross")
    total = 200
    rng = random.Random(99)

    async def publisher():
        for n in range(0, total, 5):
            await publish_via(rng.choice([a.url, b.url]), channel, n, 5)
            await asyncio.sleep(rng.random() * 0.02)

    pub = asyncio.create_task(publisher())
    received = await read_with_random_disconnects(
        [a.url, b.url], f"/test/channels/{channel}/stream/?from=start", total, rng=rng
    )
    await pub
    assert tick_values(received) == list(range(total))


async def test_resume_after_server_restart(start_server):
    server = start_server()
    channel = unique("restart")
    path = f"/test/channels/{channel}/stream/"
    reader = asyncio.create_task(read_events(server.url, path, max_events=3))
    await asyncio.sleep(0.5)
    await sync_to_async(publish_ticks)(channel, 0, 3)
    first = await asyncio.wait_for(reader, 10)
    server.stop()
    # Published while no server runs.
    await sync_to_async(publish_ticks)(channel, 3, 4)
    again = start_server()
    rest = await read_events(again.url, path, last_id=first[-1].id, max_events=4)
    assert tick_values(first + rest) == list(range(7))


@pytest.mark.postgres
async def test_listening_connection_killed(start_server):
    server = start_server(SSECHAT_POLL_INTERVAL="30")  # no safety-net poll: NOTIFY only
    channel = unique("killed")
    path = f"/test/channels/{channel}/stream/"

    def kill_listeners() -> int:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND query ILIKE 'LISTEN%%'"
            )
            return cursor.fetchone()[0]

    reader = asyncio.create_task(read_events(server.url, path, max_events=6))
    await asyncio.sleep(0.5)
    await sync_to_async(publish_ticks)(channel, 0, 2)
    assert await sync_to_async(kill_listeners)() >= 1
    # Published while the listener is down: read when it reconnects.
    await sync_to_async(publish_ticks)(channel, 2, 2)
    await asyncio.sleep(1.0)
    await sync_to_async(publish_ticks)(channel, 4, 2)
    events = await asyncio.wait_for(reader, 20)
    assert tick_values(events) == list(range(6))


@pytest.mark.postgres
async def test_concurrent_publishers_never_skipped_by_a_resume(live_server):
    """Transactions commit out of order (and some roll back) while clients resume
    over and over: each client ends with every committed event exactly once."""
    channel = unique("concurrent")
    per_thread, threads = 40, 6
    committed: list[int] = []
    lock = threading.Lock()
    done = threading.Event()

    def worker(seed: int):
        r = random.Random(seed)
        try:
            for i in range(per_thread):
                try:
                    with transaction.atomic():
                        event_id = publish(channel, "tick", {"n": seed * 1000 + i})
                        # Hold the transaction open so later ids commit first.
                        time.sleep(r.random() * 0.02)
                        if r.random() < 0.1:
                            raise RuntimeError("roll back")
                    with lock:
                        committed.append(event_id)
                except RuntimeError:
                    pass
        finally:
            connections.close_all()

    pool = [threading.Thread(target=worker, args=(s,)) for s in range(threads)]
    for t in pool:
        t.start()

    async def client(seed: int) -> list:
        r = random.Random(seed)
        received, last_id = [], None
        while True:
            finished = done.is_set()
            events = await read_events(
                live_server.url, f"/test/channels/{channel}/stream/?from=start",
                last_id=last_id, max_events=r.randint(1, 15), idle=1.0,
            )  # fmt: skip
            for e in events:
                assert e.event != "reset"
                received.append(e)
                last_id = e.id
            if finished and not events:
                return received

    clients = [asyncio.create_task(client(s)) for s in range(4)]
    while any(t.is_alive() for t in pool):
        await asyncio.sleep(0.05)
    done.set()
    results = await asyncio.gather(*clients)
    expected = sorted(committed)
    for received in results:
        ids = [int(e.id) for e in received]
        assert ids == expected  # every committed event, once, in id order


@pytest.mark.postgres
async def test_idle_streams_hold_no_connection_and_no_thread(live_server):
    from .rawsse import RawStream

    def backend_count() -> int:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            )
            return cursor.fetchone()[0]

    before = live_server.stats()["stats"]
    connections_before = await sync_to_async(backend_count)()
    streams = []
    for batch in range(20):
        opened = await asyncio.gather(
            *[
                RawStream.open(
                    "127.0.0.1", live_server.port, f"/test/channels/idle-{batch}-{i}/stream/"
                )
                for i in range(100)
            ]
        )
        streams.extend(opened)
    try:
        await asyncio.gather(*[s.until(lambda p: p.retry is not None) for s in streams])
        during = live_server.stats()["stats"]
        connections_during = await sync_to_async(backend_count)()
        assert during["streams"] >= before["streams"] + 2000
        assert during["threads"] <= before["threads"] + 4
        # The stream pool and the broker: a handful, whatever the number of clients.
        assert connections_during <= connections_before + 6
        print(f"2000 idle streams: threads {before['threads']}->{during['threads']}, "
              f"connections {connections_before}->{connections_during}")  # fmt: skip
    finally:
        for s in streams:
            s.close()


@pytest.mark.postgres
async def test_an_earlier_id_held_by_a_younger_xid_is_not_skipped(live_server):
    """The interleaving that fools a snapshot's ``xmax``: transaction A takes its xid
    first, B takes a later xid and then the *earlier* event id, A takes the next id and
    commits. A snapshot's xmax is the latest completed xid + 1, so B's running xid can
    sit at or above it while B holds the missing id: the broker must still wait for B."""
    import psycopg

    from ssechat.streams.brokers import pg_conninfo

    channel = unique("xid-order")
    table = Event._meta.db_table
    insert = f"""
        WITH xact AS MATERIALIZED (SELECT pg_current_xact_id()),
        ins AS (
            INSERT INTO {table} (id, channel, parent, type, data, created_at)
            SELECT nextval(pg_get_serial_sequence(%s, 'id')::regclass), %s, '', 'tick', %s,
                   now() FROM xact
            RETURNING id
        )
        SELECT id, pg_notify('ssechat_events', '') FROM ins
    """  # noqa: S608
    reader = asyncio.create_task(
        read_events(live_server.url, f"/test/channels/{channel}/stream/", max_events=2, idle=8)
    )
    await asyncio.sleep(0.5)  # the stream is open

    def interleave() -> list[int]:
        info = pg_conninfo()
        with psycopg.connect(info) as a, psycopg.connect(info) as b:
            a.execute("SELECT pg_current_xact_id()")  # A: the older xid
            (held,) = b.execute(insert, [table, channel, '{"n": 1}']).fetchone()[:1]  # B
            (later,) = a.execute(insert, [table, channel, '{"n": 2}']).fetchone()[:1]
            a.commit()  # the later id is visible; the earlier one is held by B
            time.sleep(1.5)  # the broker sees the gap and looks again, many times
            b.commit()
        return [held, later]

    ids = await asyncio.to_thread(interleave)
    assert ids[1] == ids[0] + 1
    events = await reader
    assert [int(e.id) for e in events] == ids
    assert [json.loads(e.data)["n"] for e in events] == [1, 2]


def test_this_processs_sqlite_writers_take_turns_on_a_lock():
    """Threads of one process writing at once take turns on the process's lock, not in
    SQLite's busy handler (which sleeps in steps of up to 100 ms): with SQLite's busy
    timeout at 0, a writer that met the write lock taken would fail at once."""
    if connection.vendor != "sqlite":
        pytest.skip("SQLite only")
    from ssechat.sqlite3.base import write_lock

    lock = write_lock(str(connection.settings_dict["NAME"]))
    channel = unique("turns")
    errors: list[Exception] = []

    def writer(n: int) -> None:
        conn = connections["default"]
        conn.ensure_connection()
        conn.connection.execute("PRAGMA busy_timeout = 0")
        try:
            for i in range(20):
                with transaction.atomic():
                    publish(channel, "tick", {"n": n * 100 + i})
                    time.sleep(0.002)  # hold the write lock a little
        except Exception as exc:
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert Event.objects.filter(channel=channel).count() == 80
    assert not lock.locked()  # every transaction gave its turn back


def test_publish_many_stores_in_order_and_hands_out_after_commit(monkeypatch):
    from ssechat.streams import log

    offered = []
    monkeypatch.setattr(log, "_offer_all", offered.extend)
    events = [
        ("c-a", "delta", {"text": "one"}, "parent-a"),
        ("c-b", "delta", {"text": "two"}, ""),
        ("c-a", "done", {"n": 3}, ""),
    ]
    with transaction.atomic():
        ids = log.publish_many(events)
        assert offered == []  # not before the commit
    assert ids == sorted(ids) and len(set(ids)) == 3
    rows = list(Event.objects.filter(id__in=ids).order_by("id"))
    assert [(r.id, r.channel, r.type, json.loads(r.data), r.parent) for r in rows] == [
        (i, c, t, p, parent) for i, (c, t, p, parent) in zip(ids, events, strict=True)
    ]
    assert all(r.created_at is not None for r in rows)
    assert [(e.id, e.channel, e.parent, e.type) for e in offered] == [
        (i, c, parent, t) for i, (c, t, _, parent) in zip(ids, events, strict=True)
    ]
    assert [e.data for e in offered] == [r.data for r in rows]

    # More rows than one INSERT takes, and a rolled-back batch stores and offers nothing.
    many = [("c-many", "tick", {"n": n}, "") for n in range(log._MANY_BATCH + 7)]
    offered.clear()
    with pytest.raises(RuntimeError), transaction.atomic():
        log.publish_many(many)
        raise RuntimeError("roll back")
    assert offered == [] and not Event.objects.filter(channel="c-many").exists()
    ids = log.publish_many(many)
    stored = Event.objects.filter(channel="c-many").order_by("id")
    assert [json.loads(e.data)["n"] for e in stored] == list(range(len(many)))
    assert list(stored.values_list("id", flat=True)) == ids
    assert [e.id for e in offered] == ids
    with pytest.raises(ValueError):
        log.publish_many([("", "tick", {}, "")])
    assert log.publish_many([]) == []


def test_sqlite_placeholder_conversions_are_remembered():
    if connection.vendor != "sqlite":
        pytest.skip("SQLite only")
    from django.db.backends.sqlite3.base import SQLiteCursorWrapper as DjangoCursor

    from ssechat.sqlite3 import base

    query = "SELECT %s, '%%s', %s WHERE 1 = %s"
    with connection.cursor() as cursor:
        cursor.execute(query, [1, 2, 1])
        assert cursor.fetchone() == (1, "%s", 2)
    assert (
        base._converted[query]
        == DjangoCursor.convert_query(None, query)
        == ("SELECT ?, '%s', ? WHERE 1 = ?")
    )
    with connection.cursor() as cursor:  # named parameters are not remembered
        cursor.execute("SELECT %(a)s", {"a": 5})
        assert cursor.fetchone() == (5,)
    assert "SELECT %(a)s" not in base._converted


@pytest.mark.django_db(transaction=True)
def test_log_bounds_and_only_row_in_plain_queries():
    """``log_bounds`` reads the pruned and the latest id in one query; ``only_row``
    reads a row by a unique key with no ORDER BY (not even the model's default)."""
    from django.test.utils import CaptureQueriesContext

    from ssechat.accounts.models import ApiToken
    from ssechat.streams.log import log_bounds
    from ssechat.streams.retention import prune_events
    from ssechat.streams.rows import only_row

    ids = [publish(f"bounds-{uuid.uuid4().hex}", "tick", {"n": n}) for n in range(5)]
    with CaptureQueriesContext(connection) as queries:
        pruned, latest = log_bounds()
    assert len(queries) == 1 and latest == ids[-1] and pruned < ids[0]
    prune_events(None, 2)  # keeps the last two
    assert log_bounds() == (ids[-3], ids[-1])

    assert ApiToken._meta.ordering  # a default ordering, which only_row must clear
    with CaptureQueriesContext(connection) as queries:
        assert only_row(ApiToken.objects.filter(pk=-1)) is None
        assert only_row(Event.objects.filter(pk=ids[-1])).pk == ids[-1]
    assert len(queries) == 2
    assert not any("ORDER BY" in q["sql"] for q in queries.captured_queries)


@pytest.mark.django_db(transaction=True)
def test_rows_update_saves_fields_as_save_does(make_user):
    """``rows.update`` is ``save(update_fields=...)`` in one plain UPDATE: the fields'
    own preparation (datetimes, nulls), the other columns untouched, and an error for
    a row that is not there."""
    from django.db import DatabaseError
    from django.test.utils import CaptureQueriesContext
    from django.utils import timezone

    from chat.models import Conversation, Message
    from ssechat.streams.rows import update

    conversation = Conversation.objects.create(owner=make_user(), title="before")
    message = Message.objects.create(conversation=conversation, role="user", content="kept")
    message.status, message.completed_at, message.prompt_tokens = "failed", timezone.now(), None
    message.content = "not saved"  # not among the fields
    with CaptureQueriesContext(connection) as queries:
        update(message, ["status", "completed_at", "prompt_tokens"], "default")
    assert len(queries) == 1 and queries[0]["sql"].startswith("UPDATE")
    stored = Message.objects.get(pk=message.pk)
    assert (stored.status, stored.completed_at, stored.content) == (
        "failed", message.completed_at, "kept",
    )  # fmt: skip
    gone = Message(pk=2**40, conversation=conversation, role="user")
    with pytest.raises(DatabaseError):
        update(gone, ["content"], "default")
