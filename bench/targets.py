"""The servers compared, and how each is started, streamed from and published to."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .load import marker
from .procs import ROOT

# Events are about 128 bytes of data on the wire for the peers (the figure).
PAYLOAD_CHARS = 120
SECRET_KEY = "bench-only-secret-key-not-for-production-0123456789abcdef"


@dataclass
class Target:
    key: str
    label: str
    app: str
    settings: str | None
    stream_path: str
    publish_path: str
    lifespan: str = "off"
    probe: str = "/"
    session_auth: bool = False
    bearer_publish: bool = False
    needs_db: bool = False
    resume: bool = False
    notifications: bool = False  # ssechat's real notifications feed and API
    # uvicorn's --loop. ssechat runs on its own (uvloop, taking bursts of connections
    # at once: ssechat.eventloop), as its README's production command does.
    loop: str = "uvloop"
    env: dict[str, str] = field(default_factory=dict)

    def publish_body(self, seq: int, due_ns: int) -> bytes:
        if self.notifications:
            body = {
                "recipient": None, "topic": "bench", "level": "info", "title": "bench",
                "body": marker(seq, due_ns, 100), "url": "", "data": {},
            }  # fmt: skip
        elif self.key == "ssechat":
            body = {"recipient": None, "m": marker(seq, due_ns, PAYLOAD_CHARS)}
        else:
            body = {"m": marker(seq, due_ns, PAYLOAD_CHARS)}
        return json.dumps(body, separators=(",", ":")).encode()

    def server_env(self, base: dict[str, str], db: str) -> dict[str, str]:
        env = dict(base)
        env.update(
            SECRET_KEY=SECRET_KEY, DEBUG="0", ALLOWED_HOSTS="127.0.0.1,localhost",
            SESSION_COOKIE_SECURE="0", CSRF_COOKIE_SECURE="0", PYTHONUNBUFFERED="1",
            PYTHONPATH=str(ROOT),
        )  # fmt: skip
        if self.settings:
            env["DJANGO_SETTINGS_MODULE"] = self.settings
        if self.key == "ssechat":
            env["DATABASE_URL"] = db if "://" in db else f"sqlite:///{db}"
            env["SSECHAT_STATS"] = "1"
        else:
            env["BENCH_DB"] = db
        env.update(self.env)
        return env


def notifications_available() -> bool:
    """True once the notifications app serves its feed and publish API."""
    urls = ROOT / "notifications" / "urls.py"
    views = ROOT / "notifications" / "views.py"
    try:
        text = urls.read_text()
    except OSError:
        return False
    return views.exists() and "stream" in text


def make_targets(
    ssechat_feed: str = "auto",
    ssechat_log_level: str = "WARNING",
    ssechat_loop: str = "ssechat.eventloop:new_event_loop",
) -> list[Target]:
    feed = ssechat_feed
    if feed == "auto":
        feed = "notifications" if notifications_available() else "core"
    if feed == "notifications":
        ssechat = Target(
            "ssechat", "ssechat", "ssechat.asgi:application", "ssechat.settings",
            "/api/notifications/stream/", "/api/notifications/", lifespan="on", probe="/healthz",
            session_auth=True, bearer_publish=True, needs_db=True, resume=True,
            notifications=True,
        )  # fmt: skip
    else:
        ssechat = Target(
            "ssechat", "ssechat (core feed)", "ssechat.asgi:application",
            "bench.servers.ssechat_core.settings", "/api/bench/stream/", "/api/bench/publish/",
            lifespan="on", probe="/healthz", session_auth=True, bearer_publish=True,
            needs_db=True, resume=True,
        )  # fmt: skip
    ssechat.env["LOG_LEVEL"] = ssechat_log_level
    ssechat.loop = ssechat_loop
    return [
        Target("bare", "bare ASGI broadcaster", "bench.servers.bare:app", None, "/stream",
               "/publish", lifespan="on", probe="/nothing"),
        Target("django", "plain Django async view (no auth)",
               "bench.servers.plain_django.asgi:application",
               "bench.servers.plain_django.settings", "/stream", "/publish", probe="/nothing"),
        Target("django-mw", "plain Django + default middleware",
               "bench.servers.plain_django.asgi:application",
               "bench.servers.plain_django.settings_mw", "/stream", "/publish", probe="/nothing",
               session_auth=True, needs_db=True),
        Target("eventstream", "django-eventstream 5.3",
               "bench.servers.eventstream.asgi:application", "bench.servers.eventstream.settings",
               "/events/", "/publish", probe="/nothing", session_auth=True, needs_db=True,
               resume=True),
        ssechat,
    ]  # fmt: skip


def cookie_headers(creds: dict | None) -> list[str]:
    """One ``Cookie:`` header line per user session (streams go round-robin over them)."""
    if not creds:
        return [""]
    name = creds["cookie_name"]
    return [f"Cookie: {name}={key}\r\n" for key in creds["sessions"]]


def bearer_header(creds: dict | None) -> str:
    if not creds or not creds.get("token"):
        return ""
    return f"Authorization: Bearer {creds['token']}\r\n"


def load_json(path: Path) -> dict:
    return json.loads(path.read_text())
