"""Chat benchmark: many answers at once from a local upstream model at 1,000 tokens/s each.

The upstream is tests/fake_llm.py's FakeLLMServer (Ollama wire by default) in
its own process on the load generator's CPU, with one change: every
``stamp_every``-th token is ``~<monotonic ns>~ ``, made at the moment the
token is written to the socket (the others are ``word ``, about the length
of a real token). Clients post a message each through the real chat API
(``POST /api/chat/conversations/<id>/messages/``, Bearer tokens), open the
answer's stream at once, and for every stamp in a ``delta`` take the time
from the upstream's write to their read: the time ssechat adds, chunking,
database write and fan-out included.

Database writes per answer are the ``delta`` events (one transaction each:
the chunk appended to the message and its event stored), counted at the
client and in the event log. CPU per 1,000 tokens is the server's CPU time
from the first message POST on (the conversations are made before) divided by the
tokens streamed.

``python -m bench.chat upstream --port P --tokens N --rate R`` runs the upstream alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import subprocess
import sys
import time
from typing import Any

from .load import HOST, Pool, monotonic_ns, percentile, post_request
from .procs import LOAD_CPU, ROOT, cpu_seconds_of, free_port, pin

STAMP = re.compile(r"~(\d{10,20})~")
WORD = "word "


# -- the upstream -------------------------------------------------------------------------


def make_upstream(port: int, tokens: int, rate: float, stamp_every: int):
    sys.path.insert(0, str(ROOT))
    from tests.fake_llm import FakeLLMServer, _chunk, _Closed

    class StampingLLM(FakeLLMServer):
        async def _pace(self, wire, tokens_, send, closed) -> None:
            loop = asyncio.get_running_loop()
            start = loop.time()
            word = wire.token_frame(WORD)
            sent, total = 0, len(tokens_)
            while sent < total:
                if closed.is_set():
                    raise _Closed
                upto = min(total, max(sent + 1, int((loop.time() - start) * rate) + 1))
                now = monotonic_ns()
                frames = [
                    wire.token_frame(f"~{now}~ ") if i % stamp_every == 0 else word
                    for i in range(sent, upto)
                ]
                await _chunk(send, b"".join(frames))
                sent = upto
                if sent < total:
                    delay = start + sent / rate - loop.time()
                    await asyncio.sleep(max(delay, self.flush_interval))

    return StampingLLM(
        port=port, reply_text=WORD * tokens, tokens_per_second=rate, flush_interval=0.005
    )


def upstream_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.chat upstream")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--stamp-every", type=int, default=20)
    parser.add_argument("--max-seconds", type=float, default=300.0)
    args = parser.parse_args(argv)
    pin(LOAD_CPU)
    server = make_upstream(args.port, args.tokens, args.rate, args.stamp_every).start()
    print(json.dumps({"url": server.url}), flush=True)
    deadline = time.monotonic() + args.max_seconds
    try:
        # Until the benchmark closes our stdin (or the deadline).
        import select

        while time.monotonic() < deadline:
            ready, _, _ = select.select([sys.stdin], [], [], 1.0)
            if ready and not sys.stdin.readline():
                break
    finally:
        server.stop()


# -- the clients ---------------------------------------------------------------------------


class AnswerStream(asyncio.Protocol):
    """One answer's event stream: delta text stamps, delta count, done."""

    def __init__(self, request: bytes, answer: Answer):
        self.request = request
        self.answer = answer
        self.buf = b""
        self.headers_done = False
        self.transport = None
        self.finished = asyncio.get_running_loop().create_future()

    def connection_made(self, transport):
        self.transport = transport
        self.answer.connected_at = monotonic_ns()
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = monotonic_ns()
        self.buf += data
        if not self.headers_done:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            self.answer.headers_at = now
            status = int(self.buf.split(b" ", 2)[1])
            self.answer.status = status
            self.buf = self.buf[end + 4 :]
            self.headers_done = True
            if status != 200:
                self._finish()
                return
        while True:
            end = self.buf.find(b"\n\n")
            if end < 0:
                return
            frame, self.buf = self.buf[:end], self.buf[end + 2 :]
            event, data = "message", []
            for line in frame.split(b"\n"):
                if line.startswith(b"event:"):
                    event = line[6:].strip().decode()
                elif line.startswith(b"data:"):
                    data.append(line[5:].strip())
            if event == "delta":
                text = json.loads(b"\n".join(data))["text"]
                if not self.answer.first_delta_at:
                    self.answer.first_delta_at = now
                self.answer.deltas += 1
                self.answer.tokens += text.count(" ")
                for stamp in STAMP.findall(text):
                    self.answer.latencies.append(now - int(stamp))
                    self.answer.stamps.append(int(stamp))
            elif event == "done":
                self.answer.done = json.loads(b"\n".join(data))
                self.answer.done_at = now
                self._finish()
                return

    def _finish(self) -> None:
        if not self.finished.done():
            self.finished.set_result(None)
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc):
        if not self.finished.done():
            self.finished.set_result(None)


