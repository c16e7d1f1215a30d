"""Django's ASGI handler, with event streams served outside the request's thread.

Django runs each request in its own thread-sensitive context, and the first
sync call in it (the ``request_started`` receivers, any sync middleware)
starts an OS thread that lives until the response ends. For a stream open for
an hour that is an idle thread per client. This handler runs the middleware
and the view exactly as Django does, then, if the view returned an
:class:`EventStreamResponse`, finishes Django's request (``request_finished``:
the thread's database connection is released) and leaves the context before it
streams. An open stream then holds no thread and no database connection.

It also speaks the ASGI lifespan protocol: it starts the broker when the
server starts, and ends open streams as soon as the server is told to stop
(uvicorn otherwise waits for them for ever).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import signal
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.conf import settings
from django.core import signals
from django.core.exceptions import RequestAborted
from django.core.handlers.asgi import ASGIHandler as DjangoASGIHandler
from django.core.handlers.asgi import get_script_prefix
from django.urls import set_script_prefix

from ssechat.api import json_error
from ssechat.apilane import ApiLane, BodyTooLarge, read_body

from .db import spawn
from .fastlane import FastLane
from .hub import get_hub
from .response import EventStreamResponse

logger = logging.getLogger("ssechat.streams")

# Async callables run once when the server starts (e.g. mark answers of a dead worker failed).
STARTUP_HOOKS: list[Callable[[], Awaitable[None]]] = []
# Async callables run once when the server is told to stop, after open streams are ended
# and before the server exits (e.g. end this process's answers). At most SHUTDOWN_GRACE s.
SHUTDOWN_HOOKS: list[Callable[[], Awaitable[None]]] = []
SHUTDOWN_GRACE_SECONDS = 5.0


def on_startup(hook: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
    if hook not in STARTUP_HOOKS:
        STARTUP_HOOKS.append(hook)
    return hook


def on_shutdown(hook: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
    if hook not in SHUTDOWN_HOOKS:
        SHUTDOWN_HOOKS.append(hook)
    return hook


_shutdown_hooks_done: asyncio.Event | None = None


async def run_shutdown_hooks() -> None:
    """Run the shutdown hooks once per process (the signal or the lifespan, first wins)."""
    global _shutdown_hooks_done
    if _shutdown_hooks_done is not None:
        await _shutdown_hooks_done.wait()
        return
    _shutdown_hooks_done = asyncio.Event()
    try:
        for hook in SHUTDOWN_HOOKS:
            try:
                await asyncio.wait_for(hook(), SHUTDOWN_GRACE_SECONDS)
            except Exception:
                logger.exception("shutdown hook %r failed", hook)
    finally:
        _shutdown_hooks_done.set()


def _pass_on(previous, signum, frame) -> None:
    if callable(previous):
        previous(signum, frame)
    elif previous == signal.SIG_DFL:
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)


def install_shutdown_hook() -> None:
    """Chain onto SIGTERM/SIGINT: end open streams at once, run the shutdown hooks,
    then let the server stop (uvicorn exits by re-raising the signal, so anything
    that must happen before the process dies happens before it is passed on)."""
    if threading.current_thread() is not threading.main_thread():
        return
    loop = asyncio.get_running_loop()
    hub = get_hub()
    state = {"stopping": False}

    async def stop_then(previous, signum, frame) -> None:
        try:
            await run_shutdown_hooks()
        finally:
            _pass_on(previous, signum, frame)

    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        if getattr(previous, "ssechat_hook", False):
            continue

        def handler(signum, frame, previous=previous):
            if state["stopping"] or loop.is_closed():
                _pass_on(previous, signum, frame)  # a second signal: stop now
                return
            state["stopping"] = True
            loop.call_soon_threadsafe(hub.begin_shutdown)
            loop.call_soon_threadsafe(
                lambda: spawn(stop_then(previous, signum, frame), name="ssechat-stop")
            )

        handler.ssechat_hook = True  # type: ignore[attr-defined]
        signal.signal(sig, handler)


class ASGIHandler(DjangoASGIHandler):
    def __init__(self, *, serve_static: bool = False) -> None:
        super().__init__()
        self.prefixed = False  # see open_stream
        self.static = None
        self.static_prefix = ""
        if serve_static:
            from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler

            # It serves what is under STATIC_URL; anything else it would hand back here.
            self.static = ASGIStaticFilesHandler(self)
            url = settings.STATIC_URL
            self.static_prefix = url if url.startswith("/") else "/" + url

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            await self.lifespan(receive, send)
            return
        if scope["type"] != "http":
            raise ValueError(f"Django can only handle ASGI/HTTP connections, not {scope['type']}.")
        if self.static is not None and scope["path"].startswith(self.static_prefix):
            await self.static(scope, receive, send)
            return
        match = self.fastlane.match(scope)
        if match is not None:
            # Handed over in a box and emptied there: this frame lives as long as the
            # stream, and keeps neither the match nor the request.
            box = [match]
            del match
            opened = await self.open_stream(scope, receive, send, box)
            del box
            if opened is not None:
                # Streamed from this frame: no coroutine of open_stream's stays alive
                # with each stream.
                start, frames = opened
                del opened
                await self.stream(start, frames, receive, send)
            return
        match = self.apilane.match(scope)
        if match is not None:
            await self.apilane.handle(self, scope, receive, send, match)
            return
        await self.handle_django(scope, receive, send)

    async def handle_django(self, scope, receive, send) -> None:
        """Django's full path: middleware and view in the request's thread context."""
        async with ThreadSensitiveContext():
            response = await self.handle(scope, receive, send)
        if response is not None:
            # Outside the request's thread context: the stream holds no thread.
            start, frames = response.start_message(), response.frames
            del response
            await self.stream(start, frames, receive, send)

    @functools.cached_property
    def fastlane(self) -> FastLane:
        return FastLane()

    @functools.cached_property
    def apilane(self) -> ApiLane:
        return ApiLane(self.fastlane)

    async def open_stream(self, scope, receive, send, match) -> tuple[dict, Any] | None:
        """Run an event-stream view on the lean lane; ``(start message, frames)`` to
        stream, or None when a plain response (an error) was sent instead.

        ``match`` is the view's ``ResolverMatch``, or a one-item list holding it
        (emptied here, so that no frame keeps it while the stream is open).
        """
        if isinstance(match, list):
            match = match.pop()
        try:
            body = await read_body(receive, settings.DATA_UPLOAD_MAX_MEMORY_SIZE)
        except BodyTooLarge:
            await self.send_response(json_error(413, "too_large", "Body too large."), send)
            return None
        if body is None:
            return None
        prefix = get_script_prefix(scope)
        if prefix not in ("", "/") or self.prefixed:
            # Each request's task starts from the server's context, where no prefix is set
            # and reading one gives "/": setting (or reading) it for every stream costs
            # more than the rest of the request, so it is done only once any request of
            # this process has had another prefix (a root_path, FORCE_SCRIPT_NAME).
            self.prefixed = True
            set_script_prefix(prefix)
        request, response = await self.fastlane.get_response(self, scope, body, match)
        # A long-lived stream keeps neither the request, its resolver match nor the response.
        del request, match
        if isinstance(response, EventStreamResponse):
            return response.start_message(), response.frames
        try:
            await self.send_response(response, send)
        finally:
            for closer in response._resource_closers:
                closer()
        return None

    async def lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                install_shutdown_hook()
                try:
                    await asyncio.wait_for(get_hub().start(), 10)
                except Exception as exc:
                    logger.warning("broker not started at startup (%s); will retry on use", exc)
                for hook in STARTUP_HOOKS:
                    try:
                        await hook()
                    except Exception:
                        logger.exception("startup hook %r failed", hook)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                hub = get_hub()
                hub.begin_shutdown()
                try:
                    await run_shutdown_hooks()
                    await hub.stop()
                finally:
                    await send({"type": "lifespan.shutdown.complete"})
                return

    async def handle(self, scope, receive, send):
        """Django's ``handle``, except that an event stream is returned, not sent."""
        try:
            body_file = await self.read_body(receive)
        except RequestAborted:
            return None
        set_script_prefix(get_script_prefix(scope))
        await signals.request_started.asend(sender=self.__class__, scope=scope)
        request, error_response = self.create_request(scope, body_file)
        if request is None:
            body_file.close()
            await self.send_response(error_response, send)
            await sync_to_async(error_response.close)()
            return None

        async def process_request(request, send):
            response = await self.run_get_response(request)
            if isinstance(response, EventStreamResponse):
                return response
            try:
                await self.send_response(response, send)
            except asyncio.CancelledError:
                pass
            return response

        tasks = [
            asyncio.create_task(self.listen_for_disconnect(receive)),
            asyncio.create_task(process_request(request, send)),
        ]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            if task.done():
                try:
                    task.result()
                except RequestAborted:
                    pass
                except AssertionError:
                    body_file.close()
                    raise
            else:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        try:
            response = tasks[1].result()
        except asyncio.CancelledError:
            await signals.request_finished.asend(sender=self.__class__)
            body_file.close()
            return None
        body_file.close()
        if isinstance(response, EventStreamResponse):
            if not tasks[0].cancelled():  # the client left before the stream started
                await response.aclose()
                await signals.request_finished.asend(sender=self.__class__)
                return None
            await signals.request_finished.asend(sender=self.__class__)
            return response
        await sync_to_async(response.close)()
        return None

    async def stream(self, start: dict, frames, receive, send) -> None:
        """Send an event stream until it ends or the client disconnects.

        The frames are sent from this task. The client's disconnect is awaited
        without a task of its own (see _DisconnectWatch); it cancels this one.
        Whatever frames are ready when this task wakes go out as one write.
        """
        task = asyncio.current_task()
        steppable = settings.SSECHAT_DIRECT_WRITES and _steppable(send) and _steppable(receive)
        watch = _DisconnectWatch(task, receive, steppable)
        writer = None
        try:
            # Send a copy and empty the caller's dict: the header list is not kept
            # for the stream's life by whoever still holds ``start``.
            message = dict(start)
            start.clear()
            await send(message)
            del message
            # frames.pull() etc. are called, not kept as bound methods: this frame lives
            # as long as the stream, and each would be one more object per stream.
            if not hasattr(frames, "pull"):
                async for chunk in frames:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            else:
                loop = asyncio.get_running_loop()
                if steppable and hasattr(frames, "arm"):
                    writer = _DirectWriter(frames, send)
                chunk = frames.pull()
                while chunk is not None:
                    if chunk:
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    if writer is not None and frames.arm(writer):
                        # Live and idle: the hub writes this stream's frames itself (see
                        # _DirectWriter); this task sleeps until the writer needs it.
                        park = writer.park = loop.create_future()
                        await park
                        writer.park = park = None
                        if writer.error is not None or writer.pending is not None:
                            await writer.take_over()
                    else:
                        # After a write, wait() is done at once if more came meanwhile.
                        await frames.wait()
                    chunk = frames.pull()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not watch.gone:
                raise
            task.uncancel()
        except OSError:
            pass  # the client went away mid-write
        except Exception as exc:
            if getattr(frames, "error", False) is None:
                frames.error = repr(exc)  # for the "stream closed" log line
            raise
        finally:
            watch.stop()
            if writer is not None:
                writer.closed = True
                if writer.pending is not None:  # a write left waiting for a client now gone
                    writer.pending[0].close()
                    writer.pending = None
            await frames.aclose()


