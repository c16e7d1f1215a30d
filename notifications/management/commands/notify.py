"""``manage.py notify --user NAME [--user NAME ...] | --all --title ... [options]``.

Runs in its own process: the servers pick the notification up through the
event log (PostgreSQL NOTIFY, or SQLite's poll of the newest event id).
"""

from __future__ import annotations

import json

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser

from notifications.models import DEFAULT_TOPIC, Level
from notifications.services import InvalidNotification, clean_fields, notify


class Command(BaseCommand):
    help = "Send a notification to some users (--user, repeatable) or to every user (--all)."

    def add_arguments(self, parser: CommandParser) -> None:
        who = parser.add_mutually_exclusive_group(required=True)
        who.add_argument(
            "--user",
            dest="users",
            action="append",
            metavar="NAME",
            help="Recipient's username (repeat for several users).",
        )
        who.add_argument("--all", action="store_true", help="Broadcast to every user.")
        parser.add_argument("--title", required=True)
        parser.add_argument("--body", default="")
        parser.add_argument("--level", default=Level.INFO, help="info, success, warning or error")
        parser.add_argument("--topic", default=DEFAULT_TOPIC)
        parser.add_argument("--url", default="", help="An http(s) URL or a path such as /chat/")
        parser.add_argument("--data", default=None, metavar="JSON", help="e.g. '{\"order\": 42}'")

    def handle(self, *args, **options) -> None:
        data = None
        if options["data"] is not None:
            try:
                data = json.loads(options["data"])
            except ValueError as exc:
                raise CommandError(f"--data is not valid JSON: {exc}") from exc
        fields = {
            "title": options["title"],
            "body": options["body"],
            "level": options["level"],
            "topic": options["topic"],
            "url": options["url"],
            "data": data,
        }
        try:
            clean_fields(**fields)
        except InvalidNotification as exc:
            raise CommandError(f"--{exc.field} {exc.message}") from exc

        recipients: list = [None]
        if not options["all"]:
            User = get_user_model()
            names = list(dict.fromkeys(name.strip() for name in options["users"]))
            found = {
                getattr(u, User.USERNAME_FIELD): u
                for u in User._default_manager.filter(**{f"{User.USERNAME_FIELD}__in": names})
            }
            missing = [name for name in names if name not in found]
            if missing:
                raise CommandError(f"--user: no such user: {', '.join(missing)}")
            recipients = [found[name] for name in names]

        for recipient in recipients:
            notification = notify(recipient, **fields)
            who = "every user" if recipient is None else recipient.get_username()
            self.stdout.write(f"Sent notification {notification.pk} to {who}.")
