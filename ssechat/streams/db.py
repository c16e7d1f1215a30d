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

_Item = tuple[float, Any, Callable[[], Any]]  # (due, Future or _LoopFuture, call)


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
        self.enqueue(future, call, request)
        return future

    def enqueue(self, sink: Any, call: Callable[[], Any], request: bool = False) -> None:
        """Queue ``call``; a worker settles ``sink`` (a ``concurrent.futures.Future``, or
        anything with its ``set_running_or_notify_cancel``/``set_result``/``set_exception``)."""
        with self._cond:
            if self._shutdown:
                raise RuntimeError("the database pool is shut down")
            if request:
                self._requests.append((time.monotonic() + REQUEST_DELAY, sink, call))
            else:
                self._streams.append((time.monotonic(), sink, call))
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


class _LoopFuture:
    """What a worker settles for a call awaited on an event loop: the loop's own
    future, set from the worker with one ``call_soon_threadsafe``.

    It stands where a ``concurrent.futures.Future`` would (the three methods a
    worker calls), without one: that future, its lock and condition, and
    ``asyncio.wrap_future``'s chaining cost more than a short query on every
    stream connect.
    """

    __slots__ = ("future", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.future = loop.create_future()

    def set_running_or_notify_cancel(self) -> bool:
        return not self.future.cancelled()  # the caller stopped waiting: skip the call

    def set_result(self, result: Any) -> None:
        self._settle(result, None)

    def set_exception(self, exc: BaseException) -> None:
        self._settle(None, exc)

    def cancel(self) -> None:  # the pool shut down with this call still queued
        try:
            self.loop.call_soon_threadsafe(self.future.cancel)
        except RuntimeError:
            pass

    def _settle(self, result: Any, exc: BaseException | None) -> None:
        try:
            self.loop.call_soon_threadsafe(_settle, self.future, result, exc)
        except RuntimeError:  # the loop is closed: nobody is waiting
            pass


def _settle(future: asyncio.Future, result: Any, exc: BaseException | None) -> None:
    if future.cancelled():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


def _submit_awaitable(call: Callable[[], T], request: bool) -> asyncio.Future:
    sink = _LoopFuture(asyncio.get_running_loop())
    _get_executor().enqueue(sink, call, request)
    return sink.future


async def run_db(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """Run a sync ORM function on the stream database pool and return its result.

    Each call is its own transaction (autocommit) unless ``fn`` opens one.
    """
    return await _submit_awaitable(functools.partial(_call_with_retry, fn, args, kwargs), False)


async def run_db_request(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """:func:`run_db` for the work of an API request (posting a chat message): it
    waits behind the work of streams (opening, catching up) that arrived up to
    ``REQUEST_DELAY`` later, and runs on ``REQUEST_THREADS`` threads at most."""
    return await _submit_awaitable(functools.partial(_call_with_retry, fn, args, kwargs), True)


# Most calls a batch of run_db_batched takes (a connect storm is served in batches of
# this size or smaller; each waits for the batch before it).
MAX_BATCH = 128


class _CallBatcher:
    """Calls that arrive while a batch is with the pool go together in the next one.

    One pool call runs the whole batch on one thread, and one wake-up of the
    event loop settles all its futures. Under a connect storm this replaces a
    thread hop (a queue item, a worker wake-up, a loop wake-up) per stream with
    one per batch; with no batch in flight a call goes at the end of the loop's
    current step, so a lone call waits for nothing.
    """

    def __init__(self) -> None:
        self.waiting: list[tuple[Callable[[], Any], asyncio.Future]] = []
        self.in_flight = False

    def call(self, call: Callable[[], Any]) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.waiting.append((call, future))
        if not self.in_flight:
            self.in_flight = True
            loop.call_soon(self._send)  # calls made in this same loop step join it
        return future

    def _send(self) -> None:
        batch, self.waiting = self.waiting[:MAX_BATCH], self.waiting[MAX_BATCH:]
        batch = [(call, future) for call, future in batch if not future.cancelled()]
        if not batch:
            self._next()
            return
        try:
            done = _submit_awaitable(functools.partial(_run_batch, batch), False)
        except RuntimeError as exc:  # the pool is shut down
            for _, future in batch:
                if not future.cancelled():
                    future.set_exception(exc)
            self._next()
            return
        done.add_done_callback(functools.partial(self._settle, [f for _, f in batch]))

    def _settle(self, futures: list[asyncio.Future], done: asyncio.Future) -> None:
        if done.cancelled():  # the pool shut down before the batch ran
            for future in futures:
                future.cancel()
            self._next()
            return
        if done.exception() is not None:
            outcomes = [(None, done.exception())] * len(futures)
        else:
            outcomes = done.result()
        for future, (result, exc) in zip(futures, outcomes, strict=True):
            _settle(future, result, exc)
        self._next()

    def _next(self) -> None:
        if self.waiting:
            asyncio.get_running_loop().call_soon(self._send)
        else:
            self.in_flight = False


def _run_batch(
    batch: list[tuple[Callable[[], Any], asyncio.Future]],
) -> list[tuple[Any, BaseException | None]]:
    outcomes: list[tuple[Any, BaseException | None]] = []
    down: BaseException | None = None
    for call, future in batch:
        if future.cancelled():  # its caller stopped waiting meanwhile (a flag read)
            outcomes.append((None, None))
        elif down is not None:
            # The database failed a call even on a new connection: the rest of the batch
            # fails at once rather than each waiting for its own failed connect, in turn.
            outcomes.append((None, down))
        else:
            try:
                outcomes.append((call(), None))
            except (OperationalError, InterfaceError) as exc:
                down = exc
                outcomes.append((None, exc))
            except Exception as exc:
                outcomes.append((None, exc))
    return outcomes


_batchers: dict[asyncio.AbstractEventLoop, _CallBatcher] = {}


async def run_db_batched(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """:func:`run_db` for short calls made by many requests at once (authenticating a
    stream's client): they run in batches, one pool call each (see _CallBatcher).

    Each call is still its own transaction (autocommit) unless ``fn`` opens one,
    and its exception is its own.
    """
    loop = asyncio.get_running_loop()
    batcher = _batchers.get(loop)
    if batcher is None:
        for old in [old for old in _batchers if old.is_closed()]:
            del _batchers[old]
        batcher = _batchers[loop] = _CallBatcher()
    return await batcher.call(functools.partial(_call_with_retry, fn, args, kwargs))


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
