"""OpenAI-compatible URLs; the project includes them at the root: ``path("", include(...))``."""

from django.urls import path, re_path

from . import openai_compat

urlpatterns = [
    path("v1/chat/completions", openai_compat.chat_completions, name="openai-chat-completions"),
    path("v1/models", openai_compat.models, name="openai-models"),
    path("v1/models/<path:model>", openai_compat.model_detail, name="openai-model"),
    # Any other /v1/ URL: a 404 in OpenAI's shape, not an HTML page.
    re_path(r"^v1/", openai_compat.not_found),
]
