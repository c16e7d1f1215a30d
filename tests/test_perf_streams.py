"""The lean parts of the streaming core: mailbox, timer wheel, direct writes, one send per wake-up.

These drive a Hub, an EventStream and ASGIHandler.stream() with a fake ASGI
server on the test's own event loop; no database and no broker are needed
(a live stream without a resume id reads nothing stored).
"""

import asyncio
import gc

import pytest
from django.test import override_settings

from ssechat.streams.handler import ASGIHandler
from ssechat.streams.hub import (
    CLOSE,
    KEEPALIVE_SIGNAL,
    OFFER_COALESCE,
    OFFER_GAP_WAIT,
    OVERFLOW,
    Hub,
    StoredEvent,
)
from ssechat.streams.response import EventStreamResponse
from ssechat.streams.stream import END, LIVE, PENDING, EventStream


def make_hub(**overrides) -> Hub:
    settings = {
        "SSECHAT_KEEPALIVE_SECONDS": 15.0,
        "SSECHAT_STREAM_MAX_SECONDS": 3600.0,
        "SSECHAT_SUBSCRIBER_QUEUE": 1000,
        **overrides,
    }
    with override_settings(**settings):
        hub = Hub()
    hub._reset_for_loop(asyncio.get_running_loop())
    return hub


def event(n: int, channel: str = "c") -> StoredEvent:
    return StoredEvent(n, channel, "", "note", f'{{"n": {n}}}')


def live_stream(hub: Hub, channels=("c",)) -> EventStream:
    stream = EventStream(channels)
    stream.connection = hub.open(stream.channels)
    return stream


class FakeServer:
    """An ASGI server's send/receive; ``paused`` makes send wait like flow control."""

    ssechat_steppable = True  # plain coroutines awaiting futures, like uvicorn's

    def __init__(self) -> None:
        self.messages: list[dict] = []
        self.disconnect = asyncio.Event()
        self.writable = asyncio.Event()
        self.writable.set()
        self.sends = 0

    async def send(self, message: dict) -> None:
        self.sends += 1
        if not self.writable.is_set():
            await self.writable.wait()
        self.messages.append(dict(message))

    async def receive(self) -> dict:
        await self.disconnect.wait()
        return {"type": "http.disconnect"}

    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages[1:])


async def settle(rounds: int = 5) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


# -- the mailbox ---------------------------------------------------------------------


async def test_an_idle_or_keeping_up_mailbox_makes_no_deque():
    hub = make_hub()
    conn = hub.open(("c",))
    assert conn.take() is None
    hub.dispatch([event(1)])
    assert conn._rest is None  # one waiting item lives in a slot
    assert conn.take().id == 1
    hub.dispatch([event(2), event(3)])
    assert conn._rest is not None  # a second one queues behind it
    assert [conn.take().id, conn.take().id, conn.take()] == [2, 3, None]


async def test_a_full_mailbox_overflows_and_closing_still_ends():
    hub = make_hub(SSECHAT_SUBSCRIBER_QUEUE=3)
    conn = hub.open(("c",))
    hub.dispatch([event(1), event(2), event(3)])  # three fit
    hub.dispatch([event(4)])  # the fourth does not: overflow
    assert conn.take() is OVERFLOW
    assert conn.take() is None
    hub.dispatch([event(5)])
    conn.close("test")
    assert conn.take().id == 5
    assert conn.take() is CLOSE
    assert conn.take() is CLOSE


async def test_get_with_a_timeout_still_works():
    hub = make_hub()
    conn = hub.open(())
    assert await conn.get(timeout=0.01) is None
    asyncio.get_running_loop().call_soon(conn.put, KEEPALIVE_SIGNAL)
    assert await conn.get(timeout=1) is KEEPALIVE_SIGNAL


# -- one timer wheel per hub -------------------------------------------------------


