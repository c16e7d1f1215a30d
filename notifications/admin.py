"""The notifications admin: saving a new notification sends it; actions mark and re-send."""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.db.models import Count, Exists, OuterRef, Q
from django.http import HttpRequest
from django.utils import timezone
from django.utils.html import format_html
from django.utils.text import Truncator

from . import services
from .models import Notification, NotificationRead


def _broadcast_mode(request: HttpRequest) -> bool:
    return request.GET.get("broadcast") == "1"


class AudienceFilter(admin.SimpleListFilter):
    title = "audience"
    parameter_name = "audience"

    def lookups(self, request, model_admin):
        return [("broadcast", "Broadcast (every user)"), ("direct", "One user")]

    def queryset(self, request, queryset):
        if self.value() == "broadcast":
            return queryset.filter(recipient__isnull=True)
        if self.value() == "direct":
            return queryset.filter(recipient__isnull=False)
        return queryset


class ReadStateFilter(admin.SimpleListFilter):
    """Direct: read by the recipient. Broadcast: read by at least one user."""

    title = "read state"
    parameter_name = "read"

    def lookups(self, request, model_admin):
        return [("unread", "Unread"), ("read", "Read")]

    def queryset(self, request, queryset):
        marked = Exists(NotificationRead.objects.filter(notification=OuterRef("pk")))
        read = Q(recipient__isnull=False, read_at__isnull=False) | (
            Q(recipient__isnull=True) & marked
        )
        if self.value() == "read":
            return queryset.filter(read)
        if self.value() == "unread":
            return queryset.exclude(read)
        return queryset


class NotificationForm(forms.ModelForm):
    class Meta:
        model = Notification
        fields = ["recipient", "level", "topic", "title", "body", "url", "data"]
        widgets = {
            "title": forms.TextInput(attrs={"class": "vTextField", "autofocus": True}),
            "body": forms.Textarea(attrs={"rows": 4, "class": "vLargeTextField"}),
            "url": forms.TextInput(attrs={"class": "vTextField", "placeholder": "/chat/"}),
            "data": forms.Textarea(attrs={"rows": 3, "class": "vLargeTextField"}),
        }

    def clean(self):
        cleaned = super().clean()
        if not self.errors:
            try:
                services.clean_fields(
                    title=cleaned.get("title"),
                    body=cleaned.get("body", ""),
                    level=cleaned.get("level"),
                    topic=cleaned.get("topic"),
                    url=cleaned.get("url", ""),
                    data=cleaned.get("data"),
                )
            except services.InvalidNotification as exc:
                field = exc.field if exc.field in self.fields else None
                self.add_error(field, f"{exc.message[:1].upper()}{exc.message[1:]}")
        return cleaned


