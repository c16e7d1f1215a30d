from django.core.management.base import BaseCommand

from chat.recovery import sweep


class Command(BaseCommand):
    help = (
        "Mark answers nobody is writing any more as failed (their heartbeat is older than "
        "SSECHAT_CHAT_STALE_SECONDS, or their process on this host is gone) and publish their "
        "`done` event. Servers do this by themselves at startup and every "
        "SSECHAT_CHAT_HEARTBEAT_SECONDS; this runs it once by hand."
    )

    def handle(self, *args, **options):
        failed = sweep()
        self.stdout.write(f"Marked {len(failed)} abandoned answer(s) failed.")
