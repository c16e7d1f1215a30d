"""The lean lane for event-stream views: no per-request thread, no middleware hops.

A GET to a view decorated with ``@event_stream_view`` is a long-lived request
whose only real work is "who is this?". Django's full path would give it a
thread of its own (its thread-sensitive context) and hop through a thread for
every ``MiddlewareMixin`` middleware. Here instead:

* the request is built as Django builds it (``ASGIRequest``);
* the host is validated and the security headers are added by Django's own
  ``CommonMiddleware`` / ``SecurityMiddleware`` / ``XFrameOptionsMiddleware``
  code, called directly (they do no I/O);
* the user comes from Django's own session auth (``django.contrib.auth.get_user``,
  which verifies the session hash) or from an API token, in one call on the
  stream database pool;
* the view runs, and its response is sent.

Anything else (other methods, other views, a custom ``urlconf``) takes Django's
normal path. Turn the lane off with ``SSECHAT_STREAM_FAST_PATH = False``.
"""

from __future__ import annotations

import io
import logging
import sys
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AnonymousUser
from django.core.exceptions import DisallowedHost, RequestDataTooBig, SuspiciousOperation
from django.db import DatabaseError
from django.http import HttpResponse
from django.middleware.clickjacking import XFrameOptionsMiddleware
from django.middleware.common import CommonMiddleware
from django.middleware.security import SecurityMiddleware
from django.urls import Resolver404, get_resolver

from ssechat.api import json_error

from .db import run_db_batched
from .hub import get_hub, stream_auth
from .revocation import session_auth_key, token_auth_key

logger = logging.getLogger("ssechat.streams")

BEARER_PATH_PREFIXES = ("/api/", "/v1/")
MAX_CACHED_PATHS = 1024
MAX_CACHED_HOSTS = 64


def cached_match(resolver, cache: dict, path: str, marker: str) -> Any:
    """The ResolverMatch for ``path`` if its view carries the attribute ``marker``, else
    None; remembered per path in ``cache`` (bounded): resolving walks every URL pattern
    (and builds a ``tried`` list), a dict lookup does not."""
    try:
        return cache[path]
    except KeyError:
        pass
    try:
        match = resolver.resolve(path)
    except Resolver404:
        match = None
    if match is not None and not getattr(match.func, marker, False):
        match = None
    if len(cache) >= MAX_CACHED_PATHS:
        cache.clear()
    cache[path] = match
    return match


def _no_response(request):  # the middlewares below are only used for their hooks
    return None


