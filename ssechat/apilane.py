"""The lean lane for JSON API requests that carry a Bearer token.

Django's full path gives every request a thread of its own (its
thread-sensitive context) and hops through a thread for each
``MiddlewareMixin`` hook: about 80 µs a hop on a small VM, a dozen of them per
request. A script calling the JSON API with ``Authorization: Bearer`` needs
none of that: no session, no CSRF, no messages. Here instead:

* the request is built as Django builds it (``ASGIRequest``);
* Django's own ``SecurityMiddleware`` / ``CommonMiddleware`` /
  ``XFrameOptionsMiddleware`` hooks are called inline (they do no I/O);
* the token's user comes from the stream lane's authenticator (cached for
  ``SSECHAT_AUTH_CACHE_SECONDS``; revocation drops it), on the loop when cached;
* the view runs; views taking this lane (``@api_view(..., lane=True)``) do
  their ORM work in one ``run_db`` call on the stream database pool, whose
  threads keep one connection each;
* exceptions are answered as Django's path answers them (503 JSON for a
  database error, Django's ``response_for_exception`` otherwise).

Only requests that need nothing else take it: a path under ``/api/``, a view
marked for the lane, a Bearer token, no cookie at all (a session needs CSRF
and may be saved), a body with a ``Content-Length`` within
``DATA_UPLOAD_MAX_MEMORY_SIZE``. Anything else, and any request this lane
would refuse before the view (a bad host, a redirect), goes to Django's full
path with its body replayed. ``request_started``/``request_finished`` are
not sent on this lane (as on the stream lane). Turn it off with
``SSECHAT_API_FAST_PATH = False``.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.core.handlers.exception import response_for_exception
from django.db import DatabaseError
from django.http import HttpResponse
from django.utils.log import log_response

from ssechat.api import json_error
from ssechat.streams.fastlane import cached_match

logger = logging.getLogger("ssechat.api")

API_PREFIX = "/api/"

Receive = Callable[[], Awaitable[dict]]
FullPath = Callable[[dict, Receive, Callable], Awaitable[None]]


class BodyTooLarge(Exception):
    """The request body went past the limit; ``body`` is what was read."""

    def __init__(self, body: bytes) -> None:
        super().__init__(f"request body over {len(body)} bytes")
        self.body = body


async def read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body; None if the client disconnected first. Raises
    BodyTooLarge as soon as more than ``limit`` bytes have come."""
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        body += message.get("body", b"")
        if len(body) > limit:
            raise BodyTooLarge(bytes(body))
        if not message.get("more_body", False):
            return bytes(body)


def replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands out an already read body first, then the real one."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> dict:
        if pending:
            return pending.pop()
        return await receive()

    return replayed


class ApiLane:
    def __init__(self, fastlane: Any) -> None:
        # The stream lane's resolver and Django's middleware hooks, shared.
        self.fastlane = fastlane
        self.resolver = fastlane.resolver
        self.enabled = getattr(settings, "SSECHAT_API_FAST_PATH", True)
        self.active = {
            "django.contrib.auth.middleware.AuthenticationMiddleware",
            "ssechat.accounts.middleware.BearerTokenMiddleware",
        } <= set(settings.MIDDLEWARE)
        self.limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        self.matches: dict[str, Any] = {}
        self.served = 0  # requests answered on this lane (tests, benchmarks)

    def match(self, scope: dict) -> Any:
        """The resolver match if this request can take the lane, else None."""
        if not (self.enabled and self.active):
            return None
        path = scope["path"]
        if not path.startswith(API_PREFIX) or scope.get("root_path"):
            return None
        bearer = False
        length = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                bearer = value[:7].lower() == b"bearer "
                if not bearer:
                    return None
            elif name == b"cookie" or name == b"transfer-encoding":
                return None
            elif name == b"content-length":
                if not value.isdigit() or int(value) > self.limit:
                    return None
                length = int(value)
        if not bearer or (length is None and scope["method"] not in ("GET", "HEAD")):
            return None
        return cached_match(self.resolver, self.matches, path, "api_lane")

    async def handle(self, handler: Any, scope: dict, receive: Receive, send, match) -> None:
        """Answer the request, or pass it to Django's full path (``handler.handle_django``)."""
        try:
            body = await read_body(receive, self.limit)
        except BodyTooLarge as exc:  # more than Content-Length said: let Django judge
            await handler.handle_django(scope, replay(exc.body, receive), send)
            return
        if body is None:
            return
        response = await self.get_response(handler, scope, body, match)
        if response is None:
            await handler.handle_django(scope, replay(body, receive), send)
            return
        self.served += 1
        try:
            await handler.send_response(response, send)
        finally:
            response.close()

    async def get_response(self, handler: Any, scope: dict, body: bytes, match) -> Any:
        """The response, or None when Django's full path must answer instead."""
        from django.core.handlers.asgi import get_script_prefix
        from django.urls import set_script_prefix

        from ssechat.accounts.fastauth import get_authenticator
        from ssechat.accounts.middleware import bearer_token, invalid_token_response
        from ssechat.accounts.models import hash_token
        from ssechat.streams.db import run_db
        from ssechat.streams.fastlane import set_user

        fast = self.fastlane
        set_script_prefix(get_script_prefix(scope))
        try:
            request = handler.request_class(scope, io.BytesIO(body))
        except (UnicodeDecodeError, RequestDataTooBig):
            return None
        try:
            if fast.request_checks(request) is not None:
                return None  # a redirect (SSL, slash): Django's path answers it
        except Exception:  # DisallowedHost and the like: Django's path answers them
            return None
        request.resolver_match = match
        token = bearer_token(request)
        if not token:
            return None
        auth = get_authenticator()
        user = auth.tokens.get(hash_token(token)) if len(token) <= 200 else None
        if user is None:
            try:
                user = await run_db(auth.user_for_token, token)
            except Exception as exc:  # e.g. the database is down: 503 JSON, as on Django's path
                response = response_for_exception(request, exc)
                return self.finish(request, response, inner=False)
        if user is None:
            # BearerTokenMiddleware answers it: the hooks inside it (X-Frame-Options) do not run.
            response = self.finish(request, invalid_token_response(request.path), inner=False)
        else:
            set_user(request, user)
            request.auth_token = True
            request._dont_enforce_csrf_checks = True
            request.session = fast.session_engine.SessionStore(None)
            response = self.finish(request, await self.run_view(request, match))
        if response.status_code >= 400:  # as Django's get_response logs it
            log_response(
                "%s: %s", response.reason_phrase, request.path, response=response, request=request
            )
        return response

    async def run_view(self, request: Any, match) -> HttpResponse:
        try:
            return await match.func(request, *match.args, **match.kwargs)
        except DatabaseError:  # as ssechat.api.ApiExceptionMiddleware answers it
            return json_error(503, "unavailable", "The database is unavailable; retry.")
        except Exception as exc:
            return response_for_exception(request, exc)

    def finish(self, request: Any, response: HttpResponse, *, inner: bool = True) -> HttpResponse:
        """The response hooks of Django's middleware, in its order (innermost first)."""
        fast = self.fastlane
        if inner:
            response = fast.xframe.process_response(request, response)
        response = fast.common.process_response(request, response)
        return fast.security.process_response(request, response)
