"""Revoking access ends the user's open streams on every worker within seconds."""

import asyncio
import time

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model
from django.test import Client

from ssechat.accounts.models import ApiToken, hash_token

from .rawsse import RawStream

pytestmark = pytest.mark.django_db(transaction=True)

STREAM = "/api/test/channels/revoke-{n}/stream/"


async def open_stream(server, n, headers) -> RawStream:
    stream = await RawStream.open("127.0.0.1", server.port, STREAM.format(n=n), headers)
    assert stream.status == 200
    assert await stream.until(lambda p: p.retry is not None)
    return stream


async def ends_within(stream: RawStream, seconds: float) -> float:
    started = time.monotonic()
    assert await stream.until(lambda p: False, timeout=seconds) is False
    return time.monotonic() - started


def logged_in_client(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def cookie_header(client: Client) -> dict[str, str]:
    return {"Cookie": f"sessionid={client.cookies['sessionid'].value}"}


async def test_logout_ends_that_sessions_streams_only(live_server, alice):
    phone = await sync_to_async(logged_in_client)(alice)
    laptop = await sync_to_async(logged_in_client)(alice)
    phone_cookie = cookie_header(phone)
    on_phone = await open_stream(live_server, 1, phone_cookie)
    on_laptop = await open_stream(live_server, 2, cookie_header(laptop))
    await sync_to_async(phone.logout)()
    await ends_within(on_phone, 10)
    # The other session's stream goes on.
    with pytest.raises(TimeoutError):
        await on_laptop.until(lambda p: False, timeout=1.5)
    on_laptop.close()
    async with httpx.AsyncClient(base_url=live_server.url, timeout=5) as client:
        response = await client.get(STREAM.format(n=1), headers=phone_cookie)
        assert response.status_code == 401


async def test_revoking_a_token_ends_its_streams(live_server, alice, api_token):
    token = await sync_to_async(api_token)(alice)
    auth = {"Authorization": f"Bearer {token}"}
    stream = await open_stream(live_server, 3, auth)
    row = await ApiToken.objects.aget(key_hash=hash_token(token))
    await sync_to_async(row.revoke)()
    await ends_within(stream, 10)
    async with httpx.AsyncClient(base_url=live_server.url, timeout=5) as client:
        assert (await client.get(STREAM.format(n=3), headers=auth)).status_code == 401


async def test_deactivating_a_user_ends_all_their_streams(live_server, alice, bob, api_token):
    token = await sync_to_async(api_token)(alice)
    session = await sync_to_async(logged_in_client)(alice)
    bobs = await sync_to_async(logged_in_client)(bob)
    streams = [
        await open_stream(live_server, 4, {"Authorization": f"Bearer {token}"}),
        await open_stream(live_server, 5, cookie_header(session)),
    ]
    other = await open_stream(live_server, 6, cookie_header(bobs))

    def deactivate():
        user = get_user_model().objects.get(pk=alice.pk)
        user.is_active = False
        user.save()

    await sync_to_async(deactivate)()
    await asyncio.gather(*[ends_within(s, 10) for s in streams])
    with pytest.raises(TimeoutError):
        await other.until(lambda p: False, timeout=1.0)
    other.close()


@pytest.mark.postgres
async def test_revocation_reaches_every_worker(start_server, alice, api_token):
    a, b = start_server(), start_server()
    token = await sync_to_async(api_token)(alice)
    auth = {"Authorization": f"Bearer {token}"}
    streams = [await open_stream(a, 7, auth), await open_stream(b, 8, auth)]
    row = await ApiToken.objects.aget(key_hash=hash_token(token))
    await sync_to_async(row.revoke)()
    await asyncio.gather(*[ends_within(s, 10) for s in streams])