async def test_keepalives_come_only_after_the_silence_and_no_timer_per_connection():
    hub = make_hub(SSECHAT_KEEPALIVE_SECONDS=0.2)
    assert hub.tick == pytest.approx(0.05)
    conns = [hub.open(("c",)) for _ in range(50)]
    assert not any(hasattr(c, "_timer") for c in conns)
    assert hub._sweeper is not None  # the one timer
    await asyncio.sleep(0.12)
    assert all(c.take() is None for c in conns)  # less than 0.2 s of silence
    conns[0].wrote()  # a write postpones its keep-alive
    await asyncio.sleep(0.2)
    assert all(c.take() is KEEPALIVE_SIGNAL for c in conns[1:])
    assert conns[0].take() is None
    await asyncio.sleep(0.2)
    assert conns[0].take() is KEEPALIVE_SIGNAL
    for c in conns:
        hub.release(c)
    await asyncio.sleep(0.5)
    assert hub._wheel == {} and hub._sweeper is None  # no connections, no timer


async def test_max_lifetime_closes_through_the_wheel():
    hub = make_hub(SSECHAT_KEEPALIVE_SECONDS=0, SSECHAT_STREAM_MAX_SECONDS=0.2)
    conn = hub.open(("c",))
    await asyncio.sleep(0.1)
    assert not conn.closed
    await asyncio.sleep(0.25)
    assert conn.closed and conn.close_reason == "max_lifetime"
    assert conn.take() is CLOSE


# -- EventStream.poll / wait --------------------------------------------------------


async def test_poll_hands_out_live_events_in_order_without_repeats():
    hub = make_hub()
    stream = live_stream(hub)
    assert stream.poll() is PENDING  # not started
    await stream.wait()  # start: no resume id, nothing stored to read
    while (item := stream.poll()) is PENDING:
        await stream.wait()
    assert item is LIVE
    hub.dispatch([event(1), event(2)])
    hub.dispatch([event(2)])  # a repeat is dropped
    hub.dispatch([event(3)])
    assert [stream.poll().id for _ in range(3)] == [1, 2, 3]
    assert stream.poll() is PENDING
    assert stream.position == 3 and stream.sent == 3
    stream.connection.close("test")
    assert stream.poll() is PENDING
    await stream.wait()
    assert stream.poll() is END


async def test_async_iteration_still_works_and_releases():
    hub = make_hub()
    stream = live_stream(hub)
    seen = []

    async def read():
        async for item in stream:
            seen.append(item)

    task = asyncio.create_task(read())
    await settle()
    hub.dispatch([event(1)])
    await settle()
    stream.connection.close("test")
    await asyncio.wait_for(task, 2)
    assert seen[0] is LIVE and seen[1].id == 1
    assert hub.connections == set()


# -- ASGIHandler.stream -------------------------------------------------------------


async def start_stream(hub: Hub, server: FakeServer):
    stream = live_stream(hub)
    response = EventStreamResponse(stream, stream=stream, retry_ms=1000)
    start = response.start_message()
    task = asyncio.create_task(
        ASGIHandler().stream(start, response.frames, server.receive, server.send)
    )
    await settle(10)
    return stream, start, task


async def test_stream_sends_the_start_then_drops_it():
    hub, server = make_hub(), FakeServer()
    _stream, start, task = await start_stream(hub, server)
    assert server.messages[0]["type"] == "http.response.start"
    assert server.messages[0]["status"] == 200
    assert start == {}  # the header list is not kept for the stream's life
    assert server.body() == b"retry: 1000\n\n"
    server.disconnect.set()
    await asyncio.wait_for(task, 2)
    assert hub.connections == set()


