"""GET /healthz: 200 with the broker's name, 503 when the database is unreachable."""

import subprocess
import sys
import time

import httpx
import pytest
from django.db import connection

from .live import ROOT, free_port, server_env

pytestmark = pytest.mark.django_db(transaction=True)


def test_healthy(live_server):
    response = httpx.get(live_server.url + "/healthz", timeout=5)
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["database"] == "ok"
    expected = "postgres" if connection.vendor == "postgresql" else "local"
    assert body["broker"] == expected


def test_server_sets_the_collector_thresholds_and_reports_its_time(live_server):
    gc = live_server.stats()["stats"]["gc"]
    assert gc["threshold"] == [10_000, 10, 10]  # SSECHAT_GC_THRESHOLD's default
    assert len(gc["collections"]) == len(gc["seconds"]) == 3
    assert all(n >= 0 for n in gc["collections"]) and all(s >= 0 for s in gc["seconds"])


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("", (10_000, 10, 10)), ("python", None), ("5000, 5, 20", (5000, 5, 20))],
)
def test_gc_threshold_setting(monkeypatch, raw, expected):
    from ssechat.settings import env_gc_threshold

    monkeypatch.setenv("X_GC", raw)
    assert env_gc_threshold("X_GC", (10_000, 10, 10)) == expected


@pytest.mark.parametrize("raw", ["10000", "a,b,c", "0,10,10", "1,2,3,4", "10,-1,5"])
def test_gc_threshold_setting_refuses_what_it_cannot_use(monkeypatch, raw):
    from django.core.exceptions import ImproperlyConfigured

    from ssechat.settings import env_gc_threshold

    monkeypatch.setenv("X_GC", raw)
    with pytest.raises(ImproperlyConfigured, match="X_GC must be three integers"):
        env_gc_threshold("X_GC", (10_000, 10, 10))


def test_database_down_gives_503(log_dir):
    port, dead_port = free_port(), free_port()
    env = server_env(DATABASE_URL=f"postgres://postgres@127.0.0.1:{dead_port}/nothing")
    with open(log_dir / f"healthz-down-{port}.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "ssechat.asgi:application",
             "--host", "127.0.0.1", "--port", str(port), "--lifespan", "on"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            response = None
            while time.monotonic() < deadline:
                try:
                    response = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
                    break
                except httpx.TransportError:
                    time.sleep(0.2)
            assert response is not None, "server did not answer"
            assert response.status_code == 503
            assert response.json()["database"] == "down"
            assert response.json()["status"] == "error"
        finally:
            proc.terminate()
            proc.wait(10)
