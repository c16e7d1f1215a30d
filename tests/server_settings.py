"""Settings of the servers the tests start: production settings plus test-only URLs."""

from ssechat.settings import *  # noqa: F403

ROOT_URLCONF = "tests.urls"
