"""Small helpers shared by the JSON API views of every app.

Errors follow the contract: ``{"error": "<code>", "detail": "<human text>"}``
with the matching status. API and stream URLs answer an anonymous client with
401 JSON, never with a redirect to the login page.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Awaitable, Callable
from typing import Any

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse, JsonResponse

ERROR_CODES = {
    400: "bad_request",
    401: "not_authenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    429: "too_many_requests",
    503: "unavailable",
}

# JSON nesting deeper than this is refused before it reaches a view.
MAX_JSON_DEPTH = 32


class ApiError(Exception):
    """Raised inside an API view to answer with a JSON error."""

    def __init__(self, status: int, detail: str, code: str | None = None, **extra: Any):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.code = code or ERROR_CODES.get(status, "error")
        self.extra = extra

    def response(self) -> JsonResponse:
        return json_error(self.status, self.code, self.detail, **self.extra)


def json_error(status: int, code: str, detail: str, **extra: Any) -> JsonResponse:
    response = JsonResponse({"error": code, "detail": detail, **extra}, status=status)
    if status == 401:
        response["WWW-Authenticate"] = 'Bearer realm="ssechat"'
    return response


def _depth(value: Any, limit: int) -> int:
    stack = [(value, 1)]
    deepest = 0
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return deepest


def parse_json_body(request: HttpRequest, *, max_bytes: int | None = None) -> dict[str, Any]:
    """The request body as a JSON object, or an ApiError naming what is wrong."""
    limit = max_bytes or settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    length = request.META.get("CONTENT_LENGTH") or "0"
    if length.isdigit() and int(length) > limit:
        raise ApiError(413, f"The request body is larger than {limit} bytes.")
    content_type = request.content_type or ""
    if content_type and content_type not in ("application/json", "text/plain"):
        raise ApiError(415, "Send the body as application/json.")
    try:
        raw = request.body
    except RequestDataTooBig:  # sent without Content-Length (chunked)
        raise ApiError(413, f"The request body is larger than {limit} bytes.") from None
    if len(raw) > limit:
        raise ApiError(413, f"The request body is larger than {limit} bytes.")
    if not raw.strip():
        raise ApiError(400, "The request body is empty; send a JSON object.", code="invalid_json")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, "The request body is not valid UTF-8.", code="invalid_json") from exc
    try:
        data = json.loads(text)
    except RecursionError as exc:
        raise ApiError(400, "The JSON body is nested too deeply.", code="invalid_json") from exc
    except ValueError as exc:
        raise ApiError(
            400, f"The request body is not valid JSON: {exc}", code="invalid_json"
        ) from exc
    if not isinstance(data, dict):
        raise ApiError(400, "The JSON body must be an object.", code="invalid_json")
    # A body with fewer brackets than the limit cannot nest deeper: skip the walk.
    brackets = raw.count(b"{") + raw.count(b"[")
    if brackets > MAX_JSON_DEPTH and _depth(data, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise ApiError(400, "The JSON body is nested too deeply.", code="invalid_json")
    return data


def is_authenticated(request: HttpRequest) -> bool:
    user = getattr(request, "user", None)
    return bool(user is not None and user.is_authenticated)


ViewFunc = Callable[..., Awaitable[HttpResponse]]


def api_view(
    methods: tuple[str, ...] = ("GET",), *, login_required: bool = True, lane: bool = False
):
    """Decorate an async API view: method check, 401 JSON for anonymous, ApiError.

    ``lane=True`` lets Bearer-token requests to the view take the lean lane
    (ssechat/apilane.py): for views that need no session, messages or CSRF and
    do their ORM work with ``ssechat.streams.db.run_db`` (no thread context there).
    """

    def decorator(view: ViewFunc) -> ViewFunc:
        @functools.wraps(view)
        async def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            if request.method not in methods:
                response = json_error(
                    405, "method_not_allowed", f"{request.method} is not allowed here."
                )
                response["Allow"] = ", ".join(methods)
                return response
            if login_required:
                # Resolve the user once, so the view can read request.user without a sync query.
                request.user = user = await request.auser()
                if not user.is_authenticated:
                    return json_error(401, "not_authenticated", "Log in or send a Bearer token.")
            try:
                return await view(request, *args, **kwargs)
            except ApiError as exc:
                return exc.response()

        if lane:
            wrapper.api_lane = True  # type: ignore[attr-defined]
        return wrapper

    return decorator


def csrf_failure(request: HttpRequest, reason: str = "") -> HttpResponse:
    """CSRF failures: JSON on API URLs, Django's own page elsewhere."""
    if request.path.startswith(("/api/", "/v1/")) or request.path.endswith("/stream/"):
        user = getattr(request, "user", None)
        if user is not None and not user.is_authenticated:
            # No session and no token: the answer is "who are you?", not "bad token".
            return json_error(401, "not_authenticated", "Log in or send a Bearer token.")
        return json_error(
            403, "csrf_failed", f"CSRF check failed ({reason}). Send the X-CSRFToken header."
        )
    from django.views.csrf import csrf_failure as django_csrf_failure

    return django_csrf_failure(request, reason)


def _wants_json(request: HttpRequest) -> bool:
    return request.path.startswith(("/api/", "/v1/"))


def bad_request(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    if _wants_json(request):
        return json_error(400, "bad_request", "The request was refused as malformed.")
    from django.views.defaults import bad_request as django_bad_request

    return django_bad_request(request, exception)


def page_not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    if _wants_json(request):
        return json_error(404, "not_found", "No such URL.")
    from django.views.defaults import page_not_found as django_page_not_found

    return django_page_not_found(request, exception)


def server_error(request: HttpRequest) -> HttpResponse:
    """500, or 503 when the database is what failed; JSON on API URLs."""
    import sys

    from django.db import DatabaseError

    failed = sys.exc_info()[1]
    if isinstance(failed, DatabaseError):
        if _wants_json(request):
            return json_error(503, "unavailable", "The database is unavailable; retry.")
        return HttpResponse("Service unavailable: the database is unreachable.", status=503)
    if _wants_json(request):
        return json_error(500, "server_error", "Something went wrong on our side.")
    from django.views.defaults import server_error as django_server_error

    return django_server_error(request)


class ApiExceptionMiddleware:
    """A view that fails on its database answers 503 JSON on API URLs (a retry may work).

    Only ``process_exception``: nothing runs on the normal path.
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response):
        from asgiref.sync import iscoroutinefunction, markcoroutinefunction

        self.get_response = get_response
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    def __call__(self, request):
        return self.get_response(request)

    def process_exception(self, request: HttpRequest, exception: Exception):
        from django.db import DatabaseError

        if isinstance(exception, DatabaseError) and _wants_json(request):
            return json_error(503, "unavailable", "The database is unavailable; retry.")
        return None
