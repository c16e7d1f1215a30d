from django.contrib import admin, messages

from .models import ApiToken


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ["prefix", "name", "user", "created_at", "last_used_at", "status"]
    list_filter = [("revoked_at", admin.EmptyFieldListFilter), "created_at"]
    search_fields = ["prefix", "name", "user__username"]
    readonly_fields = ["prefix", "created_at", "last_used_at"]
    fields = ["user", "name", "prefix", "created_at", "last_used_at", "revoked_at"]
    autocomplete_fields = ["user"]
    actions = ["revoke_tokens"]

    @admin.display(description="status")
    def status(self, obj: ApiToken) -> str:
        return "active" if obj.revoked_at is None else "revoked"

    @admin.action(description="Revoke selected tokens")
    def revoke_tokens(self, request, queryset):
        count = 0
        for token in queryset.filter(revoked_at__isnull=True):
            token.revoke()  # saving it ends the streams it opened, on every worker
            count += 1
        self.message_user(request, f"Revoked {count} token(s).", messages.SUCCESS)

    def has_add_permission(self, request):
        # A token's secret is shown only once, by `manage.py create_api_token`.
        return False
