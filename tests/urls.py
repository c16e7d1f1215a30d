"""Test-only endpoints over the streaming core: a stream of any channel, and publish.

They exist only in the servers the tests start (tests/server_settings.py).
"""

import json

from asgiref.sync import sync_to_async
from django.db import transaction
from django.http import JsonResponse
from django.urls import path
from django.views.decorators.csrf import csrf_exempt

from ssechat.api import api_view
from ssechat.streams.log import publish
from ssechat.streams.response import EventStreamResponse, event_stream_view
from ssechat.streams.stream import EventStream, resume_id
from ssechat.urls import handler400, handler404, handler500  # noqa: F401 - the project's
from ssechat.urls import urlpatterns as project_urlpatterns


async def _channel_stream(request, channel, user_id=None):
    channels = [channel] + [c for c in request.GET.get("also", "").split(",") if c]
    from_start = request.GET.get("from") == "start"
    stream = EventStream(channels, resume_id(request), from_start=from_start, user_id=user_id)
    return EventStreamResponse(stream, label=request.path, user_id=user_id)


@event_stream_view(login_required=False)
async def channel_stream(request, channel):
    return await _channel_stream(request, channel)


@event_stream_view
async def private_stream(request, channel):
    return await _channel_stream(request, channel, user_id=request.user.pk)


def _publish_many(channel, body):
    count = int(body.get("count", 1))
    ids = []
    with transaction.atomic():
        for i in range(count):
            ids.append(publish(channel, body.get("type", "tick"), {"n": body.get("start", 0) + i}))
    return ids


@csrf_exempt
async def publish_view(request, channel):
    body = json.loads(request.body or b"{}")
    ids = await sync_to_async(_publish_many)(channel, body)
    return JsonResponse({"ids": ids})


@api_view(("GET",))
async def whoami(request):
    return JsonResponse({"username": request.user.username})


urlpatterns = [
    path("test/channels/<str:channel>/stream/", channel_stream),
    path("test/channels/<str:channel>/private/", private_stream),
    path("test/channels/<str:channel>/publish/", publish_view),
    path("api/test/whoami/", whoami),
    path("api/test/channels/<str:channel>/stream/", private_stream),
    *project_urlpatterns,
]
