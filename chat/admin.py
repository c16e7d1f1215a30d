"""Admin: conversations with their messages, search, filters, cancel and JSON export."""

from __future__ import annotations

import json

from django.contrib import admin, messages
from django.db.models import Count, Q
from django.http import HttpResponse
from django.utils import timezone
from django.utils.text import Truncator

from .generation import cancel_answer_sync
from .models import Conversation, Message
from .serializers import conversation_json


def _cancel_streaming(request, answers) -> None:
    cancelled = sum(cancel_answer_sync(pk) is not None for pk in answers)
    if cancelled:
        messages.success(request, f"Cancelled {cancelled} streaming answer(s).")
    else:
        messages.info(request, "No answer was streaming.")


def _export(conversations) -> HttpResponse:
    data = []
    for conversation in conversations.select_related("owner"):
        item = conversation_json(conversation, messages=True)
        item["owner"] = conversation.owner.get_username()
        data.append(item)
    if len(data) == 1:
        payload, name = data[0], f"conversation-{data[0]['id']}.json"
    else:
        stamp = timezone.now().strftime("%Y%m%d-%H%M%S")
        payload, name = data, f"conversations-{stamp}.json"
    response = HttpResponse(
        json.dumps(payload, ensure_ascii=False, indent=2),
        content_type="application/json; charset=utf-8",
    )
    response["Content-Disposition"] = f'attachment; filename="{name}"'
    return response


class MessageInline(admin.TabularInline):
    model = Message
    fk_name = "conversation"
    extra = 0
    can_delete = True
    show_change_link = True
    fields = ("id", "role", "status", "content", "error", "model", "created_at", "completed_at")
    readonly_fields = fields
    ordering = ("id",)

    def has_add_permission(self, request, obj=None) -> bool:
        return False


class StreamingFilter(admin.SimpleListFilter):
    title = "answer status"
    parameter_name = "answer_status"

    def lookups(self, request, model_admin):
        return Message.Status.choices

    def queryset(self, request, queryset):
        if self.value():
            return queryset.filter(
                messages__role=Message.Role.ASSISTANT, messages__status=self.value()
            ).distinct()
        return queryset


@admin.register(Conversation)
class ConversationAdmin(admin.ModelAdmin):
    list_display = ("id", "title_or_default", "owner", "message_count", "created_at", "updated_at")
    list_display_links = ("id", "title_or_default")
    list_filter = (StreamingFilter, "owner", "created_at", "updated_at")
    search_fields = ("title", "messages__content", "owner__username")
    date_hierarchy = "created_at"
    readonly_fields = ("created_at", "updated_at")
    raw_id_fields = ("owner",)
    inlines = (MessageInline,)
    actions = ("cancel_streaming_answers", "export_json")

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(_messages=Count("messages"))

    @admin.display(description="title", ordering="title")
    def title_or_default(self, obj: Conversation) -> str:
        return obj.title or "(untitled)"

    @admin.display(description="messages", ordering="_messages")
    def message_count(self, obj: Conversation) -> int:
        return obj._messages

    @admin.action(description="Cancel streaming answers of the selected conversations")
    def cancel_streaming_answers(self, request, queryset):
        answers = Message.objects.filter(
            conversation__in=queryset, status=Message.Status.STREAMING
        ).values_list("id", flat=True)
        _cancel_streaming(request, list(answers))

    @admin.action(description="Export the selected conversations as JSON")
    def export_json(self, request, queryset):
        return _export(queryset.order_by("id"))


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    list_display = ("id", "conversation", "owner", "role", "status", "short_content", "created_at")
    list_filter = ("status", "role", "conversation__owner", "created_at")
    search_fields = ("content", "error", "conversation__title")
    date_hierarchy = "created_at"
    list_select_related = ("conversation__owner",)
    raw_id_fields = ("conversation", "reply_to")
    readonly_fields = (
        "created_at",
        "completed_at",
        "worker",
        "heartbeat_at",
        "start_event_id",
        "last_event_id",
    )
    actions = ("cancel_streaming",)

    @admin.display(description="owner", ordering="conversation__owner")
    def owner(self, obj: Message):
        return obj.conversation.owner

    @admin.display(description="content")
    def short_content(self, obj: Message) -> str:
        return Truncator(" ".join(obj.content.split())).chars(80)

    @admin.action(description="Cancel the selected streaming answers")
    def cancel_streaming(self, request, queryset):
        answers = queryset.filter(Q(status=Message.Status.STREAMING)).values_list("id", flat=True)
        _cancel_streaming(request, list(answers))
