"""Real servers for tests: uvicorn (or manage.py runserver) on a free port of 127.0.0.1."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import httpx
from django.db import connection

ROOT = Path(__file__).resolve().parent.parent
TEST_SECRET_KEY = "test-secret-key-only-for-the-test-suite"


def free_port() -> int:
    """A free port below the kernel's ephemeral range (32768+), so that no outgoing
    connection (tests open thousands) can take it between this check and the bind."""
    for _ in range(200):
        port = random.randint(20000, 32000)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found")


def database_url() -> str:
    """A DATABASE_URL for the test database the test process is using."""
    s = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{s['NAME']}"
    if connection.vendor == "postgresql":
        auth = quote(s["USER"] or "")
        if s.get("PASSWORD"):
            auth += ":" + quote(s["PASSWORD"])
        host = s.get("HOST") or "127.0.0.1"
        port = s.get("PORT") or 5432
        return f"postgres://{auth}@{host}:{port}/{s['NAME']}"
    raise RuntimeError(f"no live-server support for {connection.vendor}")


def server_env(**overrides: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DJANGO_SETTINGS_MODULE="tests.server_settings",
        SECRET_KEY=TEST_SECRET_KEY,
        DEBUG="0",
        DATABASE_URL=database_url(),
        ALLOWED_HOSTS="127.0.0.1,localhost",
        SESSION_COOKIE_SECURE="0",
        CSRF_COOKIE_SECURE="0",
        SSECHAT_STATS="1",
        LOG_LEVEL="INFO",
        PYTHONUNBUFFERED="1",
    )
    env.update({k: str(v) for k, v in overrides.items()})
    return env


class LiveServer:
    """A server process; ``url`` is its base URL. Logs go to ``log_path``."""

    def __init__(self, command: list[str], port: int, env: dict[str, str], log_path: Path):
        self.command, self.port, self.env, self.log_path = command, port, env, log_path
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> LiveServer:
        # The log file may hold earlier servers' lines (the same port in an earlier run):
        # log() reads from here on.
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.command, cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                if "address already in use" in self.log() and not getattr(self, "_moved", 0) > 3:
                    # Another process took the port meanwhile: try another one.
                    self._moved = getattr(self, "_moved", 0) + 1
                    self._log.close()
                    self._move_to(free_port())
                    return self.start(timeout)
                raise RuntimeError(f"server exited early:\n{self.log()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not become healthy:\n{self.log()}")

    def _move_to(self, port: int) -> None:
        old = str(self.port)
        self.command = [part.replace(old, str(port)) for part in self.command]
        self.port, self.url = port, f"http://127.0.0.1:{port}"
        self.log_path = self.log_path.with_name(f"{self.log_path.stem}-{port}.log")

    def log(self) -> str:
        """The last 5,000 characters this server wrote to its log."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(getattr(self, "_log_offset", 0))
                return log.read().decode(errors="replace")[-5000:]
        except OSError:
            return ""

    def stats(self) -> dict:
        return httpx.get(self.url + "/healthz", timeout=5).json()

    def wait_for_log(self, timeout: float = 5.0) -> None:
        """Until the server's hub has read every event stored so far (on SQLite it
        polls for other processes' writes, such as a test's own)."""
        from ssechat.streams.log import latest_id

        latest = latest_id()
        deadline = time.monotonic() + timeout
        while self.stats()["stats"]["horizon"] < latest:
            assert time.monotonic() < deadline, "the server did not read the event log"
            time.sleep(0.02)

    def signal(self, sig: int) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        if self.proc:
            self.proc.wait(5)


def uvicorn_server(log_dir: Path, *, workers: int = 1, **env: str) -> LiveServer:
    port = free_port()
    command = [
        sys.executable, "-m", "uvicorn", "ssechat.asgi:application",
        "--host", "127.0.0.1", "--port", str(port), "--lifespan", "on",
        # The production command's loop (README): uvloop that takes bursts of connections.
        "--loop", "ssechat.eventloop:new_event_loop", "--http", "httptools", "--no-access-log",
    ]  # fmt: skip
    if workers > 1:
        command += ["--workers", str(workers)]
    return LiveServer(command, port, server_env(**env), log_dir / f"uvicorn-{port}.log")


def runserver(log_dir: Path, *, reload: bool = False, **env: str) -> LiveServer:
    port = free_port()
    command = [sys.executable, "manage.py", "runserver", f"127.0.0.1:{port}"]
    if not reload:
        command.append("--noreload")
    overrides = {"DEBUG": "1", **env}
    return LiveServer(command, port, server_env(**overrides), log_dir / f"runserver-{port}.log")