class Answer:
    def __init__(self, token: str):
        self.token = token
        self.conversation = 0
        self.status = 0
        self.deltas = 0
        self.tokens = 0
        self.latencies: list[int] = []
        self.stamps: list[int] = []  # when each stamp was written upstream (monotonic ns)
        self.done: dict | None = None
        self.posted_at = 0
        self.first_delta_at = 0
        self.accepted_at = 0  # the message POST's response
        self.connected_at = 0  # the stream's connection made
        self.headers_at = 0  # the stream's response head
        self.done_at = 0
        self.error = ""


async def _json_post(pool: Pool, port: int, path: str, token: str, body: dict) -> tuple[int, dict]:
    data = json.dumps(body).encode()
    status, raw = await pool.post(
        post_request(path, port, data, f"Authorization: Bearer {token}\r\n"), timeout=60
    )
    try:
        return status, json.loads(raw or b"{}")
    except ValueError:
        return status, {"raw": raw[:200].decode("latin1")}


async def drive(port: int, tokens: list[str], timeout: float, measure: Any = None) -> list[Answer]:
    """A conversation per token, then (measured: ``await measure()`` first) a message
    posted in each at once, and each answer read."""
    answers = [Answer(t) for t in tokens]
    pool = Pool(port, len(answers))
    loop = asyncio.get_running_loop()
    for answer in answers:  # conversations first, outside the measured part
        status, body = await _json_post(pool, port, "/api/chat/conversations/", answer.token, {})
        if status != 201:
            raise RuntimeError(f"creating a conversation: HTTP {status} {body}")
        answer.conversation = body["id"]
    if measure is not None:
        await measure()

    async def one(answer: Answer) -> None:
        answer.posted_at = monotonic_ns()
        path = f"/api/chat/conversations/{answer.conversation}/messages/"
        status, body = await _json_post(pool, port, path, answer.token, {"content": "bench"})
        answer.accepted_at = monotonic_ns()
        if status != 201:
            answer.error = f"HTTP {status}: {str(body)[:200]}"
            return
        request = (
            f"GET {body['stream_url']} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
            f"Accept: text/event-stream\r\nAuthorization: Bearer {answer.token}\r\n\r\n"
        ).encode()
        stream = AnswerStream(request, answer)
        await loop.create_connection(lambda: stream, HOST, port)
        try:
            await asyncio.wait_for(stream.finished, timeout)
        except TimeoutError:
            answer.error = "timeout"
            if stream.transport is not None:
                stream.transport.close()

    await asyncio.gather(*(one(a) for a in answers))
    pool.close()
    return answers


