"""Database set-up for a benchmarked Django server, run in its own process with its settings.

``python -m bench.setup_db users --users N --out F``: migrate, then create N users
with a logged-in session each (Django's SessionStore), plus a staff user with a
Bearer token when the project has API tokens; writes the cookies and the token to F.

``python -m bench.setup_db resume --count N --feed notifications|core``: store N
events for the first bench user as the ssechat feed would (they are "missed" by
a client that resumes from the id printed as ``before``).

``python -m bench.setup_db count-events --after ID``: events stored after ID, per type.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _setup() -> None:
    import django

    os.environ.setdefault("SECRET_KEY", "bench-only-not-secret")
    django.setup()


def create_users(count: int, tokens: int = 0) -> dict:
    from django.apps import apps
    from django.conf import settings
    from django.contrib.auth import (
        BACKEND_SESSION_KEY,
        HASH_SESSION_KEY,
        SESSION_KEY,
        get_user_model,
    )
    from django.contrib.auth.hashers import make_password
    from django.contrib.sessions.backends.db import SessionStore
    from django.db import transaction

    User = get_user_model()
    started = time.monotonic()
    existing = {u.username: u for u in User.objects.filter(username__startswith="bench")}
    # An unusable password: no hashing, and the session hash still works.
    password = make_password(None)
    new = [
        User(username=f"bench{i:05d}", password=password, email=f"bench{i}@example.invalid")
        for i in range(count)
        if f"bench{i:05d}" not in existing
    ]
    User.objects.bulk_create(new, batch_size=500)
    users = list(User.objects.filter(username__startswith="bench").order_by("username")[:count])
    backend = "django.contrib.auth.backends.ModelBackend"
    sessions = []
    with transaction.atomic():
        for user in users:
            store = SessionStore()
            store[SESSION_KEY] = str(user.pk)
            store[BACKEND_SESSION_KEY] = backend
            store[HASH_SESSION_KEY] = user.get_session_auth_hash()
            store.create()
            sessions.append(store.session_key)
    staff, _ = User.objects.get_or_create(
        username="benchstaff", defaults={"is_staff": True, "password": password}
    )
    token = None
    user_tokens: list[str] = []
    if apps.is_installed("ssechat.accounts"):
        from django.contrib.auth.models import Permission

        from ssechat.accounts.models import ApiToken

        perms = Permission.objects.filter(
            content_type__app_label="notifications", codename="add_notification"
        )
        staff.user_permissions.add(*perms)
        token = ApiToken.create_for(staff, name="bench")[1]
        user_tokens = [ApiToken.create_for(user, name="bench")[1] for user in users[:tokens]]
    return {
        "cookie_name": settings.SESSION_COOKIE_NAME,
        "sessions": sessions,
        "user_ids": [u.pk for u in users],
        "usernames": [u.username for u in users],
        "token": token,
        "user_tokens": user_tokens,
        "seconds": round(time.monotonic() - started, 2),
    }


def store_missed_eventstream(count: int, payload_size: int) -> dict:
    """django-eventstream: N stored events on ``broadcast``, as its storage writes them."""
    from django.db import transaction
    from django_eventstream.models import Event, EventCounter

    started = time.monotonic()
    pad = "." * payload_size
    with transaction.atomic():
        counter = EventCounter.get_or_create("broadcast")
        before = counter.value
        rows = [] if before else [Event(channel="broadcast", eid=0)]  # its placeholder
        rows += [
            Event(
                channel="broadcast",
                type="message",
                eid=before + 1 + i,
                data=json.dumps(json.dumps({"m": f"~S{i}:0~{pad}"})),
            )
            for i in range(count)
        ]
        Event.objects.bulk_create(rows, batch_size=1000)
        counter.value = before + count
        counter.save()
    return {"before": before, "last": before + count, "seconds": time.monotonic() - started}


def store_missed(count: int, feed: str, payload_size: int) -> dict:
    from django.contrib.auth import get_user_model
    from django.db import transaction

    if feed == "eventstream":
        return store_missed_eventstream(count, payload_size)

    from ssechat.streams.log import latest_id, publish

    user = get_user_model().objects.filter(username__startswith="bench").order_by("username")[0]
    before = latest_id()
    started = time.monotonic()
    pad = "." * payload_size
    with transaction.atomic():
        if feed == "notifications":
            # The rows notify() writes, made in bulk; each event stored by the core's publish().
            from notifications.models import Notification
            from notifications.services import user_channel

            rows = Notification.objects.bulk_create(
                [
                    Notification(
                        recipient=user, title=f"missed {i}", body=f"~S{i}:0~{pad}", topic="bench"
                    )
                    for i in range(count)
                ],
                batch_size=1000,
            )
            for row in rows:
                publish(user_channel(user.pk), "notification", row.to_json())
        else:
            for i in range(count):
                publish(f"bench:user:{user.pk}", "notification", {"m": f"~S{i}:0~{pad}"})
    return {
        "before": before,
        "last": latest_id(),
        "user": user.username,
        "seconds": round(time.monotonic() - started, 2),
    }


def count_events(after: int) -> dict:
    from django.db.models import Count

    from ssechat.streams.models import Event

    rows = Event.objects.filter(id__gt=after).values("type").annotate(n=Count("id"))
    return {row["type"]: row["n"] for row in rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.setup_db")
    sub = parser.add_subparsers(dest="command", required=True)
    users = sub.add_parser("users")
    users.add_argument("--users", type=int, required=True)
    users.add_argument("--out", required=True)
    users.add_argument("--no-migrate", action="store_true")
    users.add_argument("--tokens", type=int, default=0, help="API tokens for the first N users")
    resume = sub.add_parser("resume")
    resume.add_argument("--count", type=int, default=10_000)
    resume.add_argument("--feed", default="core")
    resume.add_argument("--payload-size", type=int, default=100)
    counts = sub.add_parser("count-events")
    counts.add_argument("--after", type=int, default=0)
    args = parser.parse_args(argv)
    _setup()
    if args.command == "users":
        if not args.no_migrate:
            from django.core.management import call_command

            call_command("migrate", verbosity=0, interactive=False)
        result = create_users(args.users, args.tokens)
        with open(args.out, "w") as f:
            json.dump(result, f)
        print(json.dumps({"users": len(result["sessions"]), "seconds": result["seconds"]}))
    elif args.command == "resume":
        print(json.dumps(store_missed(args.count, args.feed, args.payload_size)))
    elif args.command == "count-events":
        print(json.dumps(count_events(args.after)))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
