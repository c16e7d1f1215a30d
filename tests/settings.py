"""Settings for the test process (servers started by tests use ssechat.settings)."""

import os
import tempfile

os.environ.setdefault("SECRET_KEY", "test-secret-key-only-for-the-test-suite")

from ssechat.settings import *  # noqa: F403
from ssechat.settings import DATABASES

if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # A file, not memory: the uvicorn servers the tests start read the same database.
    DATABASES["default"]["TEST"] = {
        "NAME": os.path.join(tempfile.gettempdir(), f"ssechat-test-{os.getpid()}.sqlite3")
    }

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
