"""Pruning the event log; resuming from before what is kept gets ``reset``."""

from __future__ import annotations

from datetime import timedelta

from django.db import transaction
from django.db.models import Max
from django.utils import timezone

from .models import Event, EventLogState
from .rows import only_row

DELETE_BATCH = 10_000


def prune_cutoff(max_age_seconds: float | None, keep_count: int | None) -> int:
    """The highest id to delete: older than ``max_age_seconds``, or not among the
    newest ``keep_count``."""
    cutoff = 0
    if max_age_seconds is not None and max_age_seconds >= 0:
        before = timezone.now() - timedelta(seconds=max_age_seconds)
        cutoff = Event.objects.filter(created_at__lt=before).aggregate(m=Max("id"))["m"] or 0
    if keep_count is not None and keep_count >= 0:
        latest = Event.objects.aggregate(m=Max("id"))["m"] or 0
        if keep_count == 0:
            cutoff = max(cutoff, latest)
        else:
            nth = Event.objects.order_by("-id").values_list("id", flat=True)[
                keep_count - 1 : keep_count
            ]
            nth_id = next(iter(nth), None)
            if nth_id is not None:
                cutoff = max(cutoff, nth_id - 1)
    return cutoff


def prune_events(max_age_seconds: float | None, keep_count: int | None) -> tuple[int, int]:
    """Delete old events; return (deleted, pruned_through)."""
    cutoff = prune_cutoff(max_age_seconds, keep_count)
    deleted = 0
    if cutoff > 0:
        # Record the watermark first: a resume racing with the delete gets `reset`.
        with transaction.atomic():
            state, _ = EventLogState.objects.select_for_update().get_or_create(pk=1)
            if cutoff > state.pruned_through:
                state.pruned_through = cutoff
                state.save(update_fields=["pruned_through"])
        while True:
            ids = list(
                Event.objects.filter(id__lte=cutoff)
                .order_by("id")
                .values_list("id", flat=True)[:DELETE_BATCH]
            )
            if not ids:
                break
            deleted += Event.objects.filter(id__in=ids).delete()[0]
    pruned = only_row(EventLogState.objects.filter(pk=1).values_list("pruned_through", flat=True))
    return deleted, pruned or 0
