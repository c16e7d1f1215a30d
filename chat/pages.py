"""The chat page: an empty shell that static/js/chat.js fills from the JSON API.

The view only checks that the conversation in the URL is the user's (404
otherwise) and passes its id; conversations, messages and streams are all
loaded by the page's script.
"""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_safe

from .models import Conversation

MAX_PK = 2**63 - 1  # beyond a 64-bit key a conversation cannot exist


@require_safe
@login_required
def chat_page(request: HttpRequest, pk: int | None = None) -> HttpResponse:
    if pk is not None and (
        pk > MAX_PK or not Conversation.objects.filter(pk=pk, owner=request.user).exists()
    ):
        raise Http404("No such conversation.")
    return render(request, "chat/page.html", {"conversation_id": pk})
