"""The notifications pages: the JavaScript one and the htmx one (plus its fragments)."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_POST

from ssechat.streams.hub import get_hub
from ssechat.streams.log import latest_id

from . import services
from .models import Level, Notification
from .presenters import fragment_context

PAGE_SIZE = 20
MAX_PK = 2**63 - 1


def stream_position() -> int | None:
    """An event id every event of which this process has seen; None before the hub starts.

    A page that renders its list after reading it can resume its stream from
    it: what is committed later is sent, nothing in between is lost (duplicates
    are dropped by id on the page).
    """
    hub = get_hub()
    broker = hub.broker
    if hub.loop is None or broker is None:
        return None  # not serving streams in this process (e.g. a WSGI server)
    if broker.name == "local":
        # SQLite commits ids in order, so every id up to the newest is committed; the
        # hub may not have polled another process's writes yet, and a page rendering
        # newer state than its position would get older events replayed over it.
        return max(hub.horizon, latest_id())
    return hub.horizon


@require_GET
@login_required
def index(request: HttpRequest) -> HttpResponse:
    return render(
        request,
        "notifications/index.html",
        {
            "topics": services.topics_for(request.user),
            "unread_count": services.unread_count(request.user),
            "page_size": PAGE_SIZE,
            "levels": Level.values,
        },
    )


def _page(user, before: int | None = None) -> tuple[list[dict], int | None]:
    """One page of items for the htmx templates, and the id to load older ones from."""
    rows = services.list_for(user, before=before, limit=PAGE_SIZE + 1)
    more = len(rows) > PAGE_SIZE
    rows = rows[:PAGE_SIZE]
    items = [fragment_context(row) for row in rows]
    return items, (rows[-1]["id"] if more else None)


@require_GET
@login_required
def htmx_page(request: HttpRequest) -> HttpResponse:
    position = stream_position()  # before the list is read
    items, older = _page(request.user)
    return render(
        request,
        "notifications/htmx.html",
        {
            "items": items,
            "older": older,
            "position": position,
            "unread_count": services.unread_count(request.user),
        },
    )


@require_GET
@login_required
def htmx_items(request: HttpRequest) -> HttpResponse:
    """Items for the htmx page: older ones (``before=<id>``), or the first page again."""
    raw = request.GET.get("before", "")
    if raw and (not raw.isdigit() or len(raw) > 18):
        return HttpResponse("before must be a notification id", status=400)
    items, older = _page(request.user, int(raw) if raw else None)
    return render(request, "notifications/_items.html", {"items": items, "older": older})


@require_GET
@login_required
def unread_badge(request: HttpRequest) -> HttpResponse:
    """The htmx page's unread counter, re-fetched on each ``unread`` event."""
    return render(
        request,
        "notifications/_unread_count.html",
        {"unread_count": services.unread_count(request.user)},
    )


@require_POST
@login_required
def read_one(request: HttpRequest, pk: int) -> HttpResponse:
    try:
        if pk > MAX_PK:
            raise Notification.DoesNotExist
        services.mark_read(request.user, pk)
    except Notification.DoesNotExist as exc:
        raise Http404("No such notification.") from exc
    if not request.htmx:
        return redirect("notifications:htmx")
    row = Notification.objects.visible_to(request.user).with_read_state(request.user).get(pk=pk)
    item = fragment_context(row.to_json(read=row.is_read))
    return render(request, "notifications/_item.html", {"item": item})


@require_POST
@login_required
def read_all(request: HttpRequest) -> HttpResponse:
    services.mark_all_read(request.user)
    if not request.htmx:
        return redirect("notifications:htmx")
    items, older = _page(request.user)
    return render(request, "notifications/_items.html", {"items": items, "older": older})