class FastLane:
    def __init__(self) -> None:
        self.resolver = get_resolver()
        self.security = SecurityMiddleware(_no_response)
        self.common = CommonMiddleware(_no_response)
        self.xframe = XFrameOptionsMiddleware(_no_response)
        self.session_engine = __import__(settings.SESSION_ENGINE, fromlist=["SessionStore"])
        self.enabled = getattr(settings, "SSECHAT_STREAM_FAST_PATH", True)
        self.active = {"django.contrib.auth.middleware.AuthenticationMiddleware"} <= set(
            settings.MIDDLEWARE
        )
        # path -> ResolverMatch of an event-stream view, or None (see cached_match).
        self.matches: dict[str, object | None] = {}
        # Host headers CommonMiddleware accepted (see request_checks).
        self.good_hosts: set[str] = set()
        self.plain_common = not settings.DISALLOWED_USER_AGENTS and not settings.PREPEND_WWW
        # Imported here, not per request (the accounts app needs Django set up).
        from ssechat.accounts.fastauth import get_authenticator
        from ssechat.accounts.middleware import bearer_token, invalid_token_response

        self.authenticator = get_authenticator
        self.bearer_token = bearer_token
        self.invalid_token_response = invalid_token_response

    def match(self, scope) -> object | None:
        """The resolver match if this request is for an event-stream view."""
        if not (self.enabled and self.active) or scope["method"] not in ("GET", "HEAD"):
            return None
        path = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        return cached_match(self.resolver, self.matches, path, "event_stream")

    async def get_response(self, handler, scope, body: bytes, match):
        """Run the view; return (request, response)."""
        try:
            request = handler.request_class(scope, io.BytesIO(body))
        except (UnicodeDecodeError, RequestDataTooBig):
            return None, json_error(400, "bad_request", "The request could not be read.")
        request.resolver_match = match
        try:
            early = self.request_checks(request)
        except DisallowedHost:
            return request, json_error(400, "bad_request", "Invalid Host header.")
        if early is not None:
            return request, early
        denied = await self.authenticate(request, getattr(match.func, "stream_prefetch", None))
        if denied is not None:
            return request, self.finish(request, denied)
        # Streams opened by the view can be closed by revoking these credentials. Set for
        # the view alone: a context variable left set would keep a mapping per stream.
        credentials = request.stream_credentials
        token = stream_auth.set(credentials) if credentials is not None else None
        try:
            response = await match.func(request, *match.args, **match.kwargs)
        except (SuspiciousOperation, RequestDataTooBig) as exc:
            # e.g. more query parameters than DATA_UPLOAD_MAX_NUMBER_FIELDS
            response = json_error(400, "bad_request", f"The request was refused: {exc}")
        except DatabaseError:
            logger.warning("database unavailable for %s", request.path, exc_info=True)
            response = json_error(503, "unavailable", "The database is unavailable; retry.")
        except Exception:
            logger.error(
                "Internal Server Error: %s", request.path, exc_info=sys.exc_info(),
                extra={"status_code": 500, "request": request},
            )  # fmt: skip
            response = json_error(500, "server_error", "The stream could not be opened.")
        finally:
            if token is not None:
                stream_auth.reset(token)
        return request, self.finish(request, response)

    def request_checks(self, request) -> HttpResponse | None:
        """SecurityMiddleware's and CommonMiddleware's ``process_request``.

        CommonMiddleware's is skipped for a Host it has already accepted when it
        could do nothing else (no ``DISALLOWED_USER_AGENTS``, no ``PREPEND_WWW``;
        the path, an event-stream view's or an API view's, resolved as it is).
        """
        early = self.security.process_request(request)
        if early is not None:
            return early
        raw_host = request._get_raw_host()
        if self.plain_common and raw_host in self.good_hosts:
            return None
        early = self.common.process_request(request)  # raises DisallowedHost
        if early is None and self.plain_common:
            if len(self.good_hosts) >= MAX_CACHED_HOSTS:
                self.good_hosts.clear()
            self.good_hosts.add(raw_host)
        return early

    def finish(self, request, response: HttpResponse) -> HttpResponse:
        response = self.security.process_response(request, response)
        response = self.xframe.process_response(request, response)
        response.headers.setdefault("Vary", "Cookie, Authorization")
        return response

    async def authenticate(self, request, prefetch=None) -> HttpResponse | None:
        """Set ``request.user`` from an API token or the session; a response if refused.

        ``prefetch`` (a view's ``stream_prefetch`` attribute), when given, runs in
        the same database call as the authentication, with the user and the hub's
        horizon read just before the call: ``prefetch(user, horizon)``. Its result
        is ``request.stream_prefetch`` (None for an anonymous user). A view can
        use it when the stream starts at that same horizon (nothing was
        dispatched in between), and saves a trip to the database threads.
        """
        auth = self.authenticator()
        session_key = request.COOKIES.get(settings.SESSION_COOKIE_NAME)
        request.session = self.session_engine.SessionStore(session_key)
        request.stream_prefetch = None
        request.stream_credentials = None
        bearer = request.path.startswith(BEARER_PATH_PREFIXES)
        token = self.bearer_token(request) if bearer else None
        horizon = get_hub().horizon if prefetch is not None else 0
        if token is not None:
            # A token seen within SSECHAT_AUTH_CACHE_SECONDS needs no database trip (a
            # chat client opens its answer's stream right after posting the message).
            user = auth.cached_user_for_token(token) if prefetch is None else None
            if user is None:
                user, request.stream_prefetch = await run_db_batched(
                    _authenticate, auth.user_for_token, token, prefetch, horizon
                )
            if user is None:
                return self.invalid_token_response(request.path)
            key = token_auth_key(token)
        elif not session_key:
            user, key = AnonymousUser(), None
        else:
            user, request.stream_prefetch = await run_db_batched(
                _authenticate, auth.user_for_session, session_key, prefetch, horizon
            )
            key = session_auth_key(session_key)
        set_user(request, user)
        if user.is_authenticated:
            request.stream_credentials = (user.pk, key)  # see get_response
        return None


def _authenticate(lookup, credential: str, prefetch, horizon: int) -> tuple:
    """(user, prefetched) in one call on the database pool."""
    user = lookup(credential)
    if prefetch is None or user is None or not user.is_authenticated:
        return user, None
    return user, prefetch(user, horizon)


def set_user(request, user) -> None:
    request.user = request._cached_user = user

    async def auser():
        return user

    request.auser = auser
