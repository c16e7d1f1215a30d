"""``python -m bench``: start each server on 127.0.0.1, drive it, print the table with ratios.

Servers run on CPU 0, this process (the load generator) on CPU 1. Per server:

1. connect: authenticated streams opened in three bursts (1,000, +1,500,
   +2,500 = 5,000); the connect figure is the sum of the bursts (each until
   every stream got its first bytes); resident memory is sampled after each
   burst, 1 s later, and divided by the streams open.
2. fan-out: 100, then 300, then 1,000 subscribers; at each step events are
   published through the server's publish URL at 10 a second, open loop; every
   subscriber must get every event (losses counted); latency is from the
   event's due time (stamped in it) to its arrival; server CPU time over the
   1,000-subscriber step divided by deliveries gives CPU per delivery.
3. throughput: 100 subscribers, 8 publishers back to back; deliveries a
   second counted at the subscribers while publishing.
4. resume (servers that store events): 10,000 missed events read by one
   client that resumes.
5. idle (full run, bare and ssechat, on a fresh server): as many idle streams
   as one process may hold, opened by helper processes; memory, threads and
   database connections of the server.

Then ssechat alone on PostgreSQL: one worker, and two workers (subscribers
on both, publishes alternating between them). The chat benchmark (bench/chat.py)
runs last when the chat API is in the project.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import gc
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import report
from .load import (
    COUNT,
    HOST,
    IDLE,
    LATENCY,
    Pool,
    Subscribers,
    monotonic_ns,
    new_loop,
    percentile,
    post_request,
    publish_closed_loop,
    publish_open_loop,
)
from .procs import (
    LOAD_CPU,
    ROOT,
    ServerProc,
    free_port,
    machine,
    nofile_limits,
    pin,
    raise_nofile,
    uvicorn_command,
)
from .targets import Target, bearer_header, cookie_headers, make_targets

RESULTS = Path(__file__).resolve().parent / "results"
PG_ADMIN_URL = os.environ.get("BENCH_PG_URL", "postgres://postgres@127.0.0.1:5432/postgres")


@dataclass
class Config:
    quick: bool = False
    connect_steps: tuple[int, ...] = (1000, 2500, 5000)
    connect_window: int = 500
    fanout_steps: tuple[tuple[int, float], ...] = ((100, 6.0), (300, 6.0), (1000, 15.0))
    rate: float = 10.0
    drain_seconds: float = 5.0
    throughput_subs: int = 100
    throughput_seconds: float = 8.0
    throughput_publishers: int = 8
    resume_events: int = 10_000
    idle_streams: int = 20_000
    idle_targets: tuple[str, ...] = ("bare", "ssechat")
    users: int = 2000
    pg: bool = True
    chat: bool = True
    profile: bool = False
    only: tuple[str, ...] = ()
    phases: tuple[str, ...] = ("connect", "fanout", "throughput", "resume", "idle")
    ssechat_feed: str = "auto"
    ssechat_loop: str = "ssechat.eventloop:new_event_loop"
    # Every server runs without a log line per request (uvicorn's --no-access-log);
    # ssechat's equivalent is its INFO line per stream opened and closed.
    log_level: str = "WARNING"
    plot: bool = True
    server_env: dict = field(default_factory=dict)
    chat_backend: str = "ollama"
    chat_db: str = "sqlite"  # or "postgres" (a database of its own on PG_ADMIN_URL's server)
    chat_answers: int = 0
    chat_tokens: int = 0
    chat_repeats: int = 3
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="ssechat-bench-")))

    @classmethod
    def quick_config(cls) -> Config:
        return cls(
            quick=True,
            connect_steps=(250, 500, 1000),
            fanout_steps=((100, 3.0), (1000, 5.0)),
            drain_seconds=3.0,
            throughput_seconds=3.0,
            resume_events=10_000,
            idle_streams=0,
            users=300,
            chat_repeats=1,
        )


LOOP = new_loop()
_stopping = False


class Interrupted(BaseException):
    """SIGINT or SIGTERM: stop the servers, write what was measured, exit."""


def _on_signal(signum, frame) -> None:
    global _stopping
    _stopping = True
    if LOOP.is_running():
        LOOP.call_soon_threadsafe(_cancel_all)


def _cancel_all() -> None:
    for task in asyncio.all_tasks(LOOP):
        task.cancel()


def run(coro):
    if _stopping:
        coro.close()
        raise Interrupted
    try:
        return LOOP.run_until_complete(coro)
    except asyncio.CancelledError:
        if _stopping:
            raise Interrupted from None
        raise


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- set-up -------------------------------------------------------------------------


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "SSECHAT_"))}
    env.pop("DATABASE_URL", None)
    return env


def setup_db(target: Target, env: dict[str, str], users: int, out: Path, tokens: int = 0) -> dict:
    command = [sys.executable, "-m", "bench.setup_db", "users", "--users", str(users),
               "--out", str(out), "--tokens", str(tokens)]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"set-up of {target.key} failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(out.read_text())


def start_server(target: Target, env: dict[str, str], name: str, cfg: Config) -> ServerProc:
    port = free_port()
    command = uvicorn_command(target.app, port, lifespan=target.lifespan, loop=target.loop)
    log_path = cfg.workdir / f"{name}-{port}.log"
    server = ServerProc(name, command, env, log_path, port)
    return server.start(target.probe)


def publisher(target: Target, creds: dict | None, ports: list[int], first_port_only=False):
    """(seq, due ns) -> (port, raw POST); alternates between ports."""
    extra = bearer_header(creds) if target.bearer_publish else ""
    path = target.publish_path

    def request_for(seq: int, due: int) -> tuple[int, bytes]:
        port = ports[0] if first_port_only else ports[seq % len(ports)]
        return port, post_request(path, port, target.publish_body(seq, due), extra)

    return request_for


# -- phases -------------------------------------------------------------------------------


async def warm_up(server: ServerProc, target: Target, headers, request_for) -> None:
    """A few streams and publishes first: lazy imports and caches are not measured."""
    group = Subscribers(server.port, target.stream_path, headers, mode=IDLE)
    await group.connect(20, timeout=30)
    pool = Pool(server.port, 2)
    for seq in range(3):
        _port, data = request_for(10**8 + seq, monotonic_ns())
        with contextlib.suppress(Exception):
            await pool.post(data, timeout=10)
    pool.close()
    await asyncio.sleep(0.5)
    group.close()
    await asyncio.sleep(1.0)


@contextlib.contextmanager
def no_collections():
    """No garbage-collection pauses in the load generator while it measures: it is one
    process for the whole run, and the servers measured later (ssechat runs after
    the peers) would otherwise meet a bigger heap, slower to collect, than the first."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def phase_connect(server: ServerProc, target: Target, headers, cfg: Config) -> dict:
    base_rss, base_threads, base_fds = server.rss(), server.threads(), server.fds()
    group = Subscribers(server.port, target.stream_path, headers, mode=IDLE)
    seconds = cpu = system = loop_cpu = 0.0
    gc_time: float | None = 0.0
    points, errors, failed = [], {}, 0
    opened = 0
    for step in cfg.connect_steps:
        # The collector's clock is read over HTTP: outside the CPU readings, so the two
        # /healthz requests are not counted as the connects' CPU.
        gc0 = await asyncio.to_thread(gc_seconds, server.port)
        cpu0, sys0 = server.cpu_seconds(), server.system_cpu_seconds()
        loop0 = server.main_thread_cpu_seconds()
        with no_collections():
            result = await group.connect(step - opened, window=cfg.connect_window, offset=opened)
        cpu += server.cpu_seconds() - cpu0
        system += server.system_cpu_seconds() - sys0
        loop_cpu += server.main_thread_cpu_seconds() - loop0
        gc1 = await asyncio.to_thread(gc_seconds, server.port)
        gc_time = None if gc0 is None or gc1 is None else (gc_time or 0.0) + gc1 - gc0
        opened = step
        seconds += result["seconds"]
        failed += result["failed"]
        for k, v in result["errors"].items():
            errors[k] = errors.get(k, 0) + v
        await asyncio.sleep(1.0)
        streams = group.open_count
        rss = server.rss()
        points.append({
            "streams": streams, "rss_mb": round(rss / 2**20, 1),
            "kb_per_stream": round((rss - base_rss) / 1024 / max(streams, 1), 1),
            "threads": server.threads(),
        })  # fmt: skip
        log(f"  {target.key}: {streams} streams open, {points[-1]['kb_per_stream']} KB/stream")
    last = points[-1]
    result = {
        "streams": cfg.connect_steps[-1],
        "seconds": round(seconds, 3),
        "cpu_ms_per_connect": round(cpu / cfg.connect_steps[-1] * 1e3, 3),
        # The event loop's thread; the rest is the database threads' (and the kernel's for them).
        "loop_cpu_ms_per_connect": round(loop_cpu / cfg.connect_steps[-1] * 1e3, 3),
        # ssechat's garbage collections during the bursts (None for the other servers).
        "gc_ms_per_connect": None
        if gc_time is None
        else round(gc_time / cfg.connect_steps[-1] * 1e3, 3),
        "system_cpu_share_pct": round(100 * system / cpu, 1) if cpu else None,
        "failed": failed,
        "errors": errors,
        "base_rss_mb": round(base_rss / 2**20, 1),
        "kb_per_stream": last["kb_per_stream"],
        "threads_idle": last["threads"],
        "threads_base": base_threads,
        "points": points,
        "lost_while_idle": group.lost,
    }
    group.close()
    await server.wait_fds_below(base_fds + 20)
    await asyncio.sleep(0.5)
    return result


