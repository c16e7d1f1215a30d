from django.contrib import admin
from django.urls import include, path
from django.views.generic import RedirectView

from . import views

admin.site.site_header = "ssechat administration"
admin.site.site_title = "ssechat admin"

urlpatterns = [
    path("", RedirectView.as_view(url="/chat/", permanent=False)),
    path("healthz", views.healthz, name="healthz"),
    path("demo/", views.demo_page, name="demo"),
    path("demo/stream/", views.demo_stream, name="demo-stream"),
    path("accounts/", include("ssechat.accounts.urls")),
    path("admin/", admin.site.urls),
    path("", include("chat.urls")),
    path("", include("notifications.urls")),
    path("", include("chat.openai_urls")),
]

handler400 = "ssechat.api.bad_request"
handler404 = "ssechat.api.page_not_found"
handler500 = "ssechat.api.server_error"
