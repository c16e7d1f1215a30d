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
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from django.conf import settings
from django.db import InterfaceError, OperationalError, connections

logger = logging.getLogger("ssechat.streams")

T = TypeVar("T")

_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def _get_executor() -> ThreadPoolExecutor:
    global _executor
    if _executor is None:
        with _executor_lock:
            if _executor is None:
                _executor = ThreadPoolExecutor(
                    max_workers=max(1, settings.SSECHAT_STREAM_DB_THREADS),
                    thread_name_prefix="ssechat-db",
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
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(
        _get_executor(), functools.partial(_call_with_retry, fn, args, kwargs)
    )


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