@admin.register(Notification)
class NotificationAdmin(admin.ModelAdmin):
    form = NotificationForm
    list_display = ["title_col", "level_col", "topic", "audience_col", "read_col", "created_col"]
    list_display_links = ["title_col"]
    list_filter = [
        "level",
        "topic",
        ReadStateFilter,
        AudienceFilter,
        ("recipient", admin.RelatedOnlyFieldListFilter),
        "created_at",
    ]
    search_fields = ["title", "body", "topic", "recipient__username"]
    date_hierarchy = "created_at"
    autocomplete_fields = ["recipient"]
    list_per_page = 50
    actions = ["mark_read", "mark_unread", "send_again"]
    readonly_fields = ["created_at", "delivery", "event_id"]

    class Media:
        css = {"all": ["css/notifications.css"]}

    def get_queryset(self, request):
        return (
            super()
            .get_queryset(request)
            .select_related("recipient")
            .annotate(read_count=Count("reads"))
        )

    def get_fieldsets(self, request, obj=None):
        audience = [] if obj is None and _broadcast_mode(request) else ["recipient"]
        sets = [
            (None, {"fields": [*audience, "level", "topic"]}),
            ("Message", {"fields": ["title", "body", "url"]}),
            ("Extra data", {"classes": ["collapse"], "fields": ["data"]}),
        ]
        if obj is not None:
            sets.append(("Delivery", {"fields": ["created_at", "delivery", "event_id"]}))
        return sets

    def get_form(self, request, obj=None, change=False, **kwargs):
        if obj is None and _broadcast_mode(request):
            kwargs["fields"] = [f for f in NotificationForm.Meta.fields if f != "recipient"]
        return super().get_form(request, obj, change, **kwargs)

    def changeform_view(self, request, object_id=None, form_url="", extra_context=None):
        extra_context = {**(extra_context or {}), "broadcast_mode": _broadcast_mode(request)}
        return super().changeform_view(request, object_id, form_url, extra_context)

    def save_model(self, request, obj, form, change):
        if change:
            obj.save()  # an edit is not sent again: use the "Send again" action
            return
        services.send(obj)  # the admin's transaction: the event goes out on commit

    def response_add(self, request, obj, post_url_continue=None):
        who = "every user" if obj.recipient_id is None else obj.recipient.get_username()
        self.message_user(request, f"Sent “{obj.title}” to {who}.", messages.SUCCESS)
        return super().response_add(request, obj, post_url_continue)

    def message_user(self, request, message, level=messages.INFO, *args, **kwargs):
        # The default "was added successfully" note repeats ours after an add.
        if level == messages.SUCCESS and "was added successfully" in str(message):
            return
        super().message_user(request, message, level, *args, **kwargs)

    # -- columns ---------------------------------------------------------------
    @admin.display(description="title", ordering="title")
    def title_col(self, obj: Notification) -> str:
        body = Truncator(obj.body).chars(80) if obj.body else ""
        return format_html(
            '<span class="notif-admin-title">{}</span><span class="notif-admin-body">{}</span>',
            obj.title,
            body,
        )

    @admin.display(description="sent", ordering="created_at")
    def created_col(self, obj: Notification) -> str:
        local = timezone.localtime(obj.created_at)
        return format_html(
            '<time datetime="{}" title="{}">{}</time>',
            obj.created_at.isoformat(),
            f"{local:%Y-%m-%d %H:%M:%S %Z}",
            f"{local:%b %-d, %H:%M}",
        )

    @admin.display(description="level", ordering="level")
    def level_col(self, obj: Notification) -> str:
        return format_html(
            '<span class="notif-admin-level notif-admin-{}">{}</span>',
            obj.level,
            obj.get_level_display(),
        )

    @admin.display(description="recipient", ordering="recipient__username")
    def audience_col(self, obj: Notification) -> str:
        if obj.recipient_id is None:
            return format_html('<span class="notif-admin-everyone">{}</span>', "Every user")
        return obj.recipient.get_username()

    @admin.display(description="read")
    def read_col(self, obj: Notification) -> str:
        if obj.recipient_id is None:
            count = getattr(obj, "read_count", None)
            if count is None:
                count = obj.reads.count()
            return format_html(
                '<span class="notif-admin-read{}">read by {}</span>',
                "" if count else " is-unread",
                f"{count} user" if count == 1 else f"{count} users",
            )
        if obj.read_at is None:
            return format_html('<span class="notif-admin-read is-unread">{}</span>', "Unread")
        return format_html('<span class="notif-admin-read">{}</span>', "Read")

    @admin.display(description="read state")
    def delivery(self, obj: Notification) -> str:
        if obj.recipient_id is None:
            count = obj.reads.count()
            return f"A broadcast to every user; read by {count} so far."
        if obj.read_at is None:
            return f"Not read yet by {obj.recipient.get_username()}."
        return f"Read by {obj.recipient.get_username()} at {obj.read_at:%Y-%m-%d %H:%M:%S %Z}."

    # -- actions ---------------------------------------------------------------
    @admin.action(description="Mark as read (for their recipients)")
    def mark_read(self, request, queryset):
        changed = services.set_read(queryset, True)
        self.message_user(request, f"Marked {changed} notification(s) read.", messages.SUCCESS)

    @admin.action(description="Mark as unread (for their recipients)")
    def mark_unread(self, request, queryset):
        changed = services.set_read(queryset, False)
        self.message_user(request, f"Marked {changed} notification(s) unread.", messages.SUCCESS)

    @admin.action(description="Send again (unread, live to open feeds)")
    def send_again(self, request, queryset):
        count = services.resend(queryset)
        self.message_user(request, f"Sent {count} notification(s) again.", messages.SUCCESS)
