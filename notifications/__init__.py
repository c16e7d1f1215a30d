"""Per-user notification feeds: ``notifications.notify(user_or_None, title=...)``.

The helpers are imported lazily so that importing the package (settings,
``INSTALLED_APPS``) never loads models before Django is set up.
"""

from __future__ import annotations

from typing import Any

__all__ = ["anotify", "notify"]


def notify(*args: Any, **kwargs: Any):
    """Send a notification (sync code). See :func:`notifications.services.notify`."""
    from .services import notify as send

    return send(*args, **kwargs)


async def anotify(*args: Any, **kwargs: Any):
    """Send a notification (async code). See :func:`notifications.services.anotify`."""
    from .services import anotify as send

    return await send(*args, **kwargs)
