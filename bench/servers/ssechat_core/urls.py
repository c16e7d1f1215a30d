"""A per-user stream of a broadcast channel and a staff-only stored publish (as tests/urls.py)."""

from django.http import JsonResponse
from django.urls import path

from ssechat.api import ApiError, api_view, parse_json_body
from ssechat.streams.log import apublish
from ssechat.streams.response import EventStreamResponse, event_stream_view
from ssechat.streams.stream import EventStream, resume_id
from ssechat.urls import urlpatterns as project_urlpatterns

BROADCAST = "bench:broadcast"


@event_stream_view
async def feed(request):
    user_id = request.user.pk
    channels = [BROADCAST, f"bench:user:{user_id}"]
    stream = EventStream(channels, resume_id(request), user_id=user_id)
    return EventStreamResponse(stream, stream=stream, label=request.path, user_id=user_id)


@api_view(("POST",))
async def publish(request):
    if not request.user.is_staff:
        raise ApiError(403, "Staff only.")
    body = parse_json_body(request)
    recipient = body.get("recipient")
    channel = BROADCAST if recipient is None else f"bench:user:{int(recipient)}"
    event_id = await apublish(channel, "notification", body)
    return JsonResponse({"id": event_id}, status=201)


urlpatterns = [
    path("api/bench/stream/", feed),
    path("api/bench/publish/", publish),
    *project_urlpatterns,
]