async def test_live_events_are_written_by_the_hub_without_waking_the_task():
    hub, server = make_hub(), FakeServer()
    stream, _, task = await start_stream(hub, server)
    sends = server.sends
    hub.dispatch([event(1)])
    # Written during dispatch itself: no event-loop turn happened.
    assert server.sends == sends + 1
    assert server.messages[-1]["body"] == event(1).frame
    hub.dispatch([event(2), event(3)])  # a batch of events: one write for all of it
    assert server.sends == sends + 2
    assert server.messages[-1]["body"] == event(2).frame + event(3).frame
    hub.dispatch([event(4)])
    assert server.sends == sends + 3
    assert server.messages[-1]["body"] == event(4).frame
    stream.connection.close("test")
    await asyncio.wait_for(task, 2)
    assert server.messages[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    assert hub.connections == set()


async def test_a_big_batch_is_written_in_slices_and_never_overflows_a_stream_that_keeps_up():
    hub, server = make_hub(SSECHAT_SUBSCRIBER_QUEUE=8), FakeServer()  # wakes every 2 events
    stream, _, task = await start_stream(hub, server)
    sends = server.sends
    hub.dispatch([event(n) for n in range(1, 51)])  # what one read of the log can bring
    assert server.sends == sends + 25
    assert server.body() == b"retry: 1000\n\n" + b"".join(event(n).frame for n in range(1, 51))
    assert stream.position == 50 and not stream.connection.overflowed
    stream.connection.close("test")
    await asyncio.wait_for(task, 2)


async def test_a_slow_client_gets_everything_in_order_through_the_task():
    hub, server = make_hub(), FakeServer()
    _stream, _, task = await start_stream(hub, server)
    server.writable.clear()  # the client stops reading: the next write waits
    hub.dispatch([event(1)])
    hub.dispatch([event(2)])
    hub.dispatch([event(3), event(4)])
    await settle()
    server.writable.set()
    await settle(10)
    body = server.body()
    assert body == b"retry: 1000\n\n" + b"".join(event(n).frame for n in (1, 2, 3, 4))
    # The write left waiting, then everything that queued meanwhile as one write.
    assert [m["body"] for m in server.messages[-2:]] == [
        event(1).frame,
        event(2).frame + event(3).frame + event(4).frame,
    ]
    hub.dispatch([event(5)])  # armed again afterwards
    assert server.body().endswith(event(5).frame)
    server.disconnect.set()
    await asyncio.wait_for(task, 2)


async def test_disconnect_ends_the_stream_without_a_listener_task():
    hub, server = make_hub(), FakeServer()
    tasks_before = len(asyncio.all_tasks())
    streams = [await start_stream(hub, server) for _ in range(5)]
    # One task per stream (its own); the disconnect listener is no task.
    assert len(asyncio.all_tasks()) == tasks_before + 5
    server.disconnect.set()
    await asyncio.wait_for(asyncio.gather(*(t for _, _, t in streams)), 2)
    assert hub.connections == set()
    gc.collect()
    assert server.disconnect._waiters == type(server.disconnect._waiters)()


async def test_shutdown_and_keepalives_reach_a_direct_stream():
    hub, server = make_hub(SSECHAT_KEEPALIVE_SECONDS=0.1), FakeServer()
    stream, _, task = await start_stream(hub, server)
    await asyncio.sleep(0.35)
    assert server.body().count(b": ping\n\n") >= 2
    hub.close_all("shutdown")
    await asyncio.wait_for(task, 2)
    assert stream.connection.close_reason == "shutdown"


async def test_a_server_not_known_to_allow_stepping_gets_every_write_from_the_task():
    """send/receive of a server we do not know (here: plain functions) are never driven
    from the hub's dispatch or from callbacks: the stream's task writes, a task listens."""
    hub, server = make_hub(), FakeServer()

    async def send(message):
        await server.send(message)

    async def receive():
        return await server.receive()

    stream = live_stream(hub)
    response = EventStreamResponse(stream, stream=stream, retry_ms=1000)
    tasks_before = len(asyncio.all_tasks())
    task = asyncio.create_task(
        ASGIHandler().stream(response.start_message(), response.frames, receive, send)
    )
    await settle(10)
    assert len(asyncio.all_tasks()) == tasks_before + 2  # the stream's task and its listener
    sends = server.sends
    hub.dispatch([event(1)])
    assert server.sends == sends  # not written during dispatch
    await settle(10)
    hub.dispatch([event(2), event(3)])
    await settle(10)
    assert server.body() == b"retry: 1000\n\n" + b"".join(event(n).frame for n in (1, 2, 3))
    server.disconnect.set()
    await asyncio.wait_for(task, 2)
    await settle()
    assert hub.connections == set()
    assert len(asyncio.all_tasks()) == tasks_before


def test_uvicorns_send_and_receive_may_be_stepped():
    from uvicorn.protocols.http import h11_impl, httptools_impl

    from ssechat.streams.handler import _steppable

    for module in (httptools_impl, h11_impl):
        cycle = object.__new__(module.RequestResponseCycle)
        assert _steppable(cycle.send) and _steppable(cycle.receive)
    assert not _steppable(lambda message: None)
    assert _steppable(FakeServer().send)


# -- events committed here: handed to the hub without a read-back ------------------------


class FakeBroker:
    def __init__(self) -> None:
        self.wakes = 0

    def wake(self) -> None:
        self.wakes += 1

    def abandon(self) -> None:
        pass


async def hub_with_broker() -> tuple[Hub, FakeBroker, EventStream]:
    hub = make_hub()
    hub.broker = broker = FakeBroker()
    hub.advance(10)
    stream = live_stream(hub)
    await stream.wait()
    while (item := stream.poll()) is PENDING:
        await stream.wait()
    assert item is LIVE
    return hub, broker, stream


def drain(stream: EventStream) -> list[int]:
    ids = []
    while (item := stream.poll()) is not PENDING:
        ids.append(item.id)
    return ids


async def test_the_next_committed_event_is_handed_out_without_waking_the_broker():
    hub, broker, stream = await hub_with_broker()
    hub.offer(event(12))  # committed second, offered first: one wake-up of the loop for both
    hub.offer(event(11))
    await settle()
    assert drain(stream) == [11, 12]
    assert hub.horizon == 12 and hub.handed_over == 2 and broker.wakes == 0


async def test_an_offer_after_a_gap_waits_for_the_missing_one():
    hub, broker, stream = await hub_with_broker()
    hub.offer(event(12))  # 11 is another thread's commit, its offer on the way
    await settle()
    assert drain(stream) == [] and hub.horizon == 10
    hub.offer(event(11))
    await settle()
    assert drain(stream) == [11, 12]
    assert hub.handed_over == 2 and broker.wakes == 0
    await asyncio.sleep(OFFER_GAP_WAIT * 2)
    assert broker.wakes == 0


async def test_a_gap_that_stays_wakes_the_broker_and_nothing_repeats():
    hub, broker, stream = await hub_with_broker()
    hub.offer(event(12))  # 11 belongs to another process
    await asyncio.sleep(OFFER_GAP_WAIT * 2)
    assert drain(stream) == [] and hub.horizon == 10 and broker.wakes == 1
    hub.dispatch([event(11), event(12)])  # what the broker reads
    hub.offer(event(11))  # a late offer of an event already read is dropped
    hub.offer(event(13))
    await settle()
    assert drain(stream) == [11, 12, 13]
    assert hub.horizon == 13 and broker.wakes == 1 and not hub._early


async def test_offers_right_after_a_hand_out_go_out_together_a_moment_later():
    hub, broker, stream = await hub_with_broker()
    hub.offer(event(11))
    await settle()
    assert drain(stream) == [11]  # a quiet stream of events is not delayed
    hub.offer(event(12))
    await settle()
    hub.offer(event(13))
    await settle()
    assert drain(stream) == []  # within OFFER_COALESCE of the last hand-out: they wait
    await asyncio.sleep(OFFER_COALESCE * 2)
    assert drain(stream) == [12, 13]
    await asyncio.sleep(OFFER_COALESCE * 2)
    hub.offer(event(14))
    await settle()
    assert drain(stream) == [14]
    assert broker.wakes == 0 and hub.handed_over == 4


async def test_offers_from_many_threads_arrive_once_and_in_order():
    import threading

    hub, broker, stream = await hub_with_broker()
    ids = iter(range(11, 411))
    lock = threading.Lock()

    def commit_some() -> None:
        for _ in range(100):
            with lock:  # ids are taken in commit order, as SQLite's write lock does
                hub.offer(event(next(ids)))

    threads = [threading.Thread(target=commit_some) for _ in range(4)]
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        await asyncio.sleep(0.001)
    # The last offers may wait out the hand-out's coalescing window (a timer, not a
    # turn of the loop): collect until all are there, or a bound far past the window.
    received: list[int] = []
    deadline = asyncio.get_running_loop().time() + 5
    while len(received) < 400 and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.002)
        received += drain(stream)
    assert received == list(range(11, 411))
    assert hub.handed_over == 400 and broker.wakes == 0


