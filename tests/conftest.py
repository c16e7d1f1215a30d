from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.db import connection
from django.test import Client

from ssechat.accounts.models import ApiToken

from .live import LiveServer, runserver, uvicorn_server

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def pytest_collection_modifyitems(config, items):
    chromium = shutil.which("chromium") or os.path.exists("/usr/bin/chromium")
    on_postgres = connection.vendor == "postgresql"
    for item in items:
        if "browser" in item.keywords and not chromium:
            item.add_marker(pytest.mark.skip(reason="Debian's chromium is not installed"))
        if "postgres" in item.keywords and not on_postgres:
            item.add_marker(pytest.mark.skip(reason="needs DATABASE_URL on PostgreSQL"))


@pytest.fixture(scope="session")
def log_dir() -> Path:
    path = ARTIFACTS / "logs"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session", autouse=True)
def _close_worker_thread_connections(django_db_setup, django_db_blocker):
    """Async tests run ORM code on asgiref's worker thread; close its connection
    before the test database is dropped."""
    yield
    from asgiref.sync import SyncToAsync
    from django.db import connections

    SyncToAsync.single_thread_executor.submit(connections.close_all).result(timeout=10)
    if connection.vendor == "postgresql":
        # Whatever else is still connected (a thread of a test, a server being torn
        # down) would stop the test database from being dropped.
        with django_db_blocker.unblock(), connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )


def _is_deadlock(error: BaseException | None) -> bool:
    while error is not None:
        if "deadlock detected" in str(error):
            return True
        error = error.__cause__
    return False


@pytest.fixture(scope="session", autouse=True)
def _flush_retries_a_deadlock():
    """The flush after a transactional test TRUNCATEs every table; on PostgreSQL it can
    deadlock with a live server's last write of that test (an answer being cancelled
    after its client left takes a row lock on one table, then wants another that the
    TRUNCATE already holds). PostgreSQL aborts one side; when that is the flush, run it
    again once the server's transaction is through."""
    from django.test import TransactionTestCase

    original = TransactionTestCase._fixture_teardown

    def fixture_teardown(self):
        for attempt in range(5):
            try:
                return original(self)
            except Exception as error:
                if attempt == 4 or not _is_deadlock(error):
                    raise
                time.sleep(0.2)

    TransactionTestCase._fixture_teardown = fixture_teardown
    yield
    TransactionTestCase._fixture_teardown = original


@pytest.fixture(autouse=True)
def _live_server_helper():
    """Replace pytest-django's hook for its own (WSGI) live_server: ours is uvicorn."""
    yield


@pytest.fixture(scope="session")
def live_server(django_db_setup, django_db_blocker, log_dir) -> LiveServer:
    """One uvicorn server for the session, on the test database."""
    with django_db_blocker.unblock():
        server = uvicorn_server(log_dir, SSECHAT_KEEPALIVE_SECONDS="1").start()
    yield server
    server.stop()


@pytest.fixture
def start_server(django_db_blocker, log_dir):
    """Start extra servers (own settings, several workers); all are stopped after the test."""
    servers: list[LiveServer] = []

    def start(kind: str = "uvicorn", **env) -> LiveServer:
        with django_db_blocker.unblock():
            factory = runserver if kind == "runserver" else uvicorn_server
            server = factory(log_dir, **env)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def make_user(transactional_db):
    User = get_user_model()

    def make(username: str = "alice", password: str = "correct horse battery", **extra):
        return User.objects.create_user(username=username, password=password, **extra)

    return make


@pytest.fixture
def alice(make_user):
    return make_user("alice")


@pytest.fixture
def bob(make_user):
    return make_user("bob")


def session_cookies(user) -> dict[str, str]:
    """Cookies of a logged-in session for ``user`` (stored in the shared database)."""
    client = Client()
    client.force_login(user)
    client.get("/healthz")
    return {name: morsel.value for name, morsel in client.cookies.items()}


@pytest.fixture
def login_cookies():
    return session_cookies


@pytest.fixture
def api_token():
    def make(user) -> str:
        return ApiToken.create_for(user, name="test")[1]

    return make


from .browser import *  # noqa: F403,E402
