"""The table of a run: one row per server, ssechat's ratios to the bare broadcaster, targets."""

from __future__ import annotations

ORDER = ("bare", "django", "django-mw", "eventstream", "ssechat")
PEERS = ("django", "django-mw", "eventstream")


def figures(server: dict) -> dict:
    """The five figures of the issue's table (None where not measured)."""
    connect = server.get("connect") or {}
    steps = (server.get("fanout") or {}).get("steps") or []
    top = steps[-1] if steps else {}
    throughput = server.get("throughput") or {}
    return {
        "kb": connect.get("kb_per_stream"),
        "streams": connect.get("streams"),
        "connect_s": connect.get("seconds"),
        "connect_failed": connect.get("failed"),
        "subs": top.get("subscribers"),
        "p50": top.get("p50_ms"),
        "p99": top.get("p99_ms"),
        "lost": top.get("lost"),
        "dup": top.get("duplicates"),
        "cpu_us": top.get("cpu_us_per_delivery"),
        "dps": throughput.get("deliveries_per_second"),
        "tp_missing": throughput.get("missing_after_drain"),
    }


def _fmt(value, spec: str = "", none: str = "-") -> str:
    if value is None:
        return none
    return format(value, spec)


# (key, label, lower is better, target ratio against bare, comparison)
METRICS = (
    ("kb", "memory/stream", True, 1.3),
    ("connect_s", "connect", True, 2.0),
    ("p99", "fan-out p99", True, 1.3),
    ("cpu_us", "CPU/delivery", True, 1.5),
    ("dps", "deliveries/s", False, 0.5),
)


def ratios(results: dict) -> dict:
    servers = results.get("servers", {})
    if "ssechat" not in servers or "bare" not in servers:
        return {}
    mine, bare = figures(servers["ssechat"]), figures(servers["bare"])
    out = {}
    for key, label, lower, target in METRICS:
        a, b = mine.get(key), bare.get(key)
        if a is None or not b:
            continue
        ratio = a / b
        ok = ratio <= target if lower else ratio >= target
        beats = {}
        for peer in PEERS:
            if peer in servers:
                other = figures(servers[peer]).get(key)
                if other is not None:
                    beats[peer] = a < other if lower else a > other
        out[key] = {"label": label, "ratio": round(ratio, 2), "target": target, "met": ok,
                    "beats": beats}  # fmt: skip
    return out


def table(results: dict) -> str:
    servers = results.get("servers", {})
    lines = []
    machine = results.get("machine", {})
    lines.append(
        f"ssechat benchmark, {results.get('mode')} run, {results.get('date')}: "
        f"{machine.get('cpu')}, {machine.get('cores')} cores, load average at start "
        f"{machine.get('loadavg_start')}, at end {machine.get('loadavg_end')}"
    )
    first = next((figures(s) for s in servers.values() if "connect" in s), {})
    n = first.get("streams") or 5000
    subs = first.get("subs") or 1000
    header = (
        f"{'server':36} {'KB/idle':>8} {f'connect {n:,}':>14} {'fan-out p50/p99':>16}"
        f" {'lost':>5} {'CPU/deliv':>10} {'deliv/s':>9}"
    )
    lines.append("")
    lines.append(header)
    lines.append(f"{'':36} {'stream':>8} {'(s)':>14} {f'{subs:,} subs (ms)':>16}"
                 f" {'':>5} {'(us)':>10} {'100 subs':>9}")  # fmt: skip
    lines.append("-" * len(header))
    for key in ORDER:
        if key not in servers:
            continue
        server = servers[key]
        if "error" in server:
            lines.append(f"{server.get('label', key):36} error: {server['error'][:80]}")
            continue
        f = figures(server)
        connect = _fmt(f["connect_s"], ".2f")
        if f["connect_failed"]:
            connect += f" ({f['connect_failed']} failed)"
        latency = f"{_fmt(f['p50'], '.1f')} / {_fmt(f['p99'], '.1f')}"
        lost = _fmt(f["lost"])
        if f["dup"]:
            lost += f"+{f['dup']}d"
        lines.append(
            f"{server.get('label', key)[:36]:36} {_fmt(f['kb'], '.1f'):>8} {connect:>14}"
            f" {latency:>16} {lost:>5} {_fmt(f['cpu_us'], '.1f'):>10}"
            f" {_fmt(f['dps'], ',d'):>9}"
        )
    r = ratios(results)
    if r:
        lines.append("-" * len(header))
        cells = []
        for key, label, lower, target in METRICS:
            if key in r:
                item = r[key]
                sign = "<=" if lower else ">="
                mark = "met" if item["met"] else "MISSED"
                beats = all(item["beats"].values()) if item["beats"] else None
                peer = "" if beats is None else (", beats peers" if beats else ", NOT all peers")
                cells.append(f"{label} {item['ratio']}x (target {sign}{target}x: {mark}{peer})")
        lines.append("ssechat / bare: " + "; ".join(cells))
    lines.extend(_extras(results))
    return "\n".join(lines)


