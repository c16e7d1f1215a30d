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
import logging
import signal
import threading
from collections.abc import Awaitable, Callable

from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.core import signals
from django.core.exceptions import RequestAborted
from django.core.handlers.asgi import ASGIHandler as DjangoASGIHandler
from django.core.handlers.asgi import get_script_prefix
from django.urls import set_script_prefix

from .hub import get_hub
from .response import EventStreamResponse

logger = logging.getLogger("ssechat.streams")

# Async callables run once when the server starts (e.g. mark answers of a dead worker failed).
STARTUP_HOOKS: list[Callable[[], Awaitable[None]]] = []


def on_startup(hook: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
    STARTUP_HOOKS.append(hook)
    return hook


def install_shutdown_hook() -> None:
    """Chain onto SIGTERM/SIGINT: end open streams at once, then let the server stop."""
    if threading.current_thread() is not threading.main_thread():
        return
    loop = asyncio.get_running_loop()
    hub = get_hub()
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        if getattr(previous, "ssechat_hook", False):
            continue

        def handler(signum, frame, previous=previous):
            loop.call_soon_threadsafe(hub.begin_shutdown)
            if callable(previous):
                previous(signum, frame)
            elif previous == signal.SIG_DFL:
                signal.signal(signum, signal.SIG_DFL)
                signal.raise_signal(signum)

        handler.ssechat_hook = True  # type: ignore[attr-defined]
        signal.signal(sig, handler)


class ASGIHandler(DjangoASGIHandler):
    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            await self.lifespan(receive, send)
            return
        if scope["type"] != "http":
            raise ValueError(f"Django can only handle ASGI/HTTP connections, not {scope['type']}.")
        async with ThreadSensitiveContext():
            response = await self.handle(scope, receive, send)
        if response is not None:
            # Outside the request's thread context: the stream holds no thread.
            await self.stream(response, receive, send)

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

    async def stream(self, response: EventStreamResponse, receive, send) -> None:
        """Send an event stream until it ends or the client disconnects."""
        sender = asyncio.create_task(self._send_stream(response, send))
        listener = asyncio.create_task(self.listen_for_disconnect(receive))
        try:
            await asyncio.wait((sender, listener), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sender, listener):
                if not task.done():
                    task.cancel()
            for task in (sender, listener):
                try:
                    await task
                except (asyncio.CancelledError, RequestAborted, OSError):
                    pass
                except Exception:
                    logger.exception("event stream failed")
            await response.aclose()

    async def _send_stream(self, response: EventStreamResponse, send) -> None:
        headers = [(k.encode("ascii"), v.encode("latin1")) for k, v in response.items()]
        for cookie in response.cookies.values():
            headers.append((b"Set-Cookie", cookie.output(header="").encode("ascii").strip()))
        await send(
            {"type": "http.response.start", "status": response.status_code, "headers": headers}
        )
        async for chunk in response.frames:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
