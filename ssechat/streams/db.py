"""Database work for streams, on a small pool of threads of its own.

Open streams never hold a database connection while idle, and none of them
holds a thread: the few queries a stream makes (its backlog on resume) run
here, on ``SSECHAT_STREAM_DB_THREADS`` threads that keep one connection each.
So connections grow with processes, not with clients.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

from django.conf import settings
from django.db import InterfaceError, OperationalError, connections

logger = logging.getLogger("ssechat.streams")

T = TypeVar("T")

# Work that waits behind stream work (see run_db_request): how much later than its
# arrival it counts as due. Under a burst of requests (100 chat messages at once) the
# streams opened meanwhile are served first; a request never waits longer than this
# beyond what it would have waited in plain arrival order.
REQUEST_DELAY = 1.0
# Threads that may run requests' work at once. One: on SQLite requests take turns on
# the write lock anyway, and each one more running at once is one more thread taking
# the GIL from the streams and the chat's writer.
REQUEST_THREADS = 1

_Item = tuple[float, Future, Callable[[], Any]]


class DatabasePool(Executor):
    """Threads for database work, each keeping its connection, that take stream work
    before requests' work.

    A ``ThreadPoolExecutor`` serves in arrival order: a stream opened just after a
    burst of 100 chat messages waited until every message was stored, and every
    token of the answers that had started meanwhile with it. Here a waiting call
    is due when it arrives, a request's ``REQUEST_DELAY`` later, and the call due
    first goes first; requests' work holds ``REQUEST_THREADS`` threads at most, and
    never all of them when there are two or more, so stream work finds a thread
    without waiting for a request to end.
    """

    def __init__(self, max_workers: int, name: str) -> None:
        self._max_workers = max_workers
        self._name = name
        self._streams: deque[_Item] = deque()  # each deque is in order of due time
        self._requests: deque[_Item] = deque()
        self._request_threads = max(1, min(max_workers - 1, REQUEST_THREADS))
        self._running_requests = 0
        self._cond = threading.Condition(threading.Lock())
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._shutdown = False
        # As concurrent.futures does: before the interpreter joins its threads, the
        # workers finish what is queued and return (an idle one would wait for ever).
        threading._register_atexit(self.shutdown)  # type: ignore[attr-defined]

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future:
        return self.submit_call(functools.partial(fn, *args, **kwargs))

    def submit_call(self, call: Callable[[], T], *, request: bool = False) -> Future:
        """Run ``call`` on a thread (``request``: as a request's work)."""
        future: Future = Future()
        with self._cond:
            if self._shutdown:
                raise RuntimeError("the database pool is shut down")
            if request:
                self._requests.append((time.monotonic() + REQUEST_DELAY, future, call))
            else:
                self._streams.append((time.monotonic(), future, call))
            if self._idle:
                self._cond.notify()
            # A worker notified but not yet awake still counts as idle, and takes one of
            # the waiting calls: a thread more only when they outnumber the idle ones.
            waiting = len(self._streams) + len(self._requests)
            if waiting > self._idle and len(self._threads) < self._max_workers:
                thread = threading.Thread(
                    target=self._work, name=f"{self._name}_{len(self._threads)}"
                )
                self._threads.append(thread)
                thread.start()
        return future

    def _next(self) -> tuple[_Item, bool] | None:
        """The call to run now and whether it is a request's (under the lock)."""
        streams, requests = self._streams, self._requests
        request_ok = requests and self._running_requests < self._request_threads
        if streams and not (request_ok and requests[0][0] < streams[0][0]):
            return streams.popleft(), False
        if request_ok:
            return requests.popleft(), True
        return None

    def _work(self) -> None:
        while True:
            with self._cond:
                while (found := self._next()) is None:
                    if self._shutdown and not self._streams and not self._requests:
                        return
                    self._idle += 1
                    try:
                        self._cond.wait()
                    finally:
                        self._idle -= 1
                (_, future, call), request = found
                if request:
                    self._running_requests += 1
            try:
                if future.set_running_or_notify_cancel():
                    try:
                        result = call()
                    except BaseException as exc:
                        future.set_exception(exc)
                        del exc
                    else:
                        future.set_result(result)
            finally:
                del future, call
                if request:
                    with self._cond:
                        self._running_requests -= 1
                        if self._requests:
                            self._cond.notify()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._cond:
            self._shutdown = True
            if cancel_futures:
                for _, future, _ in (*self._streams, *self._requests):
                    future.cancel()
                self._streams.clear()
                self._requests.clear()
            self._cond.notify_all()
            threads = list(self._threads)
        if wait:
            for thread in threads:
                if thread is not threading.current_thread():
                    thread.join()


_executor: DatabasePool | None = None
_executor_lock = threading.Lock()


def _get_executor() -> DatabasePool:
    global _executor
    if _executor is None:
        with _executor_lock:
            if _executor is None:
                _executor = DatabasePool(
                    max(1, settings.SSECHAT_STREAM_DB_THREADS), name="ssechat-db"
                )
    return _executor


def _close_broken_connections() -> None:
    for conn in connections.all(initialized_only=True):
        try:
            conn.close()
        except Exception:
            logger.debug("closing a broken connection failed", exc_info=True)


def _call_with_retry(fn: Callable[..., T], args: tuple, kwargs: dict) -> T:
    try:
        return fn(*args, **kwargs)
    except (OperationalError, InterfaceError):
        # The kept connection may have died (database restarted): retry once on a new one.
        _close_broken_connections()
        return fn(*args, **kwargs)


async def run_db(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """Run a sync ORM function on the stream database pool and return its result.

    Each call is its own transaction (autocommit) unless ``fn`` opens one.
    """
    future = _get_executor().submit_call(functools.partial(_call_with_retry, fn, args, kwargs))
    return await asyncio.wrap_future(future)


async def run_db_request(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """:func:`run_db` for the work of an API request (posting a chat message): it
    waits behind the work of streams (opening, catching up) that arrived up to
    ``REQUEST_DELAY`` later, and runs on ``REQUEST_THREADS`` threads at most."""
    future = _get_executor().submit_call(
        functools.partial(_call_with_retry, fn, args, kwargs), request=True
    )
    return await asyncio.wrap_future(future)


_background: set[asyncio.Task] = set()


def spawn(coro: Coroutine[Any, Any, Any], *, name: str | None = None) -> asyncio.Task:
    """Start a background task that outlives the request that started it.

    It runs in a fresh context: it must not inherit the request's thread-sensitive
    context (which ends with the request), and a reference is kept so it is not
    garbage-collected mid-run. Use :func:`run_db` for its database work.
    """
    task = asyncio.get_running_loop().create_task(coro, name=name, context=contextvars.Context())
    _background.add(task)
    task.add_done_callback(_background.discard)
    return task


def background_tasks() -> set[asyncio.Task]:
    return set(_background)
