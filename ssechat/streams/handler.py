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
import functools
import logging
import signal
import threading
from collections.abc import Awaitable, Callable

from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.conf import settings
from django.core import signals
from django.core.exceptions import RequestAborted
from django.core.handlers.asgi import ASGIHandler as DjangoASGIHandler
from django.core.handlers.asgi import get_script_prefix
from django.urls import set_script_prefix

from ssechat.api import json_error

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
    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            await self.lifespan(receive, send)
            return
        if scope["type"] != "http":
            raise ValueError(f"Django can only handle ASGI/HTTP connections, not {scope['type']}.")
        match = self.fastlane.match(scope)
        if match is not None:
            await self.handle_stream_request(scope, receive, send, match)
            return
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

    async def handle_stream_request(self, scope, receive, send, match) -> None:
        """A GET to an event-stream view, on the lean lane (see fastlane.py)."""
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > settings.DATA_UPLOAD_MAX_MEMORY_SIZE:
                await self.send_response(json_error(413, "too_large", "Body too large."), send)
                return
            if not message.get("more_body", False):
                break
        set_script_prefix(get_script_prefix(scope))
        request, response = await self.fastlane.get_response(self, scope, bytes(body), match)
        del request  # a long-lived stream keeps neither the request nor the response
        if isinstance(response, EventStreamResponse):
            start, frames = response.start_message(), response.frames
            del response
            await self.stream(start, frames, receive, send)
        else:
            try:
                await self.send_response(response, send)
            finally:
                for closer in response._resource_closers:
                    closer()

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

        The frames are sent from this task; a second, small task waits for the
        disconnect and cancels this one (one task fewer per open stream).
        """
        task = asyncio.current_task()
        state = {"finished": False, "gone": False}

        def on_disconnect(listener: asyncio.Task) -> None:
            if listener.cancelled():
                return
            listener.exception()  # RequestAborted: expected, mark it retrieved
            if not state["finished"]:
                state["gone"] = True
                task.cancel()

        listener = asyncio.get_running_loop().create_task(self.listen_for_disconnect(receive))
        listener.add_done_callback(on_disconnect)
        try:
            await send(start)
            async for chunk in frames:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not state["gone"]:
                raise
            task.uncancel()
        except OSError:
            pass  # the client went away mid-write
        finally:
            state["finished"] = True
            listener.cancel()
            await frames.aclose()
