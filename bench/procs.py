"""Server processes: uvicorn pinned to one CPU, measured from outside with psutil."""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
SERVER_CPU = 0
LOAD_CPU = 1


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def nofile_limits() -> tuple[int, int]:
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def raise_nofile(want: int | None = None) -> tuple[int, int]:
    """Soft limit up to the hard limit; try the hard limit too (needs CAP_SYS_RESOURCE)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if want and want > hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def pin(cpu: int) -> None:
    if hasattr(os, "sched_setaffinity") and cpu < (os.cpu_count() or 1):
        os.sched_setaffinity(0, {cpu})


def _server_preexec(cpu: int, nofile: int | None) -> None:
    pin(cpu)
    raise_nofile(nofile)


class ServerProc:
    """One server process (a single uvicorn worker). ``url``, ``pid``, measurements."""

    def __init__(
        self,
        name: str,
        command: list[str],
        env: dict[str, str],
        log_path: Path,
        port: int,
        *,
        cpu: int = SERVER_CPU,
        nofile: int | None = None,
    ):
        self.name, self.command, self.env, self.log_path = name, command, env, log_path
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.cpu = cpu
        self.nofile = nofile
        self.proc: subprocess.Popen | None = None
        self.ps: psutil.Process | None = None

    def start(self, probe: str = "/", timeout: float = 60.0) -> ServerProc:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.command, cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=lambda: _server_preexec(self.cpu, self.nofile),
        )  # fmt: skip
        self.ps = psutil.Process(self.proc.pid)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited early:\n{self.log()}")
            try:
                httpx.get(self.url + probe, timeout=2)  # any HTTP answer: it is up
                return self
            except httpx.HTTPError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} did not start in {timeout}s:\n{self.log()}")

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    def log(self, tail: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    # -- measurements (psutil; the process is one uvicorn worker) -------------
    def rss(self) -> int:
        return self.ps.memory_info().rss

    def cpu_seconds(self) -> float:
        return cpu_seconds_of(self.ps)

    def system_cpu_seconds(self) -> float:
        """The kernel's part of :meth:`cpu_seconds` (system calls, thread wake-ups)."""
        return self.ps.cpu_times().system

    def main_thread_cpu_seconds(self) -> float:
        """CPU time of the main thread (the event loop); the rest is other threads'."""
        for thread in self.ps.threads():
            if thread.id == self.ps.pid:
                return thread.user_time + thread.system_time
        return 0.0

    def threads(self) -> int:
        return self.ps.num_threads()

    def fds(self) -> int:
        return self.ps.num_fds()

    def sqlite_handles(self, db_path: str) -> int:
        """Open file handles on the SQLite database file (a proxy for DB connections)."""
        try:
            return sum(1 for f in self.ps.open_files() if f.path == db_path)
        except psutil.Error:
            return -1

    async def wait_fds_below(self, limit: int, timeout: float = 20.0) -> int:
        """Wait (on the event loop) until the server has let go of closed streams."""
        import asyncio

        deadline = time.monotonic() + timeout
        fds = self.fds()
        while fds > limit and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            fds = self.fds()
        return fds

    def stop(self, timeout: float = 8.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode


def uvicorn_command(
    app: str, port: int, *, lifespan: str = "on", loop: str = "uvloop"
) -> list[str]:
    return [
        sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port),
        "--loop", loop, "--http", "httptools", "--no-access-log", "--lifespan", lifespan,
        "--log-level", "warning", "--timeout-graceful-shutdown", "2", "--backlog", "4096",
    ]  # fmt: skip


def machine() -> dict:
    """What the figures were measured on."""
    import django
    import uvicorn

    model = platform.processor()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    versions = {"python": platform.python_version(), "django": django.get_version(),
                "uvicorn": uvicorn.__version__}  # fmt: skip
    for module in ("uvloop", "httptools", "django_eventstream", "psycopg"):
        with contextlib.suppress(Exception):
            versions[module] = __import__(module).__version__
    with contextlib.suppress(Exception):
        from importlib.metadata import version

        versions["django_eventstream"] = version("django-eventstream")
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "versions": versions,
        "nofile": list(nofile_limits()),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


def cpu_seconds_of(process: psutil.Process | int) -> float:
    """User and system CPU time of a process (or pid) so far."""
    times = (
        process if isinstance(process, psutil.Process) else psutil.Process(process)
    ).cpu_times()
    return times.user + times.system
