"""Settings for ssechat, read from the environment with safe defaults.

Every setting a deployment changes comes from an environment variable; see the
README for the list. ``DEBUG`` is off unless asked for (``manage.py runserver``
and ``make run`` turn it on), and with ``DEBUG`` off a ``SECRET_KEY`` is required.
"""

from __future__ import annotations

import os
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


def env_bool(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name} must be an integer, got {value!r}") from exc


def env_gc_threshold(name: str, default: tuple[int, int, int]) -> tuple[int, int, int] | None:
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value == "python":
        return None
    try:
        parts = tuple(int(part) for part in value.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or parts[0] < 1 or min(parts) < 0:
        raise ImproperlyConfigured(
            f"{name} must be three integers like 10000,10,10 (or 'python'), got {value!r}"
        )
    return parts  # type: ignore[return-value]


def env_float(name: str, default: float) -> float:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return float(value)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name} must be a number, got {value!r}") from exc


def env_list(name: str, default: list[str]) -> list[str]:
    value = os.environ.get(name)
    if value is None:
        return default
    return [item.strip() for item in value.split(",") if item.strip()]


DEBUG = env_bool("DEBUG")

SECRET_KEY = os.environ.get("SECRET_KEY", "")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "SECRET_KEY must be set when DEBUG is off "
            "(for local development use `make run`, which turns DEBUG on)."
        )
    SECRET_KEY = "django-insecure-development-only-key-do-not-use-in-production"  # noqa: S105

ALLOWED_HOSTS = env_list(
    "ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"] if DEBUG else ["localhost", "127.0.0.1"]
)
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    # ssechat comes before staticfiles so that its ASGI runserver wins.
    "ssechat",
    "ssechat.streams",
    "ssechat.accounts",
    "chat",
    "notifications",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_htmx",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "ssechat.accounts.middleware.BearerTokenMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "ssechat.api.ApiExceptionMiddleware",
]

ROOT_URLCONF = "ssechat.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

WSGI_APPLICATION = "ssechat.wsgi.application"
ASGI_APPLICATION = "ssechat.asgi.application"

# Database: SQLite file by default, anything dj-database-url reads otherwise.
DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("DATABASE_URL") or f"sqlite:///{BASE_DIR / 'db.sqlite3'}",  # empty: unset
        conn_max_age=env_int("DB_CONN_MAX_AGE", 0),  # 0: no per-thread leak under ASGI
        conn_health_checks=True,
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Django's backend, with this process's writers taking turns on a lock rather than
    # sleeping in SQLite's busy handler (ssechat/sqlite3/base.py).
    DATABASES["default"]["ENGINE"] = "ssechat.sqlite3"
    # WAL lets the server read while `manage.py notify` writes; IMMEDIATE makes
    # writers queue on the busy timeout instead of failing with "locked".
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 20,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
    DATABASES["default"]["CONN_MAX_AGE"] = 0

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/chat/"
LOGOUT_REDIRECT_URL = "/accounts/login/"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "/static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = Path(os.environ.get("STATIC_ROOT", BASE_DIR / "staticfiles"))

# Security: secure defaults whenever DEBUG is off (override for plain-HTTP setups).
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
CSRF_COOKIE_SAMESITE = "Lax"
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", not DEBUG)
CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", not DEBUG)
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", False)
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", False)
if env_bool("SECURE_PROXY_SSL_HEADER"):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

CSRF_FAILURE_VIEW = "ssechat.api.csrf_failure"

DATA_UPLOAD_MAX_MEMORY_SIZE = env_int("DATA_UPLOAD_MAX_MEMORY_SIZE", 1024 * 1024)