def summarize(answers: list[Answer], seconds: float, cpu: float, stored_deltas: int) -> dict:
    ms = sorted(x / 1e6 for a in answers for x in a.latencies)
    # Once every answer streams (from the last answer's first token on): without the
    # start, where the server also takes the answers' requests and stream connects.
    all_streaming = max((a.stamps[0] for a in answers if a.stamps), default=0)
    steady = sorted(
        x / 1e6
        for a in answers
        for stamp, x in zip(a.stamps, a.latencies, strict=True)
        if stamp >= all_streaming
    )
    # p99 per quarter second of upstream time, from the first stamp: the start (answers'
    # requests, stream connects) against the rest.
    first = min((a.stamps[0] for a in answers if a.stamps), default=0)
    slices: dict[int, list[float]] = {}
    for a in answers:
        for stamp, x in zip(a.stamps, a.latencies, strict=True):
            slices.setdefault((stamp - first) // 250_000_000, []).append(x / 1e6)
    timeline = [
        round(percentile(sorted(slices[k]), 99), 1) for k in sorted(slices) if len(slices[k]) > 9
    ]
    complete = [a for a in answers if a.done and a.done.get("status") == "complete"]
    tokens = sum(a.tokens for a in answers)
    deltas = [a.deltas for a in answers if a.done]
    durations = sorted((a.done_at - a.posted_at) / 1e9 for a in complete)
    # From the message POST's response to the answer stream's response head.
    opening = sorted(
        (a.headers_at - a.accepted_at) / 1e6 for a in answers if a.headers_at and a.accepted_at
    )
    connecting = sorted(
        (a.connected_at - a.accepted_at) / 1e6 for a in answers if a.connected_at and a.accepted_at
    )
    # The message POST's round trip (the user's and the answer's rows stored).
    posting = sorted((a.accepted_at - a.posted_at) / 1e6 for a in answers if a.accepted_at)
    # From the message POST to the answer's first text at the client (the upstream
    # answers at once): what a burst of answers costs the last ones to start.
    first_text = sorted((a.first_delta_at - a.posted_at) / 1e6 for a in answers if a.first_delta_at)
    return {
        "answers": len(answers),
        "complete": len(complete),
        "errors": sorted({a.error for a in answers if a.error})[:5],
        "statuses": sorted({str(a.done.get("status")) for a in answers if a.done}),
        "tokens_received": tokens,
        "stamps": len(ms),
        "added_p50_ms": round(percentile(ms, 50), 1) if ms else None,
        "added_p99_ms": round(percentile(ms, 99), 1) if ms else None,
        "added_max_ms": round(ms[-1], 1) if ms else None,
        "added_p99_all_streaming_ms": round(percentile(steady, 99), 1) if steady else None,
        "writes_per_answer": round(sum(deltas) / len(deltas), 1) if deltas else None,
        "writes_per_answer_max": max(deltas) if deltas else None,
        "stored_delta_events": stored_deltas,
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu, 2),
        "server_cpu_pct": round(cpu / seconds * 100, 1) if seconds else None,
        "cpu_ms_per_1000_tokens": round(cpu / tokens * 1e6, 1) if tokens else None,
        "added_p99_per_quarter_second_ms": timeline,
        "post_p50_ms": round(percentile(posting, 50), 1) if posting else None,
        "post_max_ms": round(posting[-1], 1) if posting else None,
        "stream_open_p50_ms": round(percentile(opening, 50), 1) if opening else None,
        "stream_open_max_ms": round(opening[-1], 1) if opening else None,
        # Of which connecting (the server's accept: its loop's delay).
        "stream_connect_p50_ms": round(percentile(connecting, 50), 1) if connecting else None,
        "stream_connect_max_ms": round(connecting[-1], 1) if connecting else None,
        "first_text_p50_ms": round(percentile(first_text, 50), 1) if first_text else None,
        "first_text_max_ms": round(first_text[-1], 1) if first_text else None,
        "answer_seconds_p50": round(percentile(durations, 50), 2) if durations else None,
    }


