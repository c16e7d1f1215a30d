"""An async StreamingHttpResponse fed by an in-process asyncio broadcast."""

import asyncio
import itertools

from django.conf import settings
from django.http import HttpResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt

streams: set[asyncio.Queue] = set()
ids = itertools.count(1)


async def stream(request):
    if settings.BENCH_MIDDLEWARE and not (await request.auser()).is_authenticated:
        return HttpResponse(status=401)

    async def frames():
        queue: asyncio.Queue = asyncio.Queue()
        streams.add(queue)
        try:
            yield b"retry: 2000\n\n"
            while True:
                yield await queue.get()
        finally:
            streams.discard(queue)

    response = StreamingHttpResponse(frames(), content_type="text/event-stream; charset=utf-8")
    response["Cache-Control"] = "no-cache"
    return response


@csrf_exempt
async def publish(request):
    frame = b"id: %d\ndata: %s\n\n" % (next(ids), request.body)
    for queue in streams:
        queue.put_nowait(frame)
    return HttpResponse(status=204)
