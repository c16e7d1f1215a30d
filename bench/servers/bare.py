"""The reference: a bare ASGI SSE broadcaster, no framework (run it on uvicorn).

GET /stream: an event stream; POST /publish: the body is framed once and
queued to every open stream. Nothing is stored; a slow client's queue grows.
"""

import asyncio
import itertools

HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
streams: set[asyncio.Queue] = set()
ids = itertools.count(1)


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                for queue in streams:
                    queue.put_nowait(None)
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["path"] == "/stream" and scope["method"] == "GET":
        await stream(receive, send)
    elif scope["path"] == "/publish" and scope["method"] == "POST":
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        frame = b"id: %d\ndata: %s\n\n" % (next(ids), body)  # framed once for everyone
        for queue in streams:
            queue.put_nowait(frame)
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})
    else:
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})


async def stream(receive, send):
    queue: asyncio.Queue = asyncio.Queue()
    streams.add(queue)

    async def watch():  # the client left: wake the sender with None
        while (await receive())["type"] != "http.disconnect":
            pass
        queue.put_nowait(None)

    watcher = asyncio.create_task(watch())
    try:
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        await send({"type": "http.response.body", "body": b"retry: 2000\n\n", "more_body": True})
        while (frame := await queue.get()) is not None:
            await send({"type": "http.response.body", "body": frame, "more_body": True})
    finally:
        streams.discard(queue)
        watcher.cancel()
