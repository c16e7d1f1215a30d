"""Any benchmarked ASGI app, with tracemalloc: where the memory of an idle stream goes.

``BENCH_TRACED_APP=ssechat.asgi:application uvicorn bench.servers.traced:app``;
``GET /__bench__/mark`` takes a snapshot, ``GET /__bench__/diff?per=N`` answers
the allocations made since, grouped by line (text), divided by N.
"""

import importlib
import os
import tracemalloc

tracemalloc.start(int(os.environ.get("BENCH_TRACED_FRAMES", "1")))
_module, _, _name = os.environ["BENCH_TRACED_APP"].partition(":")
inner = getattr(importlib.import_module(_module), _name)
_marks: dict[str, tracemalloc.Snapshot] = {}


def _diff(per: int, group: str) -> bytes:
    now = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__)]
    )
    stats = now.compare_to(_marks["mark"], group)
    total = sum(s.size_diff for s in stats)
    lines = [f"total {total / 1024 / per:.2f} KB per stream ({per} streams)"]
    for stat in stats[:40]:
        where = " <- ".join(
            f"{f.filename.split('site-packages/')[-1].split('/work/main/')[-1]}:{f.lineno}"
            for f in reversed(stat.traceback)  # innermost first
        )
        lines.append(f"{stat.size_diff / per:9.0f} B {stat.count_diff / per:6.2f} blocks  {where}")
    return ("\n".join(lines) + "\n").encode()


async def app(scope, receive, send):
    if scope["type"] == "http" and scope["path"].startswith("/__bench__/"):
        if scope["path"] == "/__bench__/mark":
            _marks["mark"] = tracemalloc.take_snapshot()
            body = b"ok\n"
        else:
            query = dict(p.split("=", 1) for p in scope["query_string"].decode().split("&") if p)
            body = _diff(int(query.get("per", "1")), query.get("group", "lineno"))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})
        return
    await inner(scope, receive, send)
