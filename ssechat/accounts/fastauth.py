"""Who is this stream client? Django's session auth, with its lookups made cheap.

A stream connect is all authentication: under a reconnect storm thousands of
them arrive at once. This resolves the user exactly as
``django.contrib.auth.get_user`` does (session data, backend, session hash
verified against the user's password) but reads the session row with one
plain query instead of two ORM queries, and keeps users (and API tokens) for
``SSECHAT_AUTH_CACHE_SECONDS`` (default 2): a deactivated user or a revoked
token is refused within that time, and their open streams are closed by the
revocation itself.

Sync code: call it with ``ssechat.streams.db.run_db``.
"""

from __future__ import annotations

import time
from importlib import import_module

from django.conf import settings
from django.contrib.auth import (
    BACKEND_SESSION_KEY,
    HASH_SESSION_KEY,
    SESSION_KEY,
    get_user_model,
    load_backend,
)
from django.contrib.auth.models import AnonymousUser
from django.db import connections, router
from django.utils import timezone
from django.utils.crypto import constant_time_compare

DB_SESSIONS = "django.contrib.sessions.backends.db"
_MAX_ENTRIES = 10_000


class _TTLCache:
    def __init__(self, ttl: float):
        self.ttl = ttl
        self.items: dict = {}

    def get(self, key):
        entry = self.items.get(key)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def put(self, key, value) -> None:
        if self.ttl <= 0:
            return
        if len(self.items) >= _MAX_ENTRIES:
            self.items.clear()
        self.items[key] = (time.monotonic() + self.ttl, value)

    def drop_where(self, predicate) -> None:
        for key in [k for k, (_, v) in self.items.items() if predicate(v)]:
            self.items.pop(key, None)

    def drop_where_key(self, predicate) -> None:
        for key in [k for k in self.items if predicate(k)]:
            self.items.pop(key, None)


class StreamAuthenticator:
    def __init__(self) -> None:
        self.engine = import_module(settings.SESSION_ENGINE)
        self.raw_sessions = settings.SESSION_ENGINE == DB_SESSIONS
        ttl = getattr(settings, "SSECHAT_AUTH_CACHE_SECONDS", 2.0)
        self.users = _TTLCache(ttl)
        self.tokens = _TTLCache(ttl)

    def forget_user(self, user_id: int) -> None:
        """Drop cached entries of a user (their access was revoked)."""
        self.users.drop_where(lambda user: getattr(user, "pk", None) == user_id)
        self.tokens.drop_where(lambda user: getattr(user, "pk", None) == user_id)

    def _session_data(self, session_key: str) -> dict:
        store = self.engine.SessionStore(session_key)
        if store.session_key is None:  # malformed key
            return {}
        if not self.raw_sessions:
            return store.load()
        model = store.model
        alias = router.db_for_read(model)
        with connections[alias].cursor() as cursor:
            cursor.execute(
                f"SELECT session_data FROM {model._meta.db_table}"  # noqa: S608 - Django's table
                " WHERE session_key = %s AND expire_date > %s",
                [session_key, timezone.now()],
            )
            row = cursor.fetchone()
        return store.decode(row[0]) if row else {}

    def user_for_session(self, session_key: str | None):
        """``django.contrib.auth.get_user`` for a session key (without writes)."""
        if not session_key:
            return AnonymousUser()
        data = self._session_data(session_key)
        try:
            user_id = get_user_model()._meta.pk.to_python(data[SESSION_KEY])
            backend_path = data[BACKEND_SESSION_KEY]
        except Exception:  # a missing key or a bad id: the session is anonymous
            return AnonymousUser()
        if backend_path not in settings.AUTHENTICATION_BACKENDS:
            return AnonymousUser()
        cache_key = (backend_path, user_id)
        user = self.users.get(cache_key)
        if user is None:
            user = load_backend(backend_path).get_user(user_id)
            if user is None:
                return AnonymousUser()
            self.users.put(cache_key, user)
        if hasattr(user, "get_session_auth_hash"):
            session_hash = data.get(HASH_SESSION_KEY)
            if not session_hash:
                return AnonymousUser()
            verified = constant_time_compare(session_hash, user.get_session_auth_hash()) or any(
                constant_time_compare(session_hash, fallback)
                for fallback in user.get_session_auth_fallback_hash()
            )
            if not verified:
                return AnonymousUser()
        return user

    def user_for_token(self, token: str):
        from .middleware import user_for_token_sync
        from .models import hash_token

        key = hash_token(token) if token and len(token) <= 200 else None
        if key is None:
            return None
        user = self.tokens.get(key)
        if user is None:
            user = user_for_token_sync(token)
            if user is not None:
                self.tokens.put(key, user)
        return user


_authenticator: StreamAuthenticator | None = None


def get_authenticator() -> StreamAuthenticator:
    global _authenticator
    if _authenticator is None:
        _authenticator = StreamAuthenticator()
    return _authenticator
