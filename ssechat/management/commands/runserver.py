"""``manage.py runserver`` on uvicorn (ASGI), so event streams arrive live.

Django's own runserver is WSGI: it holds an async streaming response back
until it ends, so a stream that never ends never arrives. This command keeps
Django's arguments (``addrport``, ``--ipv6``, ``--noreload``, ``--nostatic``)
and serves ``ssechat.asgi:application`` with uvicorn, reloading on code and
template changes and serving static files.
"""

from __future__ import annotations

import os
import sys

from django.conf import settings
from django.contrib.staticfiles.management.commands.runserver import Command as DjangoRunserver
from django.utils import timezone


class Command(DjangoRunserver):
    help = "Starts the ASGI development server (uvicorn): live streams, auto-reload, static files."

    def run(self, **options):
        import uvicorn

        use_reloader = options["use_reloader"]
        if not options.get("use_static_handler", True):
            os.environ["SSECHAT_SERVE_STATIC"] = "0"
        self.stdout.write("Performing system checks…\n\n")
        self.check(display_num_errors=True)
        self.check_migrations()
        addr = f"[{self.addr}]" if self._raw_ipv6 else self.addr
        self.stdout.write(
            f"{timezone.now().strftime('%B %d, %Y - %X')}\n"
            f"Django version {self.get_version()}, using settings {settings.SETTINGS_MODULE!r}\n"
            f"Starting ASGI development server (uvicorn) at http://{addr}:{self.port}/\n"
            f"Quit the server with {'CTRL-BREAK' if sys.platform == 'win32' else 'CONTROL-C'}.\n"
        )
        self.stdout.flush()
        base = str(settings.BASE_DIR)
        uvicorn.run(
            "ssechat.asgi:application",
            host=self.addr,
            port=int(self.port),
            reload=use_reloader,
            reload_dirs=[base] if use_reloader else None,
            reload_includes=["*.py", "*.html"] if use_reloader else None,
            reload_excludes=[".venv/*", "*/.venv/*", "node_modules/*"] if use_reloader else None,
            lifespan="on",
            loop="ssechat.eventloop:new_event_loop",  # uvloop, taking bursts of connections
            log_level="info",
            access_log=True,
        )

    def get_version(self) -> str:
        import django

        return django.get_version()
