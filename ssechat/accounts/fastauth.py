"""Who is this stream client? Django's session auth, with its lookups made cheap.

A stream connect is all authentication: under a reconnect storm thousands of
them arrive at once. This resolves the user exactly as
``django.contrib.auth.get_user`` does (session data, backend, the backend's
``user_can_authenticate``, session hash verified against the user's password)
but with plain SQL instead of ORM queries:

* the session row, and once the session's user is known, the user's row in
  the same query (``LEFT JOIN``): one query per connect;
* the user instance and its session auth hash are built once per distinct
  user row and kept while the row read from the database stays the same, so a
  password change or a deactivation takes effect at the next connect, in
  every process, whatever the cache holds;
* decoded session data is kept while the stored ``session_data`` is the same.

Backends other than ``ModelBackend`` (and its subclasses that keep its
``get_user``) and session engines other than the database one keep Django's
own lookups, with users cached for ``SSECHAT_AUTH_CACHE_SECONDS``.
API tokens are cached for ``SSECHAT_AUTH_CACHE_SECONDS`` (default 2): a revoked
token is refused within that time (at once where the revocation is seen), and
its open streams are closed by the revocation itself.

Sync code: call it with ``ssechat.streams.db.run_db``.
"""

from __future__ import annotations

import time
from importlib import import_module
from typing import Any

from django.conf import settings
from django.contrib.auth import (
    BACKEND_SESSION_KEY,
    HASH_SESSION_KEY,
    SESSION_KEY,
    get_user_model,
    load_backend,
)
from django.contrib.auth.backends import ModelBackend
from django.contrib.auth.models import AnonymousUser
from django.db import connections, router
from django.utils import timezone
from django.utils.crypto import constant_time_compare

from .userrows import user_rows

DB_SESSIONS = "django.contrib.sessions.backends.db"
_MAX_ENTRIES = 10_000
# Per-request caches Django's ModelBackend leaves on a user instance.
_PERM_CACHES = ("_perm_cache", "_user_perm_cache", "_group_perm_cache")


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

    # list(...) copies in one step: database threads may add entries meanwhile.
    def drop_where(self, predicate) -> None:
        for key, (_, value) in list(self.items.items()):
            if predicate(value):
                self.items.pop(key, None)

    def drop_where_key(self, predicate) -> None:
        for key in list(self.items):
            if predicate(key):
                self.items.pop(key, None)


class _Bounded(dict):
    """A dict that empties itself rather than grow past ``_MAX_ENTRIES``."""

    def put(self, key, value) -> None:
        if len(self) >= _MAX_ENTRIES:
            self.clear()
        self[key] = value


class _UserEntry:
    """A user built from one exact database row, with its session auth hashes."""

    __slots__ = ("fallbacks", "hash", "row", "user")

    def __init__(self, row: tuple, user: Any):
        self.row = row
        self.user = user
        if hasattr(user, "get_session_auth_hash"):
            self.hash = user.get_session_auth_hash()
            self.fallbacks = tuple(user.get_session_auth_fallback_hash())
        else:
            self.hash = None
            self.fallbacks = ()

    def verifies(self, session_hash: str | None) -> bool:
        if self.hash is None:
            return True  # a user model without session hashes (as get_user allows)
        if not session_hash:
            return False
        return constant_time_compare(session_hash, self.hash) or any(
            constant_time_compare(session_hash, fallback) for fallback in self.fallbacks
        )


def _plain_sql_backend(backend: Any) -> bool:
    """True when the backend's ``get_user`` is ModelBackend's: a row lookup by pk."""
    return isinstance(backend, ModelBackend) and type(backend).get_user is ModelBackend.get_user


