"""Login throttling against password guessing, shared by every worker (in the database).

After ``SSECHAT_LOGIN_MAX_FAILURES`` failed logins for one username, or
``SSECHAT_LOGIN_MAX_FAILURES_PER_IP`` from one address, within
``SSECHAT_LOGIN_WINDOW_SECONDS``, further attempts are refused (429) until
the window has passed. A successful login clears the username's failures.
"""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from .models import LoginFailure


def client_ip(request) -> str | None:
    # Behind a proxy, configure it to set REMOTE_ADDR (uvicorn --proxy-headers).
    return request.META.get("REMOTE_ADDR") or None


def _window_start():
    return timezone.now() - timedelta(seconds=settings.SSECHAT_LOGIN_WINDOW_SECONDS)


def retry_after(username: str, ip: str | None) -> int:
    """Seconds until a login may be tried again (0: now)."""
    since = _window_start()
    recent = LoginFailure.objects.filter(created_at__gte=since)
    by_name = recent.filter(username=username.lower()).order_by("-created_at")
    by_ip = recent.filter(ip=ip).order_by("-created_at") if ip else LoginFailure.objects.none()
    waits = []
    for queryset, limit in (
        (by_name, settings.SSECHAT_LOGIN_MAX_FAILURES),
        (by_ip, settings.SSECHAT_LOGIN_MAX_FAILURES_PER_IP),
    ):
        times = list(queryset.values_list("created_at", flat=True)[:limit])
        if limit > 0 and len(times) >= limit:
            # Free again when the oldest of the last `limit` failures leaves the window.
            free_at = times[-1] + timedelta(seconds=settings.SSECHAT_LOGIN_WINDOW_SECONDS)
            waits.append(int((free_at - timezone.now()).total_seconds()) + 1)
    return max(waits, default=0)


def record_failure(username: str, ip: str | None) -> None:
    LoginFailure.objects.create(username=username.lower()[:150], ip=ip)
    # Keep the table small: forget what is past every window.
    LoginFailure.objects.filter(created_at__lt=_window_start() - timedelta(days=1)).delete()


def clear_failures(username: str) -> None:
    LoginFailure.objects.filter(username=username.lower()).delete()