async def fanout_step(
    servers: list[ServerProc],
    groups: list[Subscribers],
    request_for,
    ports: list[int],
    count: int,
    first: int,
    cfg: Config,
) -> dict:
    for group in groups:
        group.reset_counters()
    live = sum(group.open_count for group in groups)
    with no_collections():  # nor while it timestamps arrivals
        cpu0 = sum(s.cpu_seconds() for s in servers)
        own0, wall0 = time.process_time(), time.monotonic()
        stats = await publish_open_loop(request_for, ports, cfg.rate, count, first=first)
        expected = live * stats.ok
        deadline = time.monotonic() + cfg.drain_seconds
        while time.monotonic() < deadline and sum(g.delivered for g in groups) < expected:
            await asyncio.sleep(0.05)
        cpu1 = sum(s.cpu_seconds() for s in servers)
        own1, wall1 = time.process_time(), time.monotonic()
    delivered = sum(g.delivered for g in groups)
    latencies = sorted(x for g in groups for x in g.latencies)
    missing_subs = missing = 0
    for group in groups:
        a, b = group.losses(stats.ok_seqs)
        missing_subs += a
        missing += b
    ms = [x / 1e6 for x in latencies]
    return {
        "subscribers": live,
        "events": count,
        "rate": cfg.rate,
        "publish": stats.as_dict(),
        "delivered": delivered,
        "expected": expected,
        "lost": missing,
        "subscribers_with_loss": missing_subs,
        "duplicates": sum(g.duplicates for g in groups),
        "p50_ms": round(percentile(ms, 50), 2) if ms else None,
        "p90_ms": round(percentile(ms, 90), 2) if ms else None,
        "p99_ms": round(percentile(ms, 99), 2) if ms else None,
        "max_ms": round(ms[-1], 2) if ms else None,
        "cpu_seconds": round(cpu1 - cpu0, 3),
        "cpu_us_per_delivery": round((cpu1 - cpu0) / delivered * 1e6, 2) if delivered else None,
        "server_cpu_pct": round((cpu1 - cpu0) / (wall1 - wall0) * 100, 1),
        "loadgen_cpu_pct": round((own1 - own0) / (wall1 - wall0) * 100, 1),
    }