class _DirectWriter:
    """Writes a live, idle stream's frames from the hub's dispatch, without waking its task.

    Waking a stream's task for each event (a future, the event loop's callback,
    resuming six nested coroutines) cost more than the write itself. Instead
    the stream's mailbox calls ``set_result`` on this object (it looks like a
    future to the hub), which pulls the frames that are ready and sends them
    at once: with uvicorn a write goes straight to the socket unless the
    client is slow. The task is woken only when it is needed: a write that
    has to wait for the client (flow control; the task finishes it, and events
    queue in the mailbox meanwhile, as before), a step that needs the database
    (going live, catching up after an overflow), the end of the stream, an
    error. Order is kept: it writes only while the task sleeps, and the task
    writes only while it is not armed.
    """

    __slots__ = ("closed", "error", "frames", "park", "pending", "send")

    def __init__(self, frames, send) -> None:
        self.frames = frames
        self.send = send
        self.closed = False
        self.error: BaseException | None = None
        self.pending = None  # (send coroutine, the future it waits on)
        self.park: asyncio.Future | None = None  # what the task sleeps on

    async def take_over(self) -> None:
        """In the task, once woken: raise what failed, or finish the write left waiting."""
        error, self.error = self.error, None
        if error is not None:
            raise error
        pending, self.pending = self.pending, None
        if pending is not None:
            await _Resume(*pending)

    def _wake(self) -> None:
        park = self.park
        if park is not None and not park.done():
            park.set_result(None)

    # The hub calls these two as it would on a mailbox's future. ``done()`` is always
    # False (``bool()``: no Python call per event); set_result checks ``closed``.
    done = bool

    def set_result(self, _value: object) -> None:
        if self.closed:
            return
        frames = self.frames
        try:
            # Called once the hub has put a batch of events into the mailbox: every
            # frame ready goes out in one write.
            chunk = frames.pull()
            if chunk:
                coro = self.send({"type": "http.response.body", "body": chunk, "more_body": True})
                try:
                    waiting_on = coro.send(None)
                except StopIteration:
                    pass  # written
                else:  # the client is slow: the task finishes this write
                    self.pending = (coro, waiting_on)
                    self._wake()
                    return
            elif chunk is None:
                self._wake()  # the end
                return
            if not frames.arm(self):
                self._wake()  # something needs the task (the database, a signal)
        except Exception as exc:  # never into the hub's loop: the task raises it
            self.error = exc
            self._wake()