async def test_nothing_is_offered_before_the_broker_runs_and_a_new_loop_starts_clean():
    hub = make_hub()
    hub.offer(event(1))  # no broker yet: the broker's first read finds it
    assert not hub._offered
    hub.broker = FakeBroker()
    hub._offer_scheduled = True  # as if an offer's call was lost with an old loop
    hub._reset_for_loop(asyncio.get_running_loop())
    assert hub._offer_scheduled is False


async def test_a_stream_given_the_logs_bounds_checks_a_resume_id_without_a_query(monkeypatch):
    from ssechat.streams import stream as stream_module
    from ssechat.streams.log import log_bounds

    async def no_query(fn, *args, **kwargs):
        raise AssertionError(f"{fn.__name__} was read again")

    monkeypatch.setattr(stream_module, "run_db", no_query)
    pruned = EventStream(["c"], "5", bounds=(10, 20))
    after, reset = await pruned._start_after(30)
    assert after == 30 and reset.reason == "events after this id are no longer stored"
    kept = EventStream(["c"], "15", bounds=(10, 20))
    assert await kept._start_after(30) == (15, None)
    # The bounds serve once: a later check (a catch-up) reads them afresh.
    calls = []

    async def query(fn, *args, **kwargs):
        calls.append(fn)
        return (0, 100)

    monkeypatch.setattr(stream_module, "run_db", query)
    assert await kept._start_after(30) == (15, None) and calls == [log_bounds]