# --- ssechat -----------------------------------------------------------------
# Streams (see README "Settings").
SSECHAT_KEEPALIVE_SECONDS = env_float("SSECHAT_KEEPALIVE_SECONDS", 15.0)
SSECHAT_RETRY_MS = env_int("SSECHAT_RETRY_MS", 2000)
SSECHAT_MAX_STREAMS_PER_USER = env_int("SSECHAT_MAX_STREAMS_PER_USER", 20)
SSECHAT_STREAM_MAX_SECONDS = env_float("SSECHAT_STREAM_MAX_SECONDS", 3600.0)
SSECHAT_SUBSCRIBER_QUEUE = env_int("SSECHAT_SUBSCRIBER_QUEUE", 1000)
SSECHAT_STREAM_DB_THREADS = env_int("SSECHAT_STREAM_DB_THREADS", 4)
# Serve GETs to event-stream views on the lean lane (see ssechat/streams/fastlane.py).
SSECHAT_STREAM_FAST_PATH = env_bool("SSECHAT_STREAM_FAST_PATH", True)
# Serve JSON API requests with a Bearer token (and no cookie) on the lean lane (ssechat/apilane.py).
SSECHAT_API_FAST_PATH = env_bool("SSECHAT_API_FAST_PATH", True)
# Live, idle streams are written from the hub's dispatch (no task wake-up per event);
# only with servers whose send/receive allow it (uvicorn). Off: every write from the task.
SSECHAT_DIRECT_WRITES = env_bool("SSECHAT_DIRECT_WRITES", True)
# Event log and broker.
SSECHAT_BROKER = os.environ.get("SSECHAT_BROKER", "")  # "", "postgres" or "local"
SSECHAT_POLL_INTERVAL = env_float("SSECHAT_POLL_INTERVAL", 0.5)
SSECHAT_EVENT_RETENTION_SECONDS = env_float("SSECHAT_EVENT_RETENTION_SECONDS", 7 * 24 * 3600.0)
SSECHAT_EVENT_RETENTION_COUNT = env_int("SSECHAT_EVENT_RETENTION_COUNT", 1_000_000)
# Chat and the language model behind answers.
SSECHAT_LLM_BACKEND = os.environ.get("SSECHAT_LLM_BACKEND", "demo")
SSECHAT_LLM_URL = os.environ.get("SSECHAT_LLM_URL", "")
SSECHAT_LLM_MODEL = os.environ.get("SSECHAT_LLM_MODEL", "")
SSECHAT_LLM_API_KEY = os.environ.get("SSECHAT_LLM_API_KEY", "")
SSECHAT_LLM_CONNECT_TIMEOUT = env_float("SSECHAT_LLM_CONNECT_TIMEOUT", 5.0)
SSECHAT_LLM_READ_TIMEOUT = env_float("SSECHAT_LLM_READ_TIMEOUT", 60.0)
SSECHAT_DEMO_TOKENS_PER_SECOND = env_float("SSECHAT_DEMO_TOKENS_PER_SECOND", 30.0)
SSECHAT_CHAT_MAX_MESSAGE_CHARS = env_int("SSECHAT_CHAT_MAX_MESSAGE_CHARS", 32_000)
SSECHAT_CHAT_MAX_ACTIVE_ANSWERS = env_int("SSECHAT_CHAT_MAX_ACTIVE_ANSWERS", 3)
SSECHAT_CHAT_REQUESTS_PER_MINUTE = env_int("SSECHAT_CHAT_REQUESTS_PER_MINUTE", 30)
# Generation: a chunk is stored and published every FLUSH_MS, sooner after FLUSH_CHARS;
# heartbeats every HEARTBEAT_SECONDS; an answer silent for STALE_SECONDS is failed.
SSECHAT_CHAT_FLUSH_MS = env_float("SSECHAT_CHAT_FLUSH_MS", 25.0)
SSECHAT_CHAT_FLUSH_CHARS = env_int("SSECHAT_CHAT_FLUSH_CHARS", 300)
# ...and its text is saved in the answer's row about every SAVE_MS (the deltas since are
# in the event log, and the end of the answer saves all of it).
SSECHAT_CHAT_SAVE_MS = env_float("SSECHAT_CHAT_SAVE_MS", 1000.0)
SSECHAT_CHAT_HEARTBEAT_SECONDS = env_float("SSECHAT_CHAT_HEARTBEAT_SECONDS", 10.0)
SSECHAT_CHAT_STALE_SECONDS = env_float("SSECHAT_CHAT_STALE_SECONDS", 30.0)
# /v1/chat/completions: cancel the stored answer when the API client disconnects early.
SSECHAT_OPENAI_CANCEL_ON_DISCONNECT = env_bool("SSECHAT_OPENAI_CANCEL_ON_DISCONNECT", False)
# Notifications.
SSECHAT_NOTIFICATION_MAX_BODY_CHARS = env_int("SSECHAT_NOTIFICATION_MAX_BODY_CHARS", 10_000)
# Login throttling (failed logins per username / per address within the window).
SSECHAT_LOGIN_MAX_FAILURES = env_int("SSECHAT_LOGIN_MAX_FAILURES", 5)
SSECHAT_LOGIN_MAX_FAILURES_PER_IP = env_int("SSECHAT_LOGIN_MAX_FAILURES_PER_IP", 30)
SSECHAT_LOGIN_WINDOW_SECONDS = env_int("SSECHAT_LOGIN_WINDOW_SECONDS", 900)
# Users and API tokens of stream connects are cached this long (revocation also clears them).
SSECHAT_AUTH_CACHE_SECONDS = env_float("SSECHAT_AUTH_CACHE_SECONDS", 2.0)
# Expose process counters (open streams, tasks, threads) in /healthz: tests and benchmarks.
SSECHAT_STATS = env_bool("SSECHAT_STATS", False)
# The garbage collector's thresholds in a server process (see ssechat/collector.py):
# three integers, or "python" for Python's own (700,10,10).
SSECHAT_GC_THRESHOLD = env_gc_threshold("SSECHAT_GC_THRESHOLD", (10_000, 10, 10))
# Static files served by the ASGI app itself (turn off behind a web server).
SSECHAT_SERVE_STATIC = env_bool("SSECHAT_SERVE_STATIC", True)

LOG_LEVEL = os.environ.get("LOG_LEVEL", "INFO").upper()
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "plain"},
    },
    "root": {"handlers": ["console"], "level": "WARNING"},
    "loggers": {
        "django": {"handlers": ["console"], "level": "WARNING", "propagate": False},
        "ssechat": {"handlers": ["console"], "level": LOG_LEVEL, "propagate": False},
        "chat": {"handlers": ["console"], "level": LOG_LEVEL, "propagate": False},
        "notifications": {"handlers": ["console"], "level": LOG_LEVEL, "propagate": False},
    },
}