class _Resume:
    """Await the rest of a coroutine that was started outside this task and is
    waiting on ``future`` (what a Task does with the futures a coroutine yields)."""

    __slots__ = ("coro", "future")

    def __init__(self, coro, future) -> None:
        self.coro = coro
        self.future = future

    def __await__(self):
        coro, future = self.coro, self.future
        while True:
            try:
                yield future
            except BaseException as exc:
                try:
                    future = coro.throw(exc)
                except StopIteration:
                    return
            else:
                try:
                    future = coro.send(None)
                except StopIteration:
                    return


_CALLBACK_CONTEXT = contextvars.Context()


class _DisconnectWatch:
    """Cancels a stream's task when its client disconnects, without a task of its own.

    It drives the server's ``receive()`` coroutine from the callbacks of the
    futures it waits on, as a Task would (a Task, its coroutine and a closure
    per open stream cost about 1 KB). Any message ends the stream: after the
    request body only ``http.disconnect`` can come.
    """

    __slots__ = ("_coro", "_listener", "_task", "finished", "gone")

    def __init__(self, task: asyncio.Task, receive, steppable: bool = True) -> None:
        self._task = task
        self.gone = False
        self.finished = False
        self._listener: asyncio.Future | None = None
        awaitable = receive()
        if steppable and asyncio.iscoroutine(awaitable):
            self._coro = awaitable
            self._step()
        else:  # a server we do not know, or not a coroutine: let asyncio run it as a task
            self._coro = None
            self._listener = asyncio.ensure_future(awaitable)
            self._listener.add_done_callback(self._done)

    def _step(self, future: asyncio.Future | None = None) -> None:
        if self.finished:
            return
        try:
            if future is not None and future.cancelled():
                yielded = self._coro.throw(asyncio.CancelledError())
            else:
                yielded = self._coro.send(None)
        except BaseException:  # it returned (the client left) or failed: either way, stop
            self._coro = None
            self._fire()
            return
        if getattr(yielded, "_asyncio_future_blocking", None):
            yielded._asyncio_future_blocking = False
            # The watch itself is the callback, run in one shared context: a bound
            # method and a copy of the task's context would be two more objects per
            # open stream. (receive() reads no context variables; callbacks run one
            # at a time, so the shared context is never entered twice at once.)
            yielded.add_done_callback(self, context=_CALLBACK_CONTEXT)
        else:  # a bare yield (sleep(0)): step again soon
            asyncio.get_running_loop().call_soon(self._step)

    __call__ = _step  # as a future's done callback

    def _done(self, future: asyncio.Future) -> None:
        if not future.cancelled():
            future.exception()  # mark it retrieved
        self._fire()

    def _fire(self) -> None:
        if not self.finished:
            self.gone = True
            self._task.cancel()

    def stop(self) -> None:
        self.finished = True
        coro, self._coro = self._coro, None
        if coro is not None:
            coro.close()  # receive() stops waiting (its future leaves the server's event)
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.cancel()


def _steppable(callable_: object) -> bool:
    """May this ``send``/``receive`` be driven outside its task (from the hub's dispatch,
    from future callbacks)? Only where it is known to be a plain coroutine that awaits
    futures (no timeouts, no ``current_task()``): uvicorn's own, or a class that says
    so with ``ssechat_steppable = True``. Anything else is run by the stream's task."""
    owner = getattr(callable_, "__self__", None)
    if owner is None:
        return False
    cls = type(owner)
    return cls.__module__.startswith("uvicorn.protocols.") or getattr(
        cls, "ssechat_steppable", False
    )
