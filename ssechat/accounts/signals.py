"""Revoking access ends open streams everywhere: logout, deactivation, token revocation."""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.contrib.auth.signals import user_logged_out
from django.db.models.signals import post_delete, post_save

from ssechat.streams.revocation import (
    close_credential_streams,
    close_user_streams,
    session_auth_key,
    token_key_from_hash,
)

from .models import ApiToken


def on_logout(sender, request, user, **kwargs) -> None:
    session_key = getattr(getattr(request, "session", None), "session_key", None)
    if session_key:
        close_credential_streams(session_auth_key(session_key))


def on_user_saved(sender, instance, created, **kwargs) -> None:
    if not created and not instance.is_active:
        close_user_streams(instance.pk)


def on_token_saved(sender, instance: ApiToken, created, **kwargs) -> None:
    if instance.revoked_at is not None:
        close_credential_streams(token_key_from_hash(instance.key_hash))


def on_token_deleted(sender, instance: ApiToken, **kwargs) -> None:
    close_credential_streams(token_key_from_hash(instance.key_hash))


def forget_revoked(event_type: str, payload: dict) -> None:
    """In every process: drop cached users and tokens of what was revoked."""
    from .fastauth import get_authenticator

    auth = get_authenticator()
    if event_type == "close_user":
        auth.forget_user(payload["user_id"])
    elif event_type == "close_auth" and payload["key"].startswith("t:"):
        prefix = payload["key"][2:]
        auth.tokens.drop_where_key(lambda key: key.startswith(prefix))


def connect() -> None:
    from ssechat.streams.hub import REVOCATION_HOOKS

    user_logged_out.connect(on_logout, dispatch_uid="ssechat-logout-streams")
    post_save.connect(on_user_saved, sender=get_user_model(), dispatch_uid="ssechat-user-streams")
    post_save.connect(on_token_saved, sender=ApiToken, dispatch_uid="ssechat-token-streams")
    post_delete.connect(on_token_deleted, sender=ApiToken, dispatch_uid="ssechat-token-delete")
    if forget_revoked not in REVOCATION_HOOKS:
        REVOCATION_HOOKS.append(forget_revoked)
