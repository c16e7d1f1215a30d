"""Ending streams when access is revoked, on every worker and host.

Revocations are control events in the event log (channel ``ssechat:control``):
every process's broker reads them like any event and its hub closes the
matching streams. Credentials are named by a hash, never stored in the log.
"""

from __future__ import annotations

import hashlib

from .hub import CONTROL_CHANNEL
from .log import publish


def session_auth_key(session_key: str) -> str:
    return "s:" + hashlib.sha256(session_key.encode()).hexdigest()[:32]


def token_auth_key(token: str) -> str:
    from ssechat.accounts.models import hash_token

    return token_key_from_hash(hash_token(token))


def token_key_from_hash(key_hash: str) -> str:
    return "t:" + key_hash[:32]


def close_user_streams(user_id: int) -> int:
    """End every open stream of a user (in the caller's transaction, after commit)."""
    return publish(CONTROL_CHANNEL, "close_user", {"user_id": user_id})


def close_credential_streams(auth_key: str) -> int:
    """End the streams opened with one session or one API token."""
    return publish(CONTROL_CHANNEL, "close_auth", {"key": auth_key})
