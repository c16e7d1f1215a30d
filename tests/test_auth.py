"""Login pages, API tokens, Bearer auth, and 401 JSON (never a redirect) on API URLs."""

import subprocess
import sys

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model

from ssechat.accounts.models import ApiToken, hash_token

from .live import ROOT, server_env

pytestmark = pytest.mark.django_db(transaction=True)


def test_create_api_token_prints_the_token_alone_on_its_last_line(alice):
    result = subprocess.run(
        [sys.executable, "manage.py", "create_api_token", "alice", "--name", "ci"],
        cwd=ROOT, env=server_env(), capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    token = result.stdout.strip().splitlines()[-1]
    assert token.startswith("ssc_") and len(token) > 30
    row = ApiToken.objects.get(user=alice)
    # Only a hash is stored.
    assert row.key_hash == hash_token(token)
    assert token not in row.key_hash
    assert row.prefix == token[:10]


def test_create_api_token_for_an_unknown_user_fails_clearly(transactional_db):
    result = subprocess.run(
        [sys.executable, "manage.py", "create_api_token", "nobody"],
        cwd=ROOT, env=server_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert "No user named 'nobody'" in result.stderr


async def test_bearer_token_acts_as_its_user(live_server, alice, api_token):
    token = await sync_to_async(api_token)(alice)
    async with httpx.AsyncClient(base_url=live_server.url, timeout=5) as client:
        response = await client.get(
            "/api/test/whoami/", headers={"Authorization": f"Bearer {token}"}
        )
        assert response.status_code == 200
        assert response.json() == {"username": "alice"}
        # Streams too.
        async with client.stream(
            "GET", "/api/test/channels/t/stream/", headers={"Authorization": f"Bearer {token}"}
        ) as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")


BAD_HEADERS = ["Bearer nope", "Bearer", "bearer ssc_" + "x" * 43, "Bearer " + "y" * 500]


@pytest.mark.parametrize("header", BAD_HEADERS)
async def test_bad_tokens_get_401_json(live_server, header):
    async with httpx.AsyncClient(base_url=live_server.url, timeout=5) as client:
        response = await client.get("/api/test/whoami/", headers={"Authorization": header})
    assert response.status_code == 401
    assert response.json()["error"] in {"invalid_token", "not_authenticated"}
    assert "location" not in response.headers


async def test_revoked_token_and_inactive_user_are_refused(live_server, alice, api_token):
    token = await sync_to_async(api_token)(alice)
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=live_server.url, timeout=5) as client:
        assert (await client.get("/api/test/whoami/", headers=headers)).status_code == 200
        row = await ApiToken.objects.aget(key_hash=hash_token(token))
        await sync_to_async(row.revoke)()
        response = await client.get("/api/test/whoami/", headers=headers)
        assert response.status_code == 401
        token2 = await sync_to_async(api_token)(alice)
        await get_user_model().objects.filter(pk=alice.pk).aupdate(is_active=False)
        response = await client.get(
            "/api/test/whoami/", headers={"Authorization": f"Bearer {token2}"}
        )
        assert response.status_code == 401


async def test_anonymous_api_and_stream_get_401_not_a_redirect(live_server):
    async with httpx.AsyncClient(base_url=live_server.url, timeout=5) as client:
        for path in ("/api/test/whoami/", "/api/test/channels/t/stream/"):
            response = await client.get(path, headers={"Accept": "text/event-stream"})
            assert response.status_code == 401, path
            assert response.headers["content-type"] == "application/json"
            assert response.json()["error"] == "not_authenticated"


async def test_session_login_and_logout_pages(live_server, make_user):
    await sync_to_async(make_user)("carol", "a long password 123")
    async with httpx.AsyncClient(base_url=live_server.url, timeout=5) as client:
        page = await client.get("/accounts/login/")
        assert page.status_code == 200
        csrf = client.cookies["csrftoken"]
        response = await client.post(
            "/accounts/login/",
            data={
                "username": "carol",
                "password": "a long password 123",
                "csrfmiddlewaretoken": csrf,
            },
            headers={"Referer": live_server.url + "/accounts/login/"},
        )
        assert response.status_code == 302
        assert "sessionid" in client.cookies
        who = await client.get("/api/test/whoami/")
        assert who.json() == {"username": "carol"}, who.text[:300]
        # Logout is a POST with the CSRF token.
        response = await client.post(
            "/accounts/logout/",
            data={"csrfmiddlewaretoken": client.cookies["csrftoken"]},
            headers={"Referer": live_server.url + "/"},
        )
        assert response.status_code == 302
        assert (await client.get("/api/test/whoami/")).status_code == 401


async def test_session_post_needs_csrf_but_bearer_does_not(
    live_server, alice, api_token, login_cookies
):
    cookies = await sync_to_async(login_cookies)(alice)
    token = await sync_to_async(api_token)(alice)
    async with httpx.AsyncClient(base_url=live_server.url, timeout=5, cookies=cookies) as client:
        response = await client.post("/api/test/whoami/")
        assert response.status_code == 403
        assert response.json()["error"] == "csrf_failed"
    async with httpx.AsyncClient(base_url=live_server.url, timeout=5) as client:
        response = await client.post(
            "/api/test/whoami/", headers={"Authorization": f"Bearer {token}"}
        )
        assert response.status_code == 405  # past CSRF: only the method is wrong


def test_tokens_are_listed_and_revoked_in_the_admin(client, make_user):
    admin = make_user("root", is_staff=True, is_superuser=True)
    alice = make_user("alice")
    row, _ = ApiToken.create_for(alice, name="laptop")
    client.force_login(admin)
    page = client.get("/admin/accounts/apitoken/")
    assert page.status_code == 200
    assert row.prefix in page.content.decode()
    response = client.post(
        "/admin/accounts/apitoken/",
        {"action": "revoke_tokens", "_selected_action": [row.pk]},
    )
    assert response.status_code == 302
    row.refresh_from_db()
    assert row.revoked_at is not None
