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