async def phase_fanout(
    servers: list[ServerProc], target: Target, headers, request_for, cfg: Config, label: str = ""
) -> dict:
    ports = [s.port for s in servers]
    total = sum(int(cfg.rate * secs) for _, secs in cfg.fanout_steps)
    groups = [
        Subscribers(s.port, target.stream_path, headers, mode=LATENCY, events=total)
        for s in servers
    ]
    steps, first = [], 0
    max_subs = cfg.fanout_steps[-1][0]
    try:
        for subscribers, secs in cfg.fanout_steps:
            for i, group in enumerate(groups):
                want = subscribers // len(groups) + (i < subscribers % len(groups))
                have = len(group.subs)
                if want > have:
                    result = await group.connect(want - have, offset=have + 7919 * i)
                    if result["failed"]:
                        failed, errors = result["failed"], result["errors"]
                        log(f"  {label or target.key}: {failed} failed: {errors}")
            await asyncio.sleep(1.0)
            count = int(cfg.rate * secs)
            profiled = cfg.profile and target.key == "ssechat" and subscribers == max_subs
            name = "ssechat-" + (label or "fanout").replace(" ", "-")
            async with Profiler(servers[0].pid, name, profiled):
                step = await fanout_step(servers, groups, request_for, ports, count, first, cfg)
            first += count
            steps.append(step)
            log(
                f"  {label or target.key}: fan-out {step['subscribers']} subs: p50 {step['p50_ms']}"
                f" p99 {step['p99_ms']} ms, lost {step['lost']}, dup {step['duplicates']},"
                f" {step['cpu_us_per_delivery']} us/delivery,"
                f" publish {step['publish']['statuses']},"
                f" CPU server {step['server_cpu_pct']}% load {step['loadgen_cpu_pct']}%"
            )
    finally:
        for group in groups:
            group.close()
    await asyncio.sleep(1.0)
    return {"steps": steps}


