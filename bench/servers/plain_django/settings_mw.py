"""Plain Django with the default middleware of ``startproject``; streams need a session."""

from .settings import *  # noqa: F403

BENCH_MIDDLEWARE = True
INSTALLED_APPS = [*INSTALLED_APPS, "django.contrib.messages"]  # noqa: F405
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]
