"""Password guessing is throttled per username, across workers (state in the database)."""

import pytest
from django.test import Client, override_settings

from ssechat.accounts.models import LoginFailure


def attempt(client: Client, username: str, password: str):
    return client.post("/accounts/login/", {"username": username, "password": password})


@pytest.mark.django_db
@override_settings(SSECHAT_LOGIN_MAX_FAILURES=3, SSECHAT_LOGIN_WINDOW_SECONDS=600)
def test_failures_lock_the_username_then_success_clears(make_user):
    make_user("dana", "the right password 42")
    client = Client()
    for _ in range(3):
        assert attempt(client, "dana", "wrong").status_code == 200
    response = attempt(client, "dana", "the right password 42")
    assert response.status_code == 429
    assert int(response["Retry-After"]) > 0
    assert b"Too many failed attempts" in response.content
    # Another username is not affected by dana's failures.
    make_user("erin", "another right password 7")
    assert attempt(Client(), "erin", "another right password 7").status_code == 302
    # When the window has passed, the right password works and clears the failures.
    LoginFailure.objects.update(created_at="2000-01-01T00:00:00Z")
    assert attempt(client, "dana", "the right password 42").status_code == 302
    assert not LoginFailure.objects.filter(username="dana").exists()


@pytest.mark.django_db
@override_settings(SSECHAT_LOGIN_MAX_FAILURES=100, SSECHAT_LOGIN_MAX_FAILURES_PER_IP=4)
def test_one_address_guessing_many_usernames_is_throttled(make_user):
    make_user("fay", "the right password 42")
    client = Client()
    for name in ["a", "b", "c", "d"]:
        assert attempt(client, name, "guess").status_code == 200
    assert attempt(client, "fay", "the right password 42").status_code == 429