def gc_seconds(port: int) -> float | None:
    """Seconds ssechat's garbage collector has taken so far (None for the other servers)."""
    stats = hub_counters(port)
    return sum(stats["gc"]["seconds"]) if stats and "gc" in stats else None


def hub_counters(port: int) -> dict | None:
    """ssechat's hub counters (``/healthz`` with SSECHAT_STATS), None for the others."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/healthz", timeout=5) as response:
            stats = json.loads(response.read()).get("stats") or {}
    except (OSError, ValueError):
        return None
    return stats if "handed_over" in stats else None


async def phase_throughput(server: ServerProc, target: Target, headers, request_for, cfg) -> dict:
    group = Subscribers(server.port, target.stream_path, headers, mode=COUNT)
    await group.connect(cfg.throughput_subs)
    await asyncio.sleep(1.0)
    live = group.open_count
    hub0 = await asyncio.to_thread(hub_counters, server.port)
    cpu0 = server.cpu_seconds()
    own0, wall0 = time.process_time(), time.monotonic()
    start = group.delivered
    profiled = cfg.profile and target.key == "ssechat"
    with no_collections():
        async with Profiler(server.pid, "ssechat-throughput", profiled):
            stats = await publish_closed_loop(
                request_for,
                [server.port],
                cfg.throughput_seconds,
                concurrency=cfg.throughput_publishers,
            )
    in_window = group.delivered - start
    window_cpu = server.cpu_seconds() - cpu0
    own1, wall1 = time.process_time(), time.monotonic()
    expected = stats.ok * live
    deadline = time.monotonic() + max(cfg.drain_seconds, 10.0)
    while time.monotonic() < deadline and group.delivered - start < expected:
        await asyncio.sleep(0.05)
    drained = time.monotonic() - (deadline - max(cfg.drain_seconds, 10.0))
    cpu1 = server.cpu_seconds()
    delivered = group.delivered - start
    group.close()
    hub1 = await asyncio.to_thread(hub_counters, server.port)
    await asyncio.sleep(1.0)
    result = {
        "subscribers": live,
        "publishes_ok": stats.ok,
        "publish": stats.as_dict(),
        "publishes_per_second": round(stats.ok / stats.seconds, 1),
        "deliveries_per_second": round(in_window / stats.seconds),
        "delivered": delivered,
        "expected": expected,
        "missing_after_drain": expected - delivered,
        "drain_seconds": round(drained, 2),
        "cpu_us_per_delivery": round((cpu1 - cpu0) / delivered * 1e6, 2) if delivered else None,
        "server_cpu_pct": round(window_cpu / (wall1 - wall0) * 100, 1),
        "loadgen_cpu_pct": round((own1 - own0) / (wall1 - wall0) * 100, 1),
    }
    if hub0 and hub1:  # ssechat: events handed from the commit to the hub vs read back
        result["hub_events"] = hub1["dispatched"] - hub0["dispatched"]
        result["hub_read_back"] = result["hub_events"] - (hub1["handed_over"] - hub0["handed_over"])
    log(
        f"  {target.key}: {result['deliveries_per_second']} deliveries/s"
        f" ({result['publishes_per_second']} publishes/s), missing {result['missing_after_drain']},"
        f" server CPU {result['server_cpu_pct']}%, load generator CPU {result['loadgen_cpu_pct']}%"
    )
    return result


async def read_resumed(port: int, path: str, header: str, events: int, timeout=60.0) -> dict:
    group = Subscribers(port, path, [header], mode=COUNT)
    started = monotonic_ns()
    result = await group.connect(1, timeout=timeout)
    deadline = time.monotonic() + timeout
    while group.delivered < events and time.monotonic() < deadline:
        await asyncio.sleep(0.002)
    seconds = (monotonic_ns() - started) / 1e9
    received = group.delivered
    group.close()
    return {
        "events": events,
        "received": received,
        "seconds": round(seconds, 3),
        "connect": result,
    }


async def phase_resume(server: ServerProc, target: Target, env, creds, cfg) -> dict:
    """Store N events the client missed (in the server's own format), then resume and time it."""
    n = cfg.resume_events
    cookie = cookie_headers(creds)[0]
    feed = "eventstream" if target.key == "eventstream" else "core"
    if target.notifications:
        feed = "notifications"
    command = [sys.executable, "-m", "bench.setup_db", "resume", "--count", str(n),
               "--feed", feed]  # fmt: skip
    done = await asyncio.to_thread(
        subprocess.run, command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    if done.returncode != 0:
        return {"error": done.stderr[-2000:]}
    info = json.loads(done.stdout.strip().splitlines()[-1])
    last_id = f"broadcast:{info['before']}" if feed == "eventstream" else str(info["before"])
    await asyncio.sleep(1.0)
    result = await read_resumed(
        server.port, target.stream_path, f"{cookie}Last-Event-ID: {last_id}\r\n", n
    )
    result["stored_in_seconds"] = info.get("seconds")
    log(f"  {target.key}: resumed {result['received']}/{n} missed events in {result['seconds']} s")
    return result


async def phase_idle(server: ServerProc, target: Target, headers, cfg, db_handles) -> dict:
    soft, _hard = nofile_limits()
    server_limit = server.ps.rlimit(__import__("psutil").RLIMIT_NOFILE)[0]
    want = min(cfg.idle_streams, server_limit - 64)
    base_rss, base_threads = server.rss(), server.threads()
    base_db = db_handles()
    headers_file = cfg.workdir / f"headers-{target.key}.json"
    headers_file.write_text(json.dumps(list(headers)))
    per_helper = min(9000, soft - 200)
    helpers = math.ceil(want / per_helper)
    counts = [want // helpers + (i < want % helpers) for i in range(helpers)]
    procs = []
    started = time.monotonic()
    offset = 0
    for count in counts:
        procs.append(
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bench.load",
                "hold",
                "--port",
                str(server.port),
                "--path",
                target.stream_path,
                "--count",
                str(count),
                "--headers-file",
                str(headers_file),
                "--offset",
                str(offset),
                "--cpu",
                str(LOAD_CPU),
                "--max-seconds",
                "240",
                cwd=ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
        )
        offset += count
    reports = []
    try:
        for proc in procs:
            line = await asyncio.wait_for(proc.stdout.readline(), 300)
            reports.append(json.loads(line or b"{}"))
        seconds = time.monotonic() - started
        await asyncio.sleep(3.0)
        opened = sum(r.get("ok", 0) for r in reports)
        rss, threads = server.rss(), server.threads()
        result = {
            "wanted": want,
            "opened": opened,
            "failed": sum(r.get("failed", 0) for r in reports),
            "errors": [r.get("errors") for r in reports],
            "connect_seconds": round(seconds, 2),
            "kb_per_stream": round((rss - base_rss) / 1024 / max(opened, 1), 1),
            "rss_mb": round(rss / 2**20, 1),
            "threads": threads,
            "threads_base": base_threads,
            "db_connections": db_handles(),
            "db_connections_base": base_db,
            "server_fd_limit": server_limit,
            "helpers": helpers,
        }
    finally:
        for proc in procs:
            with contextlib.suppress(Exception):
                proc.stdin.close()
        for proc in procs:
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
    log(
        f"  {target.key}: held {result['opened']}/{want} idle streams,"
        f" {result['kb_per_stream']} KB/stream, threads {threads}, db {result['db_connections']}"
    )
    return result


# -- profiling ----------------------------------------------------------------------------


class Profiler:
    """py-spy record on a server for the length of a phase.

    Writes bench/results/profiles/<name>.txt (py-spy's collapsed stacks) and
    <name>.summary.txt (self and inclusive time per function, bench.profile_summary).
    """

    rate = 100  # samples a second (--profile-rate)
    seconds: float | None = None  # only the first seconds of each phase (--profile-seconds)

    def __init__(self, pid: int, name: str, enabled: bool):
        self.pid, self.name, self.enabled = pid, name, enabled
        self.proc: subprocess.Popen | None = None
        self.out = RESULTS / "profiles" / f"{name}.txt"

    def _start(self) -> bool:
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not self.enabled or not Path(spy).exists():
            return False
        self.out.parent.mkdir(exist_ok=True)
        # --gil: only samples holding the GIL, i.e. the process's Python CPU time.
        command = [spy, "record", "--pid", str(self.pid), "--rate", str(self.rate),
                   "--nonblocking", "--gil", "--format", "raw", "-o", str(self.out)]  # fmt: skip
        if self.seconds:
            # py-spy counts from its start, which comes a second (its attach) earlier.
            command += ["--duration", str(max(1, round(1 + self.seconds)))]
        with open(self.out.with_suffix(".log"), "wb") as spy_log:
            self.proc = subprocess.Popen(command, stdout=spy_log, stderr=spy_log)
        return True

    def __enter__(self):
        if self._start():
            time.sleep(1.0)
        return self

    async def __aenter__(self):
        if self._start():
            await asyncio.sleep(1.0)
        return self

    async def __aexit__(self, *exc):
        await asyncio.to_thread(self.__exit__)

    def __exit__(self, *exc):
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        if self.out.exists():
            from .profile_summary import summarize

            summary = summarize(self.out, top=40)
            self.out.with_suffix(".summary.txt").write_text(summary + "\n")
            log(f"  profile: {self.out.relative_to(ROOT)}")


# -- one server -------------------------------------------------------------------------


def run_target(target: Target, cfg: Config) -> dict:
    log(f"{target.label}: set-up")
    db_path = cfg.workdir / f"{target.key}.sqlite3"
    env = target.server_env(base_env(), str(db_path))
    creds = (
        setup_db(target, env, cfg.users, cfg.workdir / f"{target.key}-creds.json")
        if (target.needs_db)
        else None
    )
    headers = cookie_headers(creds) if target.session_auth else [""]
    out: dict = {"label": target.label, "path": target.stream_path}

    def db_handles(server):
        return lambda: server.sqlite_handles(str(db_path)) if target.needs_db else 0

    phases = cfg.phases
    if any(p in phases for p in ("connect", "fanout", "throughput", "resume")):
        server = start_server(target, env, target.key, cfg)
        request_for = publisher(target, creds, [server.port])
        try:
            run(warm_up(server, target, headers, request_for))
            if "connect" in phases:
                log(f"{target.label}: connect")
                with Profiler(
                    server.pid, f"{target.key}-connect", cfg.profile and target.key == "ssechat"
                ):
                    out["connect"] = run(phase_connect(server, target, headers, cfg))
                out["connect"]["db_connections_idle"] = db_handles(server)()
            if "fanout" in phases:
                log(f"{target.label}: fan-out")
                out["fanout"] = run(phase_fanout([server], target, headers, request_for, cfg))
            if "throughput" in phases:
                log(f"{target.label}: throughput")
                out["throughput"] = run(phase_throughput(server, target, headers, request_for, cfg))
            if "resume" in phases and target.resume and cfg.resume_events:
                log(f"{target.label}: resume")
                out["resume"] = run(phase_resume(server, target, env, creds, cfg))
            out["server_lost_streams_log"] = server.log(1500) if "Traceback" in server.log() else ""
        finally:
            server.stop()
    if "idle" in phases and cfg.idle_streams and target.key in cfg.idle_targets:
        log(f"{target.label}: idle streams (fresh server)")
        server = start_server(target, env, f"{target.key}-idle", cfg)
        try:
            run(warm_up(server, target, headers, publisher(target, creds, [server.port])))
            out["idle"] = run(phase_idle(server, target, headers, cfg, db_handles(server)))
        finally:
            server.stop()
    return out


# -- PostgreSQL: one and two workers ---------------------------------------------------------


def pg_available() -> bool:
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN_URL, connect_timeout=3):
            return True
    except Exception:
        return False


@contextlib.contextmanager
def pg_database(label: str):
    """A new PostgreSQL database for one step (its URL), dropped afterwards."""
    import psycopg

    name = f"ssechat_bench_{label}_{os.getpid()}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                [name],
            )
            admin.execute(f'DROP DATABASE IF EXISTS "{name}"')


def run_pg(target: Target, cfg: Config) -> dict:
    with pg_database("fanout") as url:
        return _run_pg(target, cfg, url)


def _run_pg(target: Target, cfg: Config, url: str) -> dict:
    import psycopg

    name = url.rsplit("/", 1)[1]
    out: dict = {"database": "postgresql"}
    servers: list[ServerProc] = []
    try:
        env = target.server_env(base_env(), url)
        creds = setup_db(target, env, cfg.users, cfg.workdir / "pg-creds.json")
        headers = cookie_headers(creds)
        steps = cfg.fanout_steps[-1:]
        pg_cfg = dataclasses.replace(cfg, fanout_steps=steps)
        log("ssechat on PostgreSQL, one worker: fan-out")
        one = start_server(target, env, "ssechat-pg1", cfg)
        servers.append(one)
        request_for = publisher(target, creds, [one.port])
        run(warm_up(one, target, headers, request_for))
        out["one_worker"] = run(phase_fanout([one], target, headers, request_for, pg_cfg, "pg x1"))
        one.stop()
        servers.clear()
        log("ssechat on PostgreSQL, two workers: fan-out across workers")
        two = [start_server(target, env, f"ssechat-pg2-{i}", cfg) for i in range(2)]
        servers.extend(two)
        request_for = publisher(target, creds, [s.port for s in two])
        for s in two:
            run(warm_up(s, target, headers, publisher(target, creds, [s.port])))
        out["two_workers"] = run(phase_fanout(two, target, headers, request_for, pg_cfg, "pg x2"))
        with psycopg.connect(url) as conn:
            rows = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", [name]
            ).fetchone()
        out["pg_connections_with_two_workers"] = rows[0] - 1
    finally:
        for s in servers:
            s.stop()
    return out


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> Config:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts (about 2 minutes)")
    parser.add_argument("--only", default="", help="servers: bare,django,django-mw,eventstream,"
                        "ssechat,pg,chat (comma-separated)")  # fmt: skip
    parser.add_argument("--phases", default="", help="connect,fanout,throughput,resume,idle")
    parser.add_argument("--profile", action="store_true", help="py-spy the ssechat server")
    parser.add_argument("--profile-rate", type=int, default=100, help="py-spy samples a second")
    parser.add_argument(
        "--profile-seconds", type=float, help="profile only the first seconds of each phase"
    )
    parser.add_argument("--ssechat-feed", default="auto", choices=("auto", "notifications", "core"))
    parser.add_argument(
        "--ssechat-loop",
        default="ssechat.eventloop:new_event_loop",
        help="uvicorn --loop of the ssechat server (the others run on uvloop)",
    )
    parser.add_argument(
        "--log-level",
        default="WARNING",
        help="LOG_LEVEL of the ssechat server (WARNING: no line per stream, as the others)",
    )
    parser.add_argument("--idle-streams", type=int, default=None)
    parser.add_argument("--publishers", type=int, default=None,
                        help="concurrent publishers in the throughput phase")  # fmt: skip
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment for the ssechat servers (repeatable)")  # fmt: skip
    parser.add_argument("--chat-answers", type=int, default=0, help="answers at once (chat)")
    parser.add_argument("--chat-tokens", type=int, default=0, help="tokens an answer (chat)")
    parser.add_argument("--chat-repeats", type=int, default=None,
                        help="tries of each chat step (the median p99 stands)")  # fmt: skip
    parser.add_argument("--chat-backend", default="ollama", choices=("ollama", "openai"))
    parser.add_argument(
        "--chat-db",
        default="sqlite",
        choices=("sqlite", "postgres"),
        help="the chat step's database",
    )
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    cfg = Config.quick_config() if args.quick else Config()
    if args.only:
        cfg.only = tuple(x.strip() for x in args.only.split(",") if x.strip())
    if args.phases:
        cfg.phases = tuple(x.strip() for x in args.phases.split(",") if x.strip())
    if args.idle_streams is not None:
        cfg.idle_streams = args.idle_streams
    if args.publishers:
        cfg.throughput_publishers = args.publishers
    cfg.profile = args.profile
    Profiler.rate = args.profile_rate
    Profiler.seconds = args.profile_seconds
    cfg.ssechat_feed = args.ssechat_feed
    cfg.ssechat_loop = args.ssechat_loop
    cfg.log_level = args.log_level
    cfg.plot = not args.no_plot
    cfg.chat_answers = args.chat_answers
    cfg.chat_backend = args.chat_backend
    cfg.chat_db = args.chat_db
    cfg.chat_tokens = args.chat_tokens
    if args.chat_repeats is not None:
        cfg.chat_repeats = args.chat_repeats
    cfg.server_env = dict(item.split("=", 1) for item in args.server_env)
    return cfg


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    pin(LOAD_CPU)
    raise_nofile()
    RESULTS.mkdir(exist_ok=True)
    started = time.monotonic()
    results: dict = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "mode": "quick" if cfg.quick else "full",
        "config": {
            k: (list(v) if isinstance(v, tuple) else v)
            for k, v in cfg.__dict__.items()
            if k != "workdir"
        },
        "servers": {},
    }
    results["config"] = json.loads(json.dumps(results["config"], default=str))
    log(f"bench ({results['mode']}): work dir {cfg.workdir}; load average "
        f"{results['machine']['loadavg_start']}")  # fmt: skip
    targets = make_targets(cfg.ssechat_feed, cfg.log_level, cfg.ssechat_loop)
    ssechat = next(t for t in targets if t.key == "ssechat")
    ssechat.env.update(cfg.server_env)
    results["ssechat_feed"] = "notifications" if ssechat.notifications else "core"
    try:
        for target in targets:
            if cfg.only and target.key not in cfg.only:
                continue
            try:
                results["servers"][target.key] = run_target(target, cfg)
            except Exception as exc:  # a broken peer must not hide the others
                log(f"{target.key} failed: {exc!r}")
                results["servers"][target.key] = {"label": target.label, "error": repr(exc)}
        if cfg.pg and (not cfg.only or "pg" in cfg.only):
            if pg_available():
                try:
                    results["postgres"] = run_pg(ssechat, cfg)
                except Exception as exc:
                    log(f"postgres failed: {exc!r}")
                    results["postgres"] = {"error": repr(exc)}
            else:
                results["postgres"] = {"error": f"PostgreSQL not reachable at {PG_ADMIN_URL}"}
        if cfg.chat and (not cfg.only or "chat" in cfg.only):
            from . import chat

            try:
                results["chat"] = chat.run_chat(cfg, log, ssechat)
            except Exception as exc:
                log(f"chat failed: {exc!r}")
                results["chat"] = {"error": repr(exc)}
    except Interrupted:
        log("interrupted: servers stopped; writing what was measured")
    finally:
        results["seconds"] = round(time.monotonic() - started, 1)
        results["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        stamp = dt.datetime.now().strftime("%Y-%m-%d-%H%M%S")
        path = RESULTS / f"{stamp}{'-quick' if cfg.quick else ''}.json"
        path.write_text(json.dumps(results, indent=1))
        shutil.rmtree(cfg.workdir, ignore_errors=True) if not os.environ.get("BENCH_KEEP") else None
    print()
    print(report.table(results))
    print(f"\nresults: {path.relative_to(ROOT)} ({results['seconds']} s)")
    if cfg.plot:
        with contextlib.suppress(Exception):
            from . import plot

            print(f"plot: {plot.make_plot(path).relative_to(ROOT)}")


if __name__ == "__main__":
    main()
