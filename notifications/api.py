"""The JSON API: list, mark read, mark all read, send (with permission)."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.http import HttpRequest, JsonResponse

from ssechat.accounts.fastauth import get_authenticator
from ssechat.api import ApiError, api_view, parse_json_body
from ssechat.streams.db import run_db

from . import services
from .models import Notification, is_valid_topic

DEFAULT_LIMIT = 20
MAX_LIMIT = 100
MAX_PK = 2**63 - 1  # beyond a 64-bit key no row can exist (and SQLite would overflow)
CREATE_FIELDS = ("recipient", "topic", "level", "title", "body", "url", "data")
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off", "")


def invalid(field: str, detail: str) -> ApiError:
    return ApiError(400, detail, code="invalid_field", field=field)


def _bool_param(request: HttpRequest, name: str) -> bool:
    raw = request.GET.get(name)
    if raw is None:
        return False
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise invalid(name, f"{name} must be true or false, not {raw[:20]!r}.")


def _int_param(request: HttpRequest, name: str, *, low: int, high: int | None = None):
    raw = request.GET.get(name)
    if raw is None or raw.strip() == "":
        return None
    raw = raw.strip()
    bounds = f"from {low} to {high}" if high is not None else f"of at least {low}"
    if not raw.isdigit() or len(raw) > 18:
        raise invalid(name, f"{name} must be a whole number {bounds}, not {raw[:20]!r}.")
    value = int(raw)
    if value < low or (high is not None and value > high):
        raise invalid(name, f"{name} must be a whole number {bounds}, not {value}.")
    return value


@api_view(("GET", "POST"), lane=True)
async def notifications(request: HttpRequest) -> JsonResponse:
    if request.method == "POST":
        return await create(request)
    user = await request.auser()
    unread = _bool_param(request, "unread")
    topic = request.GET.get("topic")
    if topic is not None:
        topic = topic.strip()
        if topic and not is_valid_topic(topic):
            raise invalid("topic", f"{topic[:40]!r} is not a topic name.")
    before = _int_param(request, "before", low=1)
    limit = _int_param(request, "limit", low=1, high=MAX_LIMIT) or DEFAULT_LIMIT

    def load() -> dict[str, Any]:
        results = services.list_for(user, unread=unread, topic=topic, before=before, limit=limit)
        return {"results": results, "unread_count": services.unread_count(user)}

    return JsonResponse(await run_db(load))


async def create(request: HttpRequest) -> JsonResponse:
    user = await request.auser()
    # One trip to the database threads for all of it (each costs a thread hop).
    return JsonResponse(await run_db(_create, user, request), status=201)


def _create(user, request: HttpRequest) -> dict[str, Any]:
    if not get_authenticator().has_perm(user, "notifications.add_notification"):
        raise ApiError(
            403,
            "Sending notifications needs the notifications.add_notification permission.",
        )
    body = parse_json_body(request)
    for key in body:
        if key not in CREATE_FIELDS:
            raise invalid(key, f"Unknown field {key[:40]!r}; expected {', '.join(CREATE_FIELDS)}.")
    if "recipient" not in body:
        raise invalid(
            "recipient", "recipient is required: a username, or null to broadcast to every user."
        )
    try:
        fields = services.clean_fields(
            title=body.get("title"),
            body=body.get("body", ""),
            level=body.get("level", "info"),
            topic=body.get("topic", "general"),
            url=body.get("url", ""),
            data=body.get("data"),
        )
    except services.InvalidNotification as exc:
        raise invalid(exc.field, f"{exc.field} {exc.message}") from exc

    name = body["recipient"]
    recipient = None
    if name is not None:
        if not isinstance(name, str) or not name.strip() or not services.storable(name):
            raise invalid("recipient", "recipient must be a username, or null for a broadcast.")
        User = get_user_model()
        recipient = User._default_manager.filter(
            **{User.USERNAME_FIELD: name.strip()}, is_active=True
        ).first()
        if recipient is None:
            raise invalid("recipient", f"recipient {name[:150]!r}: no such user.")
    return services.notify(recipient, **fields).to_json(read=False)


@api_view(("POST",), lane=True)
async def mark_read(request: HttpRequest, pk: int) -> JsonResponse:
    user = await request.auser()
    try:
        if pk > MAX_PK:
            raise Notification.DoesNotExist
        count = await run_db(services.mark_read, user, pk)
    except Notification.DoesNotExist as exc:
        raise ApiError(404, f"Notification {pk} not found.") from exc
    return JsonResponse({"unread_count": count})


@api_view(("POST",), lane=True)
async def mark_all_read(request: HttpRequest) -> JsonResponse:
    user = await request.auser()
    count = await run_db(services.mark_all_read, user)
    return JsonResponse({"unread_count": count})
