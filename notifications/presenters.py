"""What the HTML templates need of a notification (the fragment, the htmx page)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from .models import Level, is_safe_link

LEVEL_LABELS = dict(Level.choices)


def fragment_context(payload: dict[str, Any], *, live: bool = False) -> dict[str, Any]:
    """Context of ``notifications/_item.html`` for a Notification JSON dict.

    The same fragment is sent to every user who receives the event, so it
    holds nothing per user (no CSRF token: the page's ``hx-headers`` adds it).
    """
    created = payload.get("created_at")
    if isinstance(created, str):
        try:
            created = datetime.fromisoformat(created)
        except ValueError:
            created = None
    level = payload.get("level")
    if level not in LEVEL_LABELS:
        level = Level.INFO
    url = payload.get("url") or ""
    return {
        "n": payload,
        "level": level,
        "level_label": LEVEL_LABELS[level],
        "created": created if isinstance(created, datetime) else None,
        # Only http(s) and site paths become links: never javascript: or data:.
        "link": url if is_safe_link(url) else "",
        "live": live,
        "read": bool(payload.get("read")),
    }