class StreamAuthenticator:
    def __init__(self) -> None:
        self.engine = import_module(settings.SESSION_ENGINE)
        self.raw_sessions = settings.SESSION_ENGINE == DB_SESSIONS
        ttl = getattr(settings, "SSECHAT_AUTH_CACHE_SECONDS", 2.0)
        self.users = _TTLCache(ttl)  # other backends: (backend path, user id) -> user
        self.tokens = _TTLCache(ttl)
        self.perms = _TTLCache(ttl)  # (user id, permission) -> bool
        self.rows = _Bounded()  # (backend path, user id) -> _UserEntry
        self.session_users = _Bounded()  # session key -> user id (as its data says)
        self.decoded = _Bounded()  # session key -> (session_data, decoded dict)
        self.backends: dict[str, Any] = {}
        # Routing is read once: it depends on the model alone here (no instance hints).
        self.user_model = get_user_model()
        self.user_alias = router.db_for_read(self.user_model)
        self.session_alias = (
            router.db_for_read(self.engine.SessionStore.get_model_class())
            if self.raw_sessions
            else None
        )

    def forget_user(self, user_id: Any) -> None:
        """Drop cached entries of a user (their access was revoked or changed)."""
        self.users.drop_where(lambda user: getattr(user, "pk", None) == user_id)
        self.tokens.drop_where(lambda user: getattr(user, "pk", None) == user_id)
        self.perms.drop_where_key(lambda key: key[0] == user_id)
        for key in list(self.rows):
            if key[1] == user_id:
                self.rows.pop(key, None)

    def forget_all(self) -> None:
        self.users.items.clear()
        self.tokens.items.clear()
        self.perms.items.clear()
        self.rows.clear()

    def has_perm(self, user: Any, perm: str) -> bool:
        """``user.has_perm(perm)``, kept for ``SSECHAT_AUTH_CACHE_SECONDS``.

        Dropped at once when this process changes the user, their groups or
        permissions (or a group's), and with the user on a revocation. Sync code.
        """
        if not user.is_active:
            return False
        key = (user.pk, perm)
        allowed = self.perms.get(key)
        if allowed is None:
            allowed = user.has_perm(perm)
            self.perms.put(key, allowed)
        return allowed

    def _backend(self, path: str) -> Any:
        backend = self.backends.get(path)
        if backend is None:
            backend = self.backends[path] = load_backend(path)
        return backend

    def _decode(self, session_key: str, store: Any, raw: str) -> dict:
        cached = self.decoded.get(session_key)
        if cached is not None and cached[0] == raw:
            return cached[1]
        data = store.decode(raw)
        self.decoded.put(session_key, (raw, data))
        return data

    def _read_session(
        self, store: Any, session_key: str, cursor: Any
    ) -> tuple[dict, tuple | None, Any]:
        """(session data, the user's raw row if read along, the user id it was read for)."""
        table = store.model._meta.db_table
        now = timezone.now()
        known = self.session_users.get(session_key)
        if known is not None and self.user_alias == self.session_alias:
            rows = user_rows(self.user_alias)
            cursor.execute(rows.session_join_sql(table), [rows.pk_param(known), session_key, now])
            found = cursor.fetchone()
            if found is None:
                return {}, None, None
            user_row = tuple(found[1:])
            # No such user: the LEFT JOIN gives NULLs (the primary key is never NULL).
            return (
                self._decode(session_key, store, found[0]),
                None if user_row[rows.pk_index] is None else user_row,
                known,
            )
        cursor.execute(
            f"SELECT session_data FROM {table}"  # noqa: S608 - Django's table
            " WHERE session_key = %s AND expire_date > %s",
            [session_key, now],
        )
        found = cursor.fetchone()
        return (self._decode(session_key, store, found[0]) if found else {}), None, None

    def user_for_session(self, session_key: str | None):
        """``django.contrib.auth.get_user`` for a session key (without writes)."""
        if not session_key:
            return AnonymousUser()
        store = self.engine.SessionStore(session_key)
        if store.session_key is None:  # malformed key
            return AnonymousUser()
        if not self.raw_sessions:
            return self._session_user(session_key, store.load(), None, None, None)
        # One cursor for the session row and, when it is not read along, the user's row.
        with connections[self.session_alias].cursor() as cursor:
            data, user_row, row_user_id = self._read_session(store, session_key, cursor)
            return self._session_user(session_key, data, user_row, row_user_id, cursor)

    def _session_user(
        self, session_key: str, data: dict, user_row: tuple | None, row_user_id: Any, cursor: Any
    ):
        try:
            user_id = self.user_model._meta.pk.to_python(data[SESSION_KEY])
            backend_path = data[BACKEND_SESSION_KEY]
        except Exception:  # a missing key or a bad id: the session is anonymous
            return AnonymousUser()
        if backend_path not in settings.AUTHENTICATION_BACKENDS:
            return AnonymousUser()
        backend = self._backend(backend_path)
        if not _plain_sql_backend(backend):
            return self._other_backend_user(backend, backend_path, user_id, data)
        rows = user_rows(self.user_alias)
        if user_row is None or row_user_id != user_id:
            same_db = cursor is not None and self.user_alias == self.session_alias
            user_row = rows.fetch(user_id, cursor if same_db else None)
            if user_row is None:
                return AnonymousUser()
        self.session_users.put(session_key, user_id)
        key = (backend_path, user_id)
        entry = self.rows.get(key)
        if entry is None or entry.row != user_row:
            user = rows.build(user_row)
            if not backend.user_can_authenticate(user):  # inactive: ModelBackend refuses
                self.rows.pop(key, None)
                return AnonymousUser()
            entry = _UserEntry(user_row, user)
            self.rows.put(key, entry)
        if not entry.verifies(data.get(HASH_SESSION_KEY)):
            return AnonymousUser()
        user = entry.user
        for name in _PERM_CACHES:  # permissions are read afresh by each request
            user.__dict__.pop(name, None)
        return user

    def _other_backend_user(self, backend: Any, backend_path: str, user_id: Any, data: dict):
        cache_key = (backend_path, user_id)
        user = self.users.get(cache_key)
        if user is None:
            user = backend.get_user(user_id)
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

    def cached_user_for_token(self, token: str):
        """The user of ``token`` if the cache has it (no database; safe on the event
        loop), else None."""
        from .models import hash_token

        if not token or len(token) > 200:
            return None
        return self.tokens.get(hash_token(token))

    def user_for_token(self, token: str, *, fresh: bool = False):
        """The user of ``token`` (None if it is invalid or revoked), from the cache
        unless ``fresh``; a user read from the database is kept in the cache."""
        from .middleware import user_for_token_sync
        from .models import hash_token

        key = hash_token(token) if token and len(token) <= 200 else None
        if key is None:
            return None
        user = None if fresh else self.tokens.get(key)
        if user is None:
            user = user_for_token_sync(token)
            if user is not None:
                self.tokens.put(key, user)
            else:
                self.tokens.items.pop(key, None)
        return user


