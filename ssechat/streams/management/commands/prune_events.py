from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from ssechat.streams.retention import prune_events


class Command(BaseCommand):
    help = (
        "Delete old events from the event log (defaults: SSECHAT_EVENT_RETENTION_SECONDS and "
        "SSECHAT_EVENT_RETENTION_COUNT). Clients resuming from a pruned id get a `reset` event."
    )

    def add_arguments(self, parser):
        parser.add_argument("--max-age", type=float, help="seconds of events to keep")
        parser.add_argument("--keep", type=int, help="number of newest events to keep")

    def handle(self, *args, max_age=None, keep=None, **options):
        if max_age is None:
            max_age = settings.SSECHAT_EVENT_RETENTION_SECONDS
        if keep is None:
            keep = settings.SSECHAT_EVENT_RETENTION_COUNT
        if max_age < 0 or keep < 0:
            raise CommandError("--max-age and --keep must not be negative")
        deleted, pruned = prune_events(max_age, keep)
        self.stdout.write(f"Deleted {deleted} event(s); the log now starts after #{pruned}.")
