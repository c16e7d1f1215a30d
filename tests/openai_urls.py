"""Test URLs plus the OpenAI-compatible ones (until ssechat/urls.py includes them)."""

from django.urls import include, path

from tests.urls import urlpatterns as test_urlpatterns

urlpatterns = [
    path("", include("chat.openai_urls")),
    *test_urlpatterns,
]