_authenticator: StreamAuthenticator | None = None


def get_authenticator() -> StreamAuthenticator:
    global _authenticator
    if _authenticator is None:
        _authenticator = StreamAuthenticator()
        connect_cache_hooks()
    return _authenticator


# -- dropping cached entries when this process changes a user or a token -------------
# Other processes re-read a session's user row at each connect, learn of revoked
# tokens and deactivated users from the revocation control events (signals.py), and
# keep token users (with their permissions) for SSECHAT_AUTH_CACHE_SECONDS at most.


def _on_user_saved(sender, instance, created, **kwargs) -> None:
    if not created and _authenticator is not None:
        _authenticator.forget_user(instance.pk)


def _on_token_changed(sender, instance, **kwargs) -> None:
    if _authenticator is not None and (
        kwargs.get("created") is None or instance.revoked_at is not None
    ):  # deleted, or saved revoked
        _authenticator.tokens.items.pop(instance.key_hash, None)


def _on_permissions_changed(sender, instance, action, reverse, model, pk_set, **kwargs) -> None:
    """A user's groups or permissions, or a group's permissions, changed."""
    if not action.startswith("post_") or _authenticator is None:
        return
    User = get_user_model()
    if isinstance(instance, User):
        _authenticator.forget_user(instance.pk)
    elif model is User and pk_set is not None:  # a permission's users (reverse side)
        for user_id in pk_set:
            _authenticator.forget_user(user_id)
    else:  # a group changed: which users it has is not worth a query
        _authenticator.forget_all()


def connect_cache_hooks() -> None:
    from django.contrib.auth.models import Group
    from django.db.models.signals import m2m_changed, post_delete, post_save

    from .models import ApiToken

    User = get_user_model()
    post_save.connect(_on_user_saved, sender=User, dispatch_uid="ssechat-authcache-user")
    post_save.connect(_on_token_changed, sender=ApiToken, dispatch_uid="ssechat-authcache-token")
    post_delete.connect(
        _on_token_changed, sender=ApiToken, dispatch_uid="ssechat-authcache-token-del"
    )
    relations = [Group.permissions.through]
    for name in ("groups", "user_permissions"):
        field = next((f for f in User._meta.many_to_many if f.name == name), None)
        if field is not None:
            relations.append(field.remote_field.through)
    for through in relations:
        m2m_changed.connect(
            _on_permissions_changed,
            sender=through,
            dispatch_uid=f"ssechat-authcache-{through._meta.label_lower}",
        )
