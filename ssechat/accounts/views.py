from django.contrib.auth import views as auth_views
from django.shortcuts import render

from . import throttle


class LoginView(auth_views.LoginView):
    """Django's login view, throttled per username and per client address."""

    template_name = "accounts/login.html"
    redirect_authenticated_user = True

    def post(self, request, *args, **kwargs):
        username = (request.POST.get("username") or "")[:150]
        ip = throttle.client_ip(request)
        wait = throttle.retry_after(username, ip)
        if wait > 0:
            response = render(
                request,
                "accounts/login.html",
                {"form": self.get_form(), "throttled": True, "retry_after": wait},
                status=429,
            )
            response["Retry-After"] = str(wait)
            return response
        return super().post(request, *args, **kwargs)

    def form_invalid(self, form):
        username = (self.request.POST.get("username") or "")[:150]
        if username:
            throttle.record_failure(username, throttle.client_ip(self.request))
        return super().form_invalid(form)

    def form_valid(self, form):
        throttle.clear_failures(form.get_user().get_username())
        return super().form_valid(form)
