"""Settings of test servers that also serve the OpenAI-compatible URLs (chat.openai_urls)."""

import os

from tests.server_settings import *  # noqa: F403

ROOT_URLCONF = "tests.openai_urls"

# Until ssechat/settings.py reads it from the environment.
SSECHAT_OPENAI_CANCEL_ON_DISCONNECT = os.environ.get(
    "SSECHAT_OPENAI_CANCEL_ON_DISCONNECT", ""
).strip().lower() in {"1", "true", "yes", "on"}