def _extras(results: dict) -> list[str]:
    out = [""]
    servers = results.get("servers", {})
    for key in ("bare", "ssechat"):
        idle = (servers.get(key) or {}).get("idle")
        if idle:
            out.append(
                f"idle, {key}: {idle['opened']:,}/{idle['wanted']:,} streams held "
                f"({idle['kb_per_stream']} KB/stream, RSS {idle['rss_mb']} MB, threads "
                f"{idle['threads_base']}->{idle['threads']}, DB handles "
                f"{idle['db_connections_base']}->{idle['db_connections']}; server fd limit "
                f"{idle['server_fd_limit']})"
            )
    bare_idle = (servers.get("bare") or {}).get("idle")
    mine_idle = (servers.get("ssechat") or {}).get("idle")
    if bare_idle and mine_idle and bare_idle["kb_per_stream"]:
        ratio = mine_idle["kb_per_stream"] / bare_idle["kb_per_stream"]
        out.append(f"idle memory ratio ssechat/bare at {mine_idle['opened']:,}: {ratio:.2f}x "
                   f"(target <=1.3x: {'met' if ratio <= 1.3 else 'MISSED'})")  # fmt: skip
    for key in ("ssechat", "eventstream"):
        resume = (servers.get(key) or {}).get("resume")
        if resume and "seconds" in resume:
            target = " (target < 0.5 s)" if key == "ssechat" else ""
            out.append(
                f"resume, {key}: {resume['received']:,}/{resume['events']:,} missed events in "
                f"{resume['seconds']} s{target}"
            )
    pg = results.get("postgres")
    if pg and "error" not in pg:
        one = pg["one_worker"]["steps"][-1]
        two = pg["two_workers"]["steps"][-1]
        ratio = two["p99_ms"] / one["p99_ms"] if one.get("p99_ms") else float("nan")
        sqlite = figures(servers.get("ssechat") or {}).get("p99")
        out.append(
            f"PostgreSQL, ssechat: 1 worker p50/p99 {one['p50_ms']}/{one['p99_ms']} ms, lost "
            f"{one['lost']}; 2 workers p50/p99 {two['p50_ms']}/{two['p99_ms']} ms, lost "
            f"{two['lost']}; ratio {ratio:.2f}x (target <=2x)"
            + (f"; vs SQLite single worker {two['p99_ms'] / sqlite:.2f}x" if sqlite else "")
        )
    elif pg:
        out.append(f"PostgreSQL: {pg['error']}")
    chat = results.get("chat")
    if chat and "error" not in chat and "skipped" not in chat:
        for step in chat.get("steps") or [chat]:
            out.append(
                f"chat: {step['answers']} answers at {chat['tokens_per_second']:.0f} tokens/s each:"
                f" added latency p50/p99 {step['added_p50_ms']}/{step['added_p99_ms']} ms"
                " (target p99 <=60 ms at 100),"
                f" {step['writes_per_answer']} event writes per answer"
                f" ({chat['tokens_per_answer']} tokens), CPU {step['cpu_ms_per_1000_tokens']} ms"
                f" per 1,000 tokens, server CPU {step.get('server_cpu_pct')}%"
            )
    elif chat:
        out.append(f"chat: {chat.get('error') or chat.get('skipped')}")
    return out
