"""``python -m bench.plot [results.json]``: p99 latency and memory per stream, by subscribers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
OUT = RESULTS / "latency_memory.png"
STYLE = {
    "bare": ("#555555", "o"),
    "django": ("#1f77b4", "s"),
    "django-mw": ("#17becf", "D"),
    "eventstream": ("#d62728", "^"),
    "ssechat": ("#2ca02c", "*"),
}


def latest() -> Path:
    runs = sorted(p for p in RESULTS.glob("*.json") if p.name[0].isdigit())
    full = [p for p in runs if not p.stem.endswith("quick")]
    return (full or runs)[-1]


def make_plot(path: Path | None = None, out: Path = OUT) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = path or latest()
    results = json.loads(Path(path).read_text())
    fig, (lat, mem) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, server in results.get("servers", {}).items():
        color, mark = STYLE.get(key, ("#000000", "."))
        label = server.get("label", key)
        steps = (server.get("fanout") or {}).get("steps") or []
        pts = [(s["subscribers"], s["p99_ms"]) for s in steps if s.get("p99_ms") is not None]
        if pts:
            lat.plot(*zip(*pts, strict=True), marker=mark, color=color, label=label)
        points = (server.get("connect") or {}).get("points") or []
        pts = [(p["streams"], p["kb_per_stream"]) for p in points]
        idle = server.get("idle")
        if idle and idle.get("opened"):
            pts.append((idle["opened"], idle["kb_per_stream"]))
        if pts:
            mem.plot(*zip(*sorted(pts), strict=True), marker=mark, color=color, label=label)
    pg = results.get("postgres") or {}
    for key, style in (("one_worker", ":"), ("two_workers", "--")):
        steps = (pg.get(key) or {}).get("steps") or []
        pts = [(s["subscribers"], s["p99_ms"]) for s in steps if s.get("p99_ms") is not None]
        if pts:
            label = f"ssechat, PostgreSQL, {key.replace('_', ' ')}"
            lat.plot(*zip(*pts, strict=True), marker="*", linestyle=style, color="#2ca02c",
                     alpha=0.6, label=label)  # fmt: skip
    lat.set(xlabel="subscribers", ylabel="p99 publish-to-receive (ms)", xscale="log",
            yscale="log", title="Fan-out at 10 events/s: p99 latency")  # fmt: skip
    mem.set(xlabel="idle streams", ylabel="resident memory per stream (KB)", xscale="log",
            title="Memory per idle stream")  # fmt: skip
    mem.set_ylim(bottom=0)
    for ax in (lat, mem):
        ax.grid(True, which="both", alpha=0.3)
    lat.legend(fontsize=7, loc="upper left")
    mem.legend(fontsize=7, loc="center right")
    fig.suptitle(f"one uvicorn worker on one core; {results.get('mode')} run {results.get('date')}",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


if __name__ == "__main__":
    print(make_plot(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
