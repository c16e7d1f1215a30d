"""WSGI entry point. Streams need ASGI: serve with uvicorn (see README)."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "ssechat.settings")

application = get_wsgi_application()
