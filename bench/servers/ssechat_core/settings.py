from ssechat.settings import *  # noqa: F403

ROOT_URLCONF = "bench.servers.ssechat_core.urls"
