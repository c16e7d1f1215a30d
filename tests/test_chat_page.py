"""The chat page view (chat.pages.chat_page): who may see it and what it carries.

The page is an empty shell: everything else comes from the JSON API (see
tests/test_chat_browser.py for the page at work in a browser).
"""

from __future__ import annotations

import re

import pytest
from django.test import Client

from chat.models import Conversation, Message

pytestmark = pytest.mark.django_db


@pytest.fixture
def alice(django_user_model):
    return django_user_model.objects.create_user("alice", password="pw")


@pytest.fixture
def bob(django_user_model):
    return django_user_model.objects.create_user("bob", password="pw")


def client_for(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def test_anonymous_is_sent_to_the_login_page(client):
    for path in ("/chat/", "/chat/1/"):
        response = client.get(path)
        assert response.status_code == 302
        assert response["Location"] == f"/accounts/login/?next={path}"


def test_new_chat_page(alice):
    response = client_for(alice).get("/chat/")
    assert response.status_code == 200
    assert response.templates[0].name == "chat/page.html"
    html = response.content.decode()
    assert 'data-conversation=""' in html
    assert 'id="empty-state"' in html
    for asset in ("js/chat.js", "js/chat-markdown.js", "js/chat-worker.js", "css/chat.css"):
        assert f"/static/{asset}" in html
    assert 'aria-current="page"' in html  # the Chat tab of the top bar


def test_own_conversation_page_carries_only_its_id(alice):
    conv = Conversation.objects.create(owner=alice, title="Secret plans")
    Message.objects.create(conversation=conv, role="user", content="the secret message")
    response = client_for(alice).get(f"/chat/{conv.pk}/")
    assert response.status_code == 200
    html = response.content.decode()
    assert f'data-conversation="{conv.pk}"' in html
    # Title and messages are loaded by the script over the API, never put in the page.
    assert "the secret message" not in html
    assert "Secret plans" not in html


def test_someone_elses_or_a_missing_conversation_is_404(alice, bob):
    conv = Conversation.objects.create(owner=bob, title="Bob's")
    client = client_for(alice)
    assert client.get(f"/chat/{conv.pk}/").status_code == 404
    assert client.get(f"/chat/{conv.pk + 1000}/").status_code == 404
    assert client.get(f"/chat/{2**64}/").status_code == 404
    assert client_for(bob).get(f"/chat/{conv.pk}/").status_code == 200


def test_only_get_and_head(alice):
    client = client_for(alice)
    assert client.head("/chat/").status_code == 200
    assert client.post("/chat/").status_code == 405


def test_page_scripts_never_use_inner_html():
    """The page's own scripts build DOM nodes; model and user text is never parsed as HTML."""
    from django.conf import settings

    static = settings.BASE_DIR / "static" / "js"
    for name in ("chat.js", "chat-markdown.js", "chat-worker.js"):
        source = (static / name).read_text()
        code = re.sub(r"/\*.*?\*/|//[^\n]*", "", source, flags=re.S)
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
            assert sink not in code, f"{name} uses {sink}"
