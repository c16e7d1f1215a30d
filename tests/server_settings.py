"""Settings of the servers the tests start: production settings plus test-only URLs."""

from django.conf import global_settings

from ssechat.settings import *  # noqa: F403

ROOT_URLCONF = "tests.urls"

# The test process stores passwords with the fast MD5 hasher; let the servers check them.
PASSWORD_HASHERS = [
    *global_settings.PASSWORD_HASHERS,
    "django.contrib.auth.hashers.MD5PasswordHasher",
]
