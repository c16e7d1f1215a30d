"""``python -m bench.memprofile [--streams N] [--only bare,ssechat]``: an idle stream's memory.

Starts each server under tracemalloc (bench/servers/traced.py), opens N idle
streams after a warm-up, and prints the Python allocations they hold, per
stream, grouped by the line that made them. (tracemalloc sees Python's
allocations, not the kernel's socket buffers or the C stacks of threads.)
"""

from __future__ import annotations

import argparse
import asyncio
import shutil

import httpx

from . import run as bench
from .load import IDLE, Subscribers
from .procs import ServerProc, free_port, uvicorn_command
from .targets import cookie_headers, make_targets


async def measure(server: ServerProc, target, headers, streams: int, group: str) -> str:
    await bench.warm_up(server, target, headers, bench.publisher(target, None, [server.port]))
    httpx.get(server.url + "/__bench__/mark", timeout=60)
    streams_group = Subscribers(server.port, target.stream_path, headers, mode=IDLE)
    result = await streams_group.connect(streams)
    await asyncio.sleep(2.0)
    text = await asyncio.to_thread(
        lambda: (
            httpx.get(
                server.url + f"/__bench__/diff?per={result['ok']}&group={group}", timeout=120
            ).text
        )
    )
    streams_group.close()
    return text


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.memprofile")
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--only", default="bare,ssechat")
    parser.add_argument("--frames", type=int, default=1, help="traceback depth to group by")
    args = parser.parse_args()
    cfg = bench.Config.quick_config()
    bench.pin(bench.LOAD_CPU)
    bench.raise_nofile()
    for target in make_targets():
        if target.key not in args.only.split(","):
            continue
        db = cfg.workdir / f"{target.key}.sqlite3"
        env = target.server_env(bench.base_env(), str(db))
        env.update(BENCH_TRACED_APP=target.app, BENCH_TRACED_FRAMES=str(args.frames))
        group = "traceback" if args.frames > 1 else "lineno"
        creds = None
        if target.needs_db:
            creds = bench.setup_db(target, env, cfg.users, cfg.workdir / f"{target.key}.json")
        headers = cookie_headers(creds) if target.session_auth else [""]
        port = free_port()
        command = uvicorn_command(
            "bench.servers.traced:app", port, lifespan=target.lifespan, loop=target.loop
        )
        server = ServerProc(target.key, command, env, cfg.workdir / f"{target.key}.log", port)
        server.start(target.probe)
        try:
            print(f"== {target.label}")
            print(bench.run(measure(server, target, headers, args.streams, group)))
        finally:
            server.stop()
    shutil.rmtree(cfg.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