# -- a channel's events kept in memory: a stream opening here reads no log ---------------


async def test_a_remembered_channel_gives_a_new_stream_its_backlog_without_a_query(monkeypatch):
    from ssechat.streams import stream as stream_module

    async def no_query(fn, *args, **kwargs):
        raise AssertionError(f"{fn.__name__} was read")

    monkeypatch.setattr(stream_module, "run_db", no_query)
    hub = make_hub()
    hub.remember("a", 10)  # the hub does not run: its broker would not dispatch everything
    assert not hub._remembered
    hub.broker = FakeBroker()
    hub._ready.set()
    hub.advance(10)
    hub.remember("a", 10)
    hub.dispatch([event(11, "a"), event(12, "b"), event(13, "a")])
    stream = EventStream(["a"], "10")
    stream.connection = hub.open(stream.channels)
    hub.dispatch([event(14, "a")])  # in its mailbox and in memory: sent once

    async def take(count: int) -> list:
        items = []
        while len(items) < count:
            item = stream.poll()
            if item is PENDING:
                await stream.wait()
            else:
                items.append(item if item is LIVE else item.id)
        return items

    assert await take(4) == [11, 13, 14, LIVE] and hub.recalled == 1
    hub.dispatch([event(15, "a"), event(16, "b")])
    assert await take(1) == [15] and stream.poll() is PENDING
    # What memory cannot answer goes to the log: an id before what is kept, one past
    # the horizon, several channels, a channel not kept (or forgotten).
    assert hub.recall(("a",), 9) is None and hub.recall(("a",), 17) is None
    assert hub.recall(("a", "b"), 12) is None and hub.recall(("b",), 12) is None
    assert [e.id for e in hub.recall(("a",), 11)] == [13, 14, 15]
    hub.forget("a")
    assert hub.recall(("a",), 11) is None
    stream.close()


async def test_remembered_channels_are_a_bounded_cache_dropped_with_their_broker(monkeypatch):
    from ssechat.streams import hub as hub_module

    monkeypatch.setattr(hub_module, "MAX_REMEMBERED", 3)
    hub = make_hub()
    hub.broker = FakeBroker()
    hub._ready.set()
    for n in range(5):
        hub.remember(f"c{n}", 0)
    assert list(hub._remembered) == ["c2", "c3", "c4"]  # the oldest went
    hub._reset_for_loop(asyncio.get_running_loop())  # a new broker: it may miss events
    assert not hub._remembered
