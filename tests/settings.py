"""Settings for the test process (servers started by tests use ssechat.settings)."""

import os
import tempfile

os.environ.setdefault("SECRET_KEY", "test-secret-key-only-for-the-test-suite")

from ssechat.settings import *  # noqa: F403
from ssechat.settings import DATABASES

if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    # A file, not memory: the uvicorn servers the tests start read the same database.
    DATABASES["default"]["TEST"] = {
        "NAME": os.path.join(tempfile.gettempdir(), f"ssechat-test-{os.getpid()}.sqlite3")
    }

elif DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # One test database per run, so that runs side by side do not collide.
    DATABASES["default"]["TEST"] = {"NAME": f"test_ssechat_{os.getpid()}"}

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
