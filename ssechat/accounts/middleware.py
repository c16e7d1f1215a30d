"""``Authorization: Bearer <token>`` on ``/api/`` and ``/v1/`` URLs.

A valid token makes the request act as the token's user and exempts it from
CSRF (no browser sends such a header on its own). An invalid or revoked token
is answered 401 at once, so a script never silently acts as anonymous.
"""

from __future__ import annotations

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.http import JsonResponse
from django.utils import timezone

from ssechat.api import json_error
from ssechat.streams.rows import only_row

from .models import ApiToken, hash_token

BEARER_PATH_PREFIXES = ("/api/", "/v1/")


def bearer_token(request) -> str | None:
    header = request.META.get("HTTP_AUTHORIZATION", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip()


def user_for_token_sync(token: str):
    """The active user a token belongs to, or None."""
    if not token or len(token) > 200:
        return None
    row = only_row(
        ApiToken.objects.active().select_related("user").filter(key_hash=hash_token(token))
    )
    if row is None:
        return None
    now = timezone.now()
    # Record use at most once a minute: a stream connect should not cost a write.
    if row.last_used_at is None or (now - row.last_used_at).total_seconds() > 60:
        ApiToken.objects.filter(pk=row.pk).update(last_used_at=now)
    return row.user


async def user_for_token(token: str):
    """The token's user, read from the database: a revoked token is refused at once.

    The user is also kept in the process's cache of token users, which the stream
    and API lanes use (``SSECHAT_AUTH_CACHE_SECONDS``): a client that creates a
    conversation and then posts to it is looked up once.
    """
    return await sync_to_async(_fresh_user_for_token)(token)


def _fresh_user_for_token(token: str):
    from .fastauth import get_authenticator

    return get_authenticator().user_for_token(token, fresh=True)


def invalid_token_response(path: str) -> JsonResponse:
    """401 for a bad token: OpenAI's error shape on /v1/, the contract's elsewhere."""
    if path.startswith("/v1/"):
        response = JsonResponse(
            {
                "error": {
                    "message": "Incorrect API key provided.",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "invalid_api_key",
                }
            },
            status=401,
        )
        response["WWW-Authenticate"] = 'Bearer realm="ssechat"'
        return response
    return json_error(401, "invalid_token", "The API token is invalid or revoked.")


class BearerTokenMiddleware:
    async_capable = True
    sync_capable = False

    def __init__(self, get_response):
        self.get_response = get_response
        if iscoroutinefunction(self.get_response):
            markcoroutinefunction(self)

    async def __call__(self, request):
        if request.path.startswith(BEARER_PATH_PREFIXES):
            token = bearer_token(request)
            if token is not None:
                user = await user_for_token(token)
                if user is None:
                    return invalid_token_response(request.path)
                request.user = user
                request._cached_user = user

                async def auser():
                    return user

                request.auser = auser
                request.auth_token = True
                request._dont_enforce_csrf_checks = True
        return await self.get_response(request)
