"""The feed's unread count (one plain query) agrees with the ORM's definition."""

from datetime import timedelta

import pytest
from django.utils import timezone

from notifications.models import Notification, NotificationRead
from notifications.services import count_for, unread_count


@pytest.mark.django_db
def test_count_for_matches_unread_count(make_user):
    alice, bob = make_user("alice"), make_user("bob")
    now = timezone.now()
    rows = [
        Notification.objects.create(recipient=alice, title="own unread", event_id=10),
        Notification.objects.create(recipient=alice, title="own read", read_at=now, event_id=11),
        Notification.objects.create(recipient=bob, title="bob's", event_id=12),
        Notification.objects.create(recipient=None, title="broadcast", event_id=13),
        Notification.objects.create(recipient=None, title="read broadcast", event_id=14),
        Notification.objects.create(recipient=alice, title="later", event_id=40),
        Notification.objects.create(recipient=alice, title="no event yet"),
    ]
    old = Notification.objects.create(recipient=None, title="before alice joined", event_id=5)
    Notification.objects.filter(pk=old.pk).update(created_at=alice.date_joined - timedelta(days=1))
    NotificationRead.objects.create(notification=rows[4], user=alice)
    for upto in (None, 12, 13, 39, 40, 1000):
        expected = unread_count(alice, upto=upto)
        assert count_for(alice.pk, alice.date_joined, upto) == expected, upto
    assert count_for(alice.pk, alice.date_joined) == 4
    assert count_for(alice.pk, alice.date_joined, 13) == 3
