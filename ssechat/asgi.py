"""ASGI entry point: ``uvicorn ssechat.asgi:application``."""

import os

from django import setup

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "ssechat.settings")
setup(set_prefix=False)

from django.conf import settings  # noqa: E402

from ssechat.collector import apply_threshold  # noqa: E402
from ssechat.streams.handler import ASGIHandler  # noqa: E402

apply_threshold(settings.SSECHAT_GC_THRESHOLD)

# The handler itself, not a wrapper coroutine around it: every open stream would keep
# that coroutine's frame for its whole life. It serves static files itself when
# SSECHAT_SERVE_STATIC is on.
application = ASGIHandler(serve_static=settings.SSECHAT_SERVE_STATIC)
django_application = application  # the name earlier versions exported
