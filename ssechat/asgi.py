"""ASGI entry point: ``uvicorn ssechat.asgi:application``."""

import os

from django import setup

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "ssechat.settings")
setup(set_prefix=False)

from django.conf import settings  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402

from ssechat.streams.handler import ASGIHandler  # noqa: E402

django_application = ASGIHandler()
_static = ASGIStaticFilesHandler(django_application) if settings.SSECHAT_SERVE_STATIC else None
_static_prefix = (
    settings.STATIC_URL if settings.STATIC_URL.startswith("/") else "/" + settings.STATIC_URL
)


async def application(scope, receive, send):
    if _static is not None and scope["type"] == "http" and scope["path"].startswith(_static_prefix):
        await _static(scope, receive, send)
    else:
        await django_application(scope, receive, send)