def run_chat(cfg, log, target=None) -> dict:
    """The chat figures (called by ``python -m bench``): one step per number of answers."""
    from . import run as bench

    if not (ROOT / "chat" / "api.py").exists():
        return {"skipped": "the chat API is not in the project yet"}
    if target is None:
        targets = bench.make_targets(cfg.ssechat_feed, ssechat_loop=cfg.ssechat_loop)
        target = next(t for t in targets if t.key == "ssechat")
    steps = (cfg.chat_answers,) if cfg.chat_answers else ((30,) if cfg.quick else (10, 100))
    tokens_n = cfg.chat_tokens or (1000 if cfg.quick else 2000)
    rate = 1000.0
    backend = cfg.chat_backend
    up_port = free_port()
    upstream = subprocess.Popen(
        [sys.executable, "-m", "bench.chat", "upstream", "--port", str(up_port),
         "--tokens", str(tokens_n), "--rate", str(rate)],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    server = None
    results = []
    database = contextlib.ExitStack()
    try:
        upstream.stdout.readline()
        if cfg.chat_db == "postgres":
            db = database.enter_context(bench.pg_database("chat"))
        else:
            db = str(cfg.workdir / "chat.sqlite3")
        env = target.server_env(bench.base_env(), db)
        env.update(
            SSECHAT_LLM_BACKEND=backend, SSECHAT_LLM_URL=f"http://127.0.0.1:{up_port}",
            SSECHAT_LLM_MODEL="fake-model",
        )  # fmt: skip
        users = max(steps) + 1
        creds = bench.setup_db(target, env, users, cfg.workdir / "chat-creds.json", users)
        tokens = creds["user_tokens"]
        server = bench.start_server(target, env, "ssechat-chat", cfg)
        # One answer first (lazy imports, the upstream client, caches), not measured.
        bench.run(drive(server.port, tokens[-1:], timeout=60))
        for n in steps:
            log(f"chat: {n} answers of {tokens_n} tokens at {rate:.0f} tokens/s each ({backend})")
            # The p99 of one try moves by up to 2x on this VM: the step is tried a few
            # times and the try with the median p99 stands for it (every p99 is kept).
            tries = []
            for attempt in range(max(1, cfg.chat_repeats)):
                # The second try when there are several: the first warms the server's
                # caches (tokens, connections) and is not typical.
                profiled_try = min(1, cfg.chat_repeats - 1)
                profiled = cfg.profile and n == steps[-1] and attempt == profiled_try
                tries.append(_chat_try(server, upstream, env, tokens[:n], profiled, n, log))
                time.sleep(1.0)
            p99s = [t["added_p99_ms"] for t in tries]
            ranked = sorted(tries, key=lambda t: t["added_p99_ms"] or 0)
            result = {**ranked[len(ranked) // 2], "added_p99_tries_ms": p99s}
            results.append(result)
            if len(tries) > 1:
                log(f"  chat: {n} answers, p99 of each try {p99s} ms; the median try stands")
    finally:
        if server is not None:
            server.stop()
        database.close()
        with contextlib.suppress(Exception):
            upstream.stdin.close()
        try:
            upstream.wait(10)
        except subprocess.TimeoutExpired:
            upstream.kill()
    return {
        "backend": backend,
        "database": cfg.chat_db,
        "tokens_per_second": rate,
        "tokens_per_answer": tokens_n,
        "steps": results,
        **results[-1],
    }


def _chat_try(server, upstream, env: dict, tokens: list[str], profiled: bool, n: int, log) -> dict:
    from . import run as bench

    before = _count_events(env, 0).get("delta", 0)
    profiler = bench.Profiler(server.pid, "ssechat-chat", profiled)
    marks = {}

    async def measure() -> None:  # the conversations are there: from here on
        await profiler.__aenter__()
        marks["cpu"], marks["sys"] = server.cpu_seconds(), server.system_cpu_seconds()
        marks["load"] = time.process_time() + cpu_seconds_of(upstream.pid)
        marks["started"] = time.monotonic()

    try:
        answers = bench.run(drive(server.port, tokens, timeout=180, measure=measure))
        seconds = time.monotonic() - marks["started"]
        cpu = server.cpu_seconds() - marks["cpu"]
        system = server.system_cpu_seconds() - marks["sys"]
        load_cpu = time.process_time() + cpu_seconds_of(upstream.pid) - marks["load"]
    finally:
        profiler.__exit__()
    stored = _count_events(env, 0).get("delta", 0) - before
    result = summarize(answers, seconds, cpu, stored)
    result["system_cpu_share_pct"] = round(100 * system / cpu, 1) if cpu else None
    # The upstream and the clients share the load generator's core: near 100%,
    # they, not the server, would be adding latency.
    result["load_cpu_pct"] = round(100 * load_cpu / seconds, 1) if seconds else None
    log(
        f"  chat: p99 per 0.25 s: {result['added_p99_per_quarter_second_ms']};"
        f" first text p50/max {result['first_text_p50_ms']}/"
        f"{result['first_text_max_ms']} ms; message POST p50/max {result['post_p50_ms']}/"
        f"{result['post_max_ms']} ms; stream open p50/max "
        f"{result['stream_open_p50_ms']}/{result['stream_open_max_ms']} ms"
        f" (connect {result['stream_connect_p50_ms']}/{result['stream_connect_max_ms']} ms)"
    )
    log(
        f"  chat: {result['complete']}/{n} complete, added p50/p99 "
        f"{result['added_p50_ms']}/{result['added_p99_ms']} ms"
        f" (p99 {result['added_p99_all_streaming_ms']} ms once all stream),"
        f" {result['writes_per_answer']} writes/answer,"
        f" {result['cpu_ms_per_1000_tokens']} ms CPU/1,000 tokens,"
        f" server CPU {result['server_cpu_pct']}%"
        f" ({result['system_cpu_share_pct']}% of it in the kernel),"
        f" load generator CPU {result['load_cpu_pct']}%"
    )
    return result


def _count_events(env: dict, after: int) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "bench.setup_db", "count-events", "--after", str(after)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "upstream":
        upstream_main(sys.argv[2:])
    else:
        print(__doc__)


if __name__ == "__main__":
    main()
