"""Template tags of the bell in the page header (templates/notifications/_bell.html)."""

from __future__ import annotations

import asyncio

from django import template

from ..services import unread_count
from ..views import stream_position

register = template.Library()


@register.simple_tag
def notification_position() -> str:
    """Where this page's data stops in the event log (see views.stream_position)."""
    position = stream_position()
    return "" if position is None else str(position)


@register.simple_tag(takes_context=True)
def notification_unread_count(context) -> str:
    """The user's unread count, so the badge is right before the stream connects.

    Empty when rendered inside an event loop (an async view): no query there;
    the stream sends the count a moment later.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        return ""
    request = context.get("request")
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return ""
    return str(unread_count(user))
