from django.urls import path

from . import api, pages, streams

urlpatterns = [
    # The chat page (chat/pages.py).
    path("chat/", pages.chat_page, name="chat"),
    path("chat/<int:pk>/", pages.chat_page, name="chat-conversation"),
    # JSON API.
    path("api/chat/conversations/", api.conversations, name="chat-api-conversations"),
    path("api/chat/conversations/<int:pk>/", api.conversation, name="chat-api-conversation"),
    path(
        "api/chat/conversations/<int:pk>/messages/",
        api.post_message,
        name="chat-api-messages",
    ),
    path("api/chat/messages/<int:pk>/cancel/", api.cancel, name="chat-api-message-cancel"),
    path(
        "api/chat/messages/<int:pk>/regenerate/",
        api.regenerate,
        name="chat-api-message-regenerate",
    ),
    # Event streams.
    path(
        "api/chat/conversations/<int:pk>/stream/",
        streams.conversation_stream,
        name="chat-api-conversation-stream",
    ),
    path(
        "api/chat/messages/<int:pk>/stream/",
        streams.message_stream,
        name="chat-api-message-stream",
    ),
]
