"""Notifications: pages at /notifications/, the JSON API and feed under /api/notifications/."""

from django.urls import path

from . import api, feed, views

app_name = "notifications"

urlpatterns = [
    # JSON API and the live feed (contract: /work/shared/API.md, "Notifications").
    path("api/notifications/", api.notifications, name="api-list"),
    path("api/notifications/read-all/", api.mark_all_read, name="api-read-all"),
    path("api/notifications/stream/", feed.notification_stream, name="stream"),
    path("api/notifications/<int:pk>/read/", api.mark_read, name="api-read"),
    # Pages.
    path("notifications/", views.index, name="index"),
    path("notifications/htmx/", views.htmx_page, name="htmx"),
    path("notifications/htmx/items/", views.htmx_items, name="htmx-items"),
    path("notifications/htmx/unread/", views.unread_badge, name="htmx-unread"),
    path("notifications/htmx/read-all/", views.read_all, name="htmx-read-all"),
    path("notifications/htmx/<int:pk>/read/", views.read_one, name="htmx-read"),
]
