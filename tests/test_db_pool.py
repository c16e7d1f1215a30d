"""The stream database pool: stream work before requests' work, and no one starved."""

from __future__ import annotations

import threading

import pytest

from ssechat.streams import db
from ssechat.streams.db import DatabasePool

WAIT = 10  # seconds any step here may take at most before the test fails


@pytest.fixture
def pool():
    made: list[DatabasePool] = []

    def make(workers: int) -> DatabasePool:
        made.append(DatabasePool(workers, name="test-db"))
        return made[-1]

    yield make
    for p in made:
        p.shutdown(wait=True, cancel_futures=True)


def blocker(pool: DatabasePool, *, request: bool) -> tuple[threading.Event, threading.Event]:
    """A call that holds a thread until released: (started, release)."""
    started, release = threading.Event(), threading.Event()

    def hold():
        started.set()
        assert release.wait(WAIT)

    pool.submit_call(hold, request=request)
    assert started.wait(WAIT)
    return started, release


def test_stream_work_goes_before_requests_that_came_first(pool):
    p = pool(1)
    order: list[str] = []
    _, release = blocker(p, request=False)  # the one thread is busy
    futures = [
        p.submit_call(lambda n=n: order.append(f"request {n}"), request=True) for n in (1, 2)
    ]
    futures.append(p.submit(order.append, "stream"))
    release.set()
    for future in futures:
        future.result(WAIT)
    assert order == ["stream", "request 1", "request 2"]


def test_requests_never_hold_every_thread(pool):
    p = pool(2)
    _, release = blocker(p, request=True)
    # A second request waits (one thread is kept for streams), a stream call does not.
    second = p.submit_call(lambda: "request", request=True)
    assert p.submit(lambda: "stream").result(WAIT) == "stream"
    assert not second.done()
    release.set()
    assert second.result(WAIT) == "request"


def test_a_request_overdue_goes_before_later_stream_work(pool, monkeypatch):
    monkeypatch.setattr(db, "REQUEST_DELAY", 0.0)
    p = pool(1)
    order: list[str] = []
    _, release = blocker(p, request=False)
    futures = [p.submit_call(lambda: order.append("request"), request=True)]
    futures.append(p.submit(order.append, "stream"))
    release.set()
    for future in futures:
        future.result(WAIT)
    assert order == ["request", "stream"]


def test_errors_cancels_and_shutdown(pool):
    p = pool(1)

    def fail():
        raise ValueError("no")

    with pytest.raises(ValueError, match="no"):
        p.submit(fail).result(WAIT)
    _, release = blocker(p, request=False)
    cancelled = p.submit(lambda: "never")
    assert cancelled.cancel()
    queued = p.submit(lambda: "queued")
    release.set()
    assert queued.result(WAIT) == "queued" and cancelled.cancelled()
    # Shutting down runs what is queued, then refuses more.
    _, release = blocker(p, request=False)
    last = p.submit_call(lambda: "last", request=True)
    release.set()
    p.shutdown(wait=True)
    assert last.result(0) == "last"
    with pytest.raises(RuntimeError):
        p.submit(lambda: None)


async def test_run_db_and_run_db_request_return_results():
    assert await db.run_db(lambda a, b=0: a + b, 1, b=2) == 3
    assert await db.run_db_request(lambda a: a * 2, 21) == 42


def test_as_many_calls_at_once_as_threads(pool):
    p = pool(4)
    p.submit(lambda: None).result(WAIT)  # one thread started and idle again
    barrier = threading.Barrier(4)
    futures = [p.submit(barrier.wait, WAIT) for _ in range(4)]  # all four at once
    assert sorted(f.result(WAIT) for f in futures) == [0, 1, 2, 3]


async def test_run_db_raises_the_calls_exception_and_skips_a_call_no_one_awaits():
    import asyncio

    with pytest.raises(ZeroDivisionError):
        await db.run_db(lambda: 1 / 0)
    hold, release = threading.Event(), threading.Event()
    ran: list[str] = []
    size = db._get_executor()._max_workers
    # Every thread busy, then a call whose caller stops waiting before it starts.
    holders = [
        asyncio.ensure_future(db.run_db(lambda: (hold.set(), release.wait(WAIT))))
        for _ in range(size)
    ]
    assert await asyncio.to_thread(hold.wait, WAIT)
    abandoned = asyncio.ensure_future(db.run_db(ran.append, "abandoned"))
    await asyncio.sleep(0.05)
    abandoned.cancel()
    release.set()
    await asyncio.gather(*holders)
    assert await db.run_db(ran.append, "after") is None
    assert ran == ["after"]


async def test_batched_calls_share_pool_calls_and_keep_their_own_outcomes():
    import asyncio

    threads: list[int] = []

    def call(n: int) -> int:
        threads.append(threading.get_ident())
        if n == 13:
            raise ValueError("thirteen")
        return n * 2

    count = db.MAX_BATCH + 40
    results = await asyncio.gather(
        *(db.run_db_batched(call, n) for n in range(count)), return_exceptions=True
    )
    assert [r for n, r in enumerate(results) if n != 13] == [n * 2 for n in range(count) if n != 13]
    assert isinstance(results[13], ValueError)
    # All made in one loop step: the first batch holds MAX_BATCH calls, the rest the next.
    first, rest = threads[: db.MAX_BATCH], threads[db.MAX_BATCH :]
    assert len(set(first)) == 1 and len(set(rest)) == 1


async def test_a_batched_call_whose_caller_left_is_not_made():
    import asyncio

    started, release = threading.Event(), threading.Event()
    made: list[int] = []
    # A batch in flight, held on its thread: the next calls wait for it, together.
    first = asyncio.ensure_future(db.run_db_batched(lambda: (started.set(), release.wait(WAIT))))
    assert await asyncio.to_thread(started.wait, WAIT)
    calls = [asyncio.ensure_future(db.run_db_batched(made.append, n)) for n in range(3)]
    await asyncio.sleep(0.01)
    calls[1].cancel()
    release.set()
    await first
    await asyncio.gather(*calls, return_exceptions=True)
    assert made == [0, 2]


async def test_a_batch_stops_calling_the_database_once_it_is_down():
    import asyncio

    from django.db import OperationalError

    started, release = threading.Event(), threading.Event()
    calls: list[int] = []

    def call(n: int) -> int:
        calls.append(n)
        if n == 1:
            raise OperationalError("server closed the connection")
        return n

    first = asyncio.ensure_future(db.run_db_batched(lambda: (started.set(), release.wait(WAIT))))
    assert await asyncio.to_thread(started.wait, WAIT)
    batch = [asyncio.ensure_future(db.run_db_batched(call, n)) for n in range(4)]
    await asyncio.sleep(0.01)
    release.set()
    await first
    results = await asyncio.gather(*batch, return_exceptions=True)
    assert results[0] == 0
    assert all(isinstance(r, OperationalError) for r in results[1:])
    assert calls == [0, 1, 1]  # the failed call retried once on a new connection, no others
