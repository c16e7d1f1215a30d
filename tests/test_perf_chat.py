"""The chat's fast path: the upstream parsed per network read, and group commit of chunks.

- ``LineSplitter`` / ``parse_json``: lines split across reads (LF, CRLF, CR, a
  UTF-8 character cut in two) and JSON exactly as ``json.loads`` takes it;
- ``stream_batches``: one list of pieces per network read, the text before a bad
  line handed out before the error, for both wire formats;
- ``write_chunks``: the chunks of many answers in one transaction, answers that
  stopped streaming skipped;
- generation: many answers at once share one transaction per flush tick, each
  chunk its own ``delta`` event in id order, the deltas joined equal the content.
"""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.db import connection
from django.test.utils import CaptureQueriesContext
from hypothesis import given, settings
from hypothesis import strategies as st

from chat import generation
from chat.llm import LLMError, Usage
from chat.llm.base import LineSplitter, line_chunks, parse_json, read_lines
from chat.llm.ollama import OllamaBackend, _text_of
from chat.llm.openai import OpenAIBackend, _text_of_chunk
from chat.models import Conversation, Message
from ssechat.streams.models import Event

# -- lines and JSON ------------------------------------------------------------


def split_all(reads: list[bytes]) -> list[list[str]]:
    splitter = LineSplitter()
    out = [splitter.feed(data) for data in reads]
    out.append(splitter.feed(b"", True))
    return out


def test_lines_split_across_reads():
    assert split_all([b"a\nb", b"c\n", b"d"]) == [["a"], ["bc"], [], ["d"]]
    # CRLF cut between two reads is one line end, not two.
    assert split_all([b"a\r", b"\nb\r\n\r\n"]) == [[], ["a", "b", ""], []]
    assert split_all([b"a\rb\r", b"c"]) == [["a"], ["b"], ["c"]]
    # A multi-byte character cut in two is decoded whole; bad bytes become U+FFFD.
    word = "wörld 👋".encode()
    assert split_all([word[:2], word[2:9], word[9:] + b"\n"]) == [[], [], ["wörld 👋"], []]
    assert split_all([b"\xff\n"]) == [["\ufffd"], []]
    # U+2028 is not a line end in NDJSON or SSE (httpx's splitlines treats it as one).
    assert split_all(['{"a": "x\u2028y"}\n'.encode()]) == [['{"a": "x\u2028y"}'], []]


def test_lone_cr_before_more_text():
    splitter = LineSplitter()
    assert splitter.feed(b"a\r") == []
    assert splitter.feed(b"b\n") == ["a", "b"]


@pytest.mark.parametrize(
    "text",
    [
        *['{"a": 1}', ' {"a": 1}', '{"a": 1} ', '"x"', "[1, 2]", "3", "null", '{"a": "\\u00e9"}'],
        # What orjson refuses and json.loads accepts: NaN, infinities, a lone surrogate.
        *["[NaN, Infinity, -Infinity]", '{"a": "\\ud800"}', '{"a": 1e400}', str(2**64 - 1)],
    ],
)
def test_parse_json_is_json_loads(text):
    got, expected = parse_json(text), json.loads(text)
    assert repr(got) == repr(expected)  # repr: NaN equals nothing, not even itself


@pytest.mark.parametrize("text", ["", " ", "{", '{"a": 1} x', '{"a": 1}{"b": 2}', "1, 2", "nope"])
def test_parse_json_rejects_what_json_loads_rejects(text):
    with pytest.raises(ValueError):
        json.loads(text)
    with pytest.raises(ValueError):
        parse_json(text)


# -- NDJSON lines taken whole: the same lines, the same pieces and errors -------------

# Bytes that make lines interesting: ends (LF, CR, CRLF), JSON, multi-byte and bad UTF-8.
_BYTES = st.lists(
    st.sampled_from(
        [b"\n", b"\r", b"\r\n", b"{", b"}", b'"', b"a", b" ", b"\xc3", b"\xa9", b"\xff", b"\\"]
    ),
    max_size=40,
).map(b"".join)


class _Body:
    def __init__(self, reads: list[bytes], encoding: str = "utf-8") -> None:
        self.reads, self.encoding = reads, encoding

    async def aiter_bytes(self):
        for data in self.reads:
            yield data


async def _lines_of_chunks(reads: list[bytes], encoding: str = "utf-8") -> list[str]:
    lines: list[str] = []
    async for chunk in line_chunks(_Body(reads, encoding)):
        if chunk.__class__ is bytes:
            assert chunk
            part = chunk.decode("utf-8", "replace").split("\n")
            if chunk.endswith(b"\n"):
                assert part.pop() == ""
            lines += part
        else:
            lines += chunk
    return lines


async def _read_all_lines(reads: list[bytes], encoding: str = "utf-8") -> list[str]:
    return [line async for lines in read_lines(_Body(reads, encoding)) for line in lines]


@settings(max_examples=300, deadline=None)
@given(st.lists(_BYTES, max_size=6))
def test_line_chunks_are_the_lines_read_lines_gives(reads):
    got = asyncio.run(_lines_of_chunks(reads))
    assert got == asyncio.run(_read_all_lines(reads))


async def test_line_chunks_of_another_charset_are_text_lines():
    reads = [b"ab\xe9\ncd"]
    chunks = [c async for c in line_chunks(_Body(reads, "latin-1"))]
    assert chunks == [["ab\xe9"], ["cd"]]


_TEXT_LINES = st.one_of(
    # The usual line, with other fields around it, and variations of each part.
    st.builds(
        lambda content, done, extra: json.dumps(
            {"model": "m", **extra, "message": {"content": content}, "done": done}
        ),
        st.text(max_size=8),
        st.sampled_from([False, True, None, 0, "false"]),
        st.dictionaries(
            st.sampled_from(["error", "eval_count", "created_at", "message"]),
            st.one_of(st.none(), st.integers(), st.text(max_size=3), st.just({"content": "z"})),
            max_size=2,
        ),
    ),
    st.sampled_from(
        [
            '{"message": {"content": 5}}',
            '{"message": null}',
            "[1]",
            "{",
            "",
            "   ",
            '{"message": {"content": "a"}} {"message": {"content": "b"}}',
            '{"message": {"content": "\\ud800"}}',
            '{"message": {"content": "x"}, "x": NaN}',
            '{"message": {"content": "a", "content": "b"}}',
            '{"error": null}',
        ]
    ),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(_TEXT_LINES, max_size=6))
def test_text_lines_taken_whole_are_what_parse_makes_of_them(lines):
    """Where ``_text_of`` takes a read's lines (all usual text lines), ``_parse`` makes
    the same pieces of them, with no error and no end; where it does not, ``_parse``
    reads them."""
    chunk = "".join(line + "\n" for line in lines).encode("utf-8", "surrogatepass")
    taken = _text_of(chunk)
    if taken is not None:
        backend = OllamaBackend(url="http://m.test", model="m")
        text_lines = chunk.decode("utf-8", "replace").split("\n")
        assert backend._parse(text_lines) == (taken, None, False)


_CHOICES = st.fixed_dictionaries(
    {},
    optional={
        "index": st.sampled_from([0, 1, 0.0, None, True]),
        "delta": st.one_of(
            st.none(),
            st.just("x"),
            st.fixed_dictionaries(
                {}, optional={"content": st.one_of(st.none(), st.text(max_size=5), st.integers())}
            ),
        ),
        "finish_reason": st.sampled_from([None, "stop", "", 0]),
    },
)
_CHUNKS = st.one_of(
    st.builds(
        lambda choices, more: json.dumps({"id": "c", "choices": choices, **more}),
        st.lists(_CHOICES, max_size=3),
        st.fixed_dictionaries(
            {},
            optional={
                "usage": st.sampled_from([None, 5, {"prompt_tokens": 1, "completion_tokens": 2}]),
                "error": st.sampled_from([None, "down", {"message": "down"}]),
            },
        ),
    ),
    st.sampled_from(
        [
            "{",
            "[]",
            '{"choices": "x"}',
            "NaN",
            '{"choices": [{"delta": {"content": "\\ud800"}}]}',
            '{"choices": [{"delta": {"content": "a"}}], "choices": []}',
        ]
    ),
)


def test_a_usual_chunk_is_read_whole():
    raw = '{"id": "c", "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": null}]'
    assert _text_of_chunk(raw + ', "usage": null}') == ("hi", None, False)
    assert _text_of_chunk(raw + "}") == ("hi", None, False)


@settings(max_examples=400, deadline=None)
@given(_CHUNKS)
def test_chunks_read_whole_are_what_read_chunk_makes_of_them(raw):
    """Where ``_text_of_chunk`` takes a frame (a usual chunk), ``_read_chunk`` makes the
    same of it; where it does not, ``_read_chunk`` reads it."""
    taken = _text_of_chunk(raw)
    if taken is not None:
        backend = OpenAIBackend(url="http://m.test", model="m")
        assert backend._read_chunk("message", raw) == taken


# -- one batch per network read ---------------------------------------------------


def streamed(cls, reads: list[bytes], content_type: str):
    async def body():
        for data in reads:
            yield data

    def handler(request):
        return httpx.Response(200, content=body(), headers={"content-type": content_type})

    return cls(url="http://m.test", model="m", transport=httpx.MockTransport(handler))


async def batches_of(backend) -> tuple[list[list], str | None]:
    out: list[list] = []
    try:
        async for batch in backend.stream_batches([{"role": "user", "content": "hi"}]):
            out.append(batch)
    except LLMError as exc:
        return out, str(exc)
    return out, None


def ndjson(content: str, done: bool = False, **extra) -> bytes:
    line = {"model": "m", "message": {"role": "assistant", "content": content}, "done": done}
    return (json.dumps({**line, **extra}, separators=(",", ":")) + "\n").encode()


async def test_ollama_batches_follow_the_reads():
    a, b, c = ndjson("A"), ndjson("B"), ndjson("C")
    end = ndjson("", True, prompt_eval_count=2, eval_count=3)
    backend = streamed(OllamaBackend, [a + b + c[:7], c[7:], end], "application/x-ndjson")
    batches, error = await batches_of(backend)
    assert error is None
    assert batches == [["A", "B"], ["C"], [Usage(2, 3)]]
    # stream() still yields piece by piece.
    pieces = [p async for p in backend.stream([])]
    assert pieces == ["A", "B", "C", Usage(2, 3)]


async def test_ollama_text_before_a_bad_line_comes_first():
    reads = [ndjson("A") + ndjson("B") + b"not json\n" + ndjson("C")]
    batches, error = await batches_of(streamed(OllamaBackend, reads, "application/x-ndjson"))
    assert batches == [["A", "B"]]
    assert error.startswith("The model server sent a malformed line: not json")
    reads = [ndjson("A") + b'{"error": "boom"}\n']
    batches, error = await batches_of(streamed(OllamaBackend, reads, "application/x-ndjson"))
    assert batches == [["A"]] and error == "The model server reported an error: boom"
    batches, error = await batches_of(streamed(OllamaBackend, [ndjson("A")], "x"))
    assert batches == [["A"]] and error == "The model server ended the answer early."


def sse_chunk(content: str | None, finish: str | None = None) -> bytes:
    data = {"choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish}]}
    return f"data: {json.dumps(data)}\r\n\r\n".encode()


async def test_openai_batches_follow_the_reads():
    a, b, c = sse_chunk("A"), sse_chunk("B"), sse_chunk("C", "stop")
    usage = b'data: {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 3}}\n\n'
    # A CRLF cut between reads, a comment, an event split in the middle of its data.
    reads = [b": keep-alive\n\n" + a + b[:-1], b[-1:] + c[:10], c[10:] + usage, b"data: [DONE]"]
    batches, error = await batches_of(streamed(OpenAIBackend, reads, "text/event-stream"))
    assert error is None
    assert batches == [["A"], ["B"], ["C"], [Usage(1, 3)]]


async def test_openai_text_before_a_bad_frame_comes_first():
    reads = [sse_chunk("A") + b"data: {oops\n\n" + sse_chunk("B")]
    batches, error = await batches_of(streamed(OpenAIBackend, reads, "text/event-stream"))
    assert batches == [["A"]]
    assert "malformed line" in error
    reads = [sse_chunk("A") + b'data: {"error": {"message": "overloaded"}}\n\n']
    batches, error = await batches_of(streamed(OpenAIBackend, reads, "text/event-stream"))
    assert batches == [["A"]] and error == "The model server reported an error: overloaded"


# -- group commit -----------------------------------------------------------------


def make_answers(user, count: int) -> list[Message]:
    answers = []
    for _ in range(count):
        conversation = Conversation.objects.create(owner=user, title="t")
        question = generation.create_user_message(conversation, "q")
        answers.append(generation.create_answer(question, conversation))
    return answers


@pytest.mark.django_db(transaction=True)
def test_write_chunks_is_one_transaction_for_many_answers(alice):
    answers = make_answers(alice, 5)
    Message.objects.filter(pk=answers[2].pk).update(status=Message.Status.CANCELLED)
    chunks = [(a.pk, a.conversation_id, f"text {i} ", f"text {i} ") for i, a in enumerate(answers)]
    with CaptureQueriesContext(connection) as queries:
        gone = generation.write_chunks(chunks)
    assert gone == {answers[2].pk}
    begins = [q for q in queries.captured_queries if q["sql"].upper().startswith("BEGIN")]
    assert len(begins) <= 1  # one transaction (SQLite shows its BEGIN; others may not)
    # One SELECT, one event per live chunk, one UPDATE statement for all of them.
    assert len(queries.captured_queries) <= 1 + 1 + 4 + 1 + 1
    second = generation.write_chunks([(a.pk, a.conversation_id, "more", "more") for a in answers])
    assert second == {answers[2].pk}
    for i, answer in enumerate(answers):
        answer.refresh_from_db()
        deltas = list(
            Event.objects.filter(channel=f"chat:message:{answer.pk}", type="delta").order_by("id")
        )
        if i == 2:
            assert deltas == [] and answer.content == ""
            continue
        texts = [json.loads(e.data)["text"] for e in deltas]
        assert texts == [f"text {i} ", "more"]
        assert answer.content == "".join(texts)
        assert answer.last_event_id == deltas[-1].id
        assert all(e.parent == f"chat:conversation:{answer.conversation_id}" for e in deltas)


def deltas_of(answer: Message) -> list[tuple[int, str]]:
    events = Event.objects.filter(channel=f"chat:message:{answer.pk}", type="delta")
    return [(e.id, json.loads(e.data)["text"]) for e in events.order_by("id")]


@pytest.mark.django_db(transaction=True)
def test_chunks_are_published_at_once_and_saved_in_the_row_now_and_then(alice):
    answer, other = make_answers(alice, 2)
    # Published, not saved: the row keeps its content and last_event_id.
    generation.write_chunks([(answer.pk, answer.conversation_id, "one ", None)])
    generation.write_chunks([(answer.pk, answer.conversation_id, "two ", None)])
    answer.refresh_from_db()
    assert [t for _, t in deltas_of(answer)] == ["one ", "two "]
    assert answer.content == "" and answer.last_event_id is None
    # Saved: what was published since the last save, up to this chunk's delta.
    generation.write_chunks(
        [
            (answer.pk, answer.conversation_id, "three ", "one two three "),
            (other.pk, other.conversation_id, "x", None),
        ]
    )
    answer.refresh_from_db()
    deltas = deltas_of(answer)
    assert answer.content == "one two three " and answer.last_event_id == deltas[-1][0]
    generation.write_chunks([(answer.pk, answer.conversation_id, "four", None)])
    # The end of the answer appends the deltas the row does not have yet, wherever it
    # is ended (here: cancelled as from another process, which knows nothing unsaved).
    done = generation.cancel_answer_sync(answer.pk)
    assert done.content == "one two three four"
    assert done.content == "".join(t for _, t in deltas_of(answer))
    assert done.status == Message.Status.CANCELLED
    finished = Event.objects.get(channel=f"chat:message:{answer.pk}", type="done")
    assert json.loads(finished.data)["content"] == "one two three four"
    assert done.last_event_id == finished.id
    # A tail the process still held (never published) follows, as its own delta.
    ended = generation.finalize(other.pk, status=Message.Status.COMPLETE, tail="y", written=1)
    assert ended.content == "xy" and [t for _, t in deltas_of(other)] == ["x", "y"]


@pytest.mark.django_db(transaction=True)
async def test_a_streaming_answer_saves_its_text_about_once_a_second(alice, settings):
    settings.SSECHAT_LLM_BACKEND = "demo"
    settings.SSECHAT_DEMO_TOKENS_PER_SECOND = 200
    settings.SSECHAT_CHAT_FLUSH_MS = 20
    settings.SSECHAT_CHAT_SAVE_MS = 250
    (answer,) = await sync_to_async(make_answers)(alice, 1)
    words = " ".join(f"w{i}" for i in range(200))  # 1 s at 200 tokens a second
    history = [{"role": "user", "content": f"[demo:echo] {words}"}]
    saves: list[tuple[int, int]] = []  # (content length, delta events) seen in the row

    async def watch() -> None:
        while True:
            row = await Message.objects.aget(pk=answer.pk)
            if row.status != Message.Status.STREAMING:
                return
            if not saves or saves[-1][0] != len(row.content):
                deltas = await sync_to_async(deltas_of)(answer)
                upto = [t for i, t in deltas if row.last_event_id and i <= row.last_event_id]
                assert row.content == "".join(upto)  # the row matches its last_event_id
                saves.append((len(row.content), len(deltas)))
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch())
    await asyncio.wait_for(generation.launch(answer, history), 30)
    await asyncio.wait_for(watcher, 10)
    await answer.arefresh_from_db()
    deltas = await sync_to_async(deltas_of)(answer)
    assert answer.content == words and "".join(t for _, t in deltas) == words
    # Many deltas, few saves: the row was not rewritten at every tick.
    assert len(deltas) >= 10
    assert 1 <= len([s for s in saves if s[0]]) <= len(deltas) // 2


@pytest.mark.django_db(transaction=True)
async def test_many_answers_share_one_transaction_per_tick(alice, settings):
    settings.SSECHAT_LLM_BACKEND = "demo"
    settings.SSECHAT_DEMO_TOKENS_PER_SECOND = 400
    settings.SSECHAT_CHAT_FLUSH_MS = 50
    settings.SSECHAT_CHAT_FLUSH_CHARS = 100_000
    count = 12
    answers = await sync_to_async(make_answers)(alice, count)
    words = " ".join(f"w{i}" for i in range(120))  # 120 tokens: 0.3 s at 400 a second
    history = [{"role": "user", "content": f"[demo:echo] {words}"}]
    flusher = generation._flusher()
    before, ended_before = flusher.transactions, flusher.ended
    started = asyncio.get_running_loop().time()
    tasks = [generation.launch(a, history) for a in answers]
    await asyncio.wait_for(asyncio.gather(*tasks), 30)
    seconds = asyncio.get_running_loop().time() - started
    transactions = flusher.transactions - before
    # The answers' ends went with the ticks (write_tick), not a transaction each.
    assert flusher.ended - ended_before == count

    def check() -> list[int]:
        writes = []
        for answer in answers:
            answer.refresh_from_db()
            assert answer.status == Message.Status.COMPLETE, answer.error
            events = list(Event.objects.filter(channel=f"chat:message:{answer.pk}").order_by("id"))
            assert [e.type for e in events][-1] == "done"
            deltas = [json.loads(e.data)["text"] for e in events if e.type == "delta"]
            assert "".join(deltas) == answer.content == words
            writes.append(len(deltas))
        return writes

    writes = await sync_to_async(check)()
    ticks = seconds / 0.05 + 2
    # Writes per answer are bounded by time (one per tick), not by its 120 tokens ...
    assert max(writes) <= ticks, (writes, seconds)
    # ... and the answers share their ticks: far fewer transactions than chunks.
    assert transactions <= ticks, (transactions, seconds)
    assert sum(writes) >= 2 * transactions


@pytest.mark.django_db(transaction=True)
async def test_cancel_while_streaming_stops_the_answer(alice, settings):
    settings.SSECHAT_LLM_BACKEND = "demo"
    settings.SSECHAT_DEMO_TOKENS_PER_SECOND = 200
    settings.SSECHAT_CHAT_FLUSH_MS = 20
    [answer] = await sync_to_async(make_answers)(alice, 1)
    words = " ".join(f"w{i}" for i in range(400))
    task = generation.launch(answer, [{"role": "user", "content": f"[demo:echo] {words}"}])
    await asyncio.sleep(0.3)
    cancelled = await generation.cancel_answer(answer.pk)
    assert cancelled is not None and cancelled.status == Message.Status.CANCELLED
    await asyncio.wait_for(task, 10)
    assert answer.pk not in generation.active_ids()

    def check() -> None:
        answer.refresh_from_db()
        events = list(Event.objects.filter(channel=f"chat:message:{answer.pk}").order_by("id"))
        assert [e.type for e in events][-1] == "done"
        assert [e.type for e in events].count("done") == 1
        deltas = [json.loads(e.data)["text"] for e in events if e.type == "delta"]
        assert "".join(deltas) == answer.content
        assert 0 < len(answer.content) < len(words)

    await sync_to_async(check)()


async def test_a_compressed_body_is_decoded():
    import gzip

    body = gzip.compress(ndjson("A") + ndjson("B") + ndjson("", True, eval_count=2))

    def handler(request):
        headers = {"content-type": "application/x-ndjson", "content-encoding": "gzip"}
        return httpx.Response(200, content=body, headers=headers)

    backend = OllamaBackend(url="http://m.test", model="m", transport=httpx.MockTransport(handler))
    batches, error = await batches_of(backend)
    assert error is None
    assert [p for batch in batches for p in batch] == ["A", "B", Usage(0, 2)]


# -- the lean HTTP client (chat.llm.rawhttp) ---------------------------------------


async def raw_server(script):
    """A TCP server that reads the request head and body, then runs ``script(writer)``."""

    async def handle(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
        await reader.readexactly(length)
        try:
            await script(writer)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def raw_body(url: str, read_timeout: float = 5.0) -> tuple[int, bytes, str | None]:
    from chat.llm.rawhttp import post_stream

    body = b""
    try:
        async with post_stream(
            url + "/x", {"a": 1}, {"User-Agent": "t"}, connect_timeout=2, read_timeout=read_timeout
        ) as response:
            async for data in response.aiter_bytes():
                body += data
    except httpx.HTTPError as exc:
        return 0, body, type(exc).__name__
    return response.status_code, body, None


def write_in_pieces(data: bytes, step: int):
    async def script(writer):
        for i in range(0, len(data), step):
            writer.write(data[i : i + step])
            await writer.drain()
            await asyncio.sleep(0)

    return script


CHUNKED = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nTrailer: x\r\n\r\n"
)


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
async def test_raw_client_dechunks_across_any_split(step):
    server, url = await raw_server(write_in_pieces(CHUNKED, step))
    async with server:
        assert await raw_body(url) == (200, b"hello, world", None)


async def test_raw_client_body_framings():
    length = b"HTTP/1.1 404 Not Found\r\nContent-Length: 5\r\n\r\nnope!"
    close = b"HTTP/1.1 200 OK\r\n\r\nuntil the end"
    cut = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel"
    bad = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n"
    expected = [
        (length, (404, b"nope!", None)),
        (close, (200, b"until the end", None)),
        (cut, (0, b"hel", "RemoteProtocolError")),
        (bad, (0, b"", "RemoteProtocolError")),
        (b"", (0, b"", "RemoteProtocolError")),
    ]
    for data, result in expected:
        server, url = await raw_server(write_in_pieces(data, 1000))
        async with server:
            assert await raw_body(url) == result, data


async def test_raw_client_stall_times_out_once_per_silence():
    async def script(writer):
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(6):  # data every 0.1 s: never 0.3 s of silence
            writer.write(b"1\r\nx\r\n")
            await writer.drain()
            await asyncio.sleep(0.1)
        await asyncio.sleep(2)

    server, url = await raw_server(script)
    async with server:
        loop = asyncio.get_running_loop()
        started = loop.time()
        _, body, error = await raw_body(url, read_timeout=0.3)
        assert (body, error) == (b"xxxxxx", "ReadTimeout")
        assert 0.8 < loop.time() - started < 1.5


async def test_raw_client_interim_responses_trailing_data_and_cut_lengths():
    interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    after_end = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nnope!garbage"
    after_chunks = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nxx"
    close_header = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end"
    short = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nnop"
    upgrade = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\nxx"
    expected = [
        (interim, (200, b"ok", None)),
        (after_end, (200, b"nope!", None)),
        (after_chunks, (200, b"abc", None)),
        (close_header, (200, b"until the end", None)),
        (short, (0, b"nop", "RemoteProtocolError")),
        (upgrade, (0, b"", "RemoteProtocolError")),
    ]
    for data, result in expected:
        for step in (1, 1000):
            server, url = await raw_server(write_in_pieces(data, step))
            async with server:
                assert await raw_body(url) == result, (data, step)


async def test_raw_client_reason_phrase_and_charset():
    from chat.llm.rawhttp import post_stream

    async def script(writer):
        writer.write(
            b"HTTP/1.1 503 Busy Now\r\nContent-Type: text/plain; charset=latin-1\r\n"
            b"Content-Length: 7\r\n\r\nab\xe9\r\ncd"
        )

    server, url = await raw_server(script)
    async with server:
        async with post_stream(url + "/x", {}, {}, connect_timeout=2, read_timeout=2) as response:
            batches = [batch async for batch in read_lines(response)]
    assert (response.status_code, response.reason_phrase) == (503, "Busy Now")
    assert batches == [["abé"], ["cd"]]  # the unterminated tail comes at the end


async def test_raw_client_holds_text_until_just_before_it_is_taken():
    """With ``next_take`` set (an answer's generation: its next flush tick), what comes
    before that moment is handed over in one wake-up just before it; once the moment
    has passed, text comes as it arrives."""
    from chat.llm import rawhttp
    from chat.llm.base import next_take

    async def script(writer):
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        await writer.drain()
        for piece in (b"a", b"b", b"c"):
            await asyncio.sleep(0.03)  # after the head: what comes with it is handed over
            writer.write(b"1\r\n" + piece + b"\r\n")
            await writer.drain()
        await asyncio.sleep(0.5)  # past the take
        writer.write(b"1\r\nd\r\n0\r\n\r\n")
        await writer.drain()

    loop = asyncio.get_running_loop()
    take = loop.time() + 0.4
    next_take.set(lambda: take)
    received = []
    server, url = await raw_server(script)
    async with server:
        async with rawhttp.post_stream(
            url + "/x", {}, {}, connect_timeout=2, read_timeout=5
        ) as response:
            async for data in response.aiter_bytes():
                received.append((loop.time(), data))
    assert [data for _, data in received] == [b"abc", b"d"]
    # Timers never fire early (asyncio's clock resolution aside).
    assert received[0][0] >= take - rawhttp.TAKE_LEAD - 0.001


# -- starting an answer: few, plain statements ---------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_message_post_checks_and_stores_in_few_plain_statements(alice, bob, settings):
    """The conversation's lock, whether it has an answer being written and the user's
    limits are one query; the exchange five more; the history one. What they decide
    is what the ORM's checks decided (the API tests check the refusals)."""
    from chat import api

    settings.SSECHAT_CHAT_MAX_ACTIVE_ANSWERS = 2
    conversation = Conversation.objects.create(owner=alice, title="")
    with CaptureQueriesContext(connection) as queries:
        question, answer, history = api._post_message(alice.pk, conversation.pk, "hi there")
    statements = [
        q["sql"]
        for q in queries.captured_queries
        if not q["sql"].startswith(("BEGIN", "COMMIT"))
        and "pg_get_serial_sequence" not in q["sql"]  # looked up once per process
    ]
    # On PostgreSQL the events' ids are one more statement (see log._pg_insert_many).
    assert len(statements) == 1 + 5 + 1 + int(connection.vendor == "postgresql"), statements
    assert "EXISTS" in statements[0] and "COUNT(*)" in statements[0]
    assert history == [{"role": "user", "content": "hi there"}]
    conversation.refresh_from_db()
    answer.refresh_from_db()
    assert conversation.title == "hi there"
    assert answer.status == "streaming" and answer.reply_to_id == question.pk
    assert (
        answer.start_event_id
        == Event.objects.filter(channel__endswith=f":{conversation.pk}").order_by("id").last().id
    )

    # Its answer is being written: 409, as the ORM's check says.
    with pytest.raises(api.ApiError) as refused:
        api._post_message(alice.pk, conversation.pk, "again")
    assert refused.value.status == 409
    # Another conversation, and a second answer at once: within the limit of 2.
    other = Conversation.objects.create(owner=alice, title="kept")
    api._post_message(alice.pk, other.pk, "second")
    other.refresh_from_db()
    assert other.title == "kept"  # a title is given only to a conversation without one
    third = Conversation.objects.create(owner=alice, title="")
    with pytest.raises(api.ApiError) as refused:
        api._post_message(alice.pk, third.pk, "third")
    assert refused.value.status == 429
    # Someone else's conversation, or none: 404.
    for user_id, pk in ((bob.pk, conversation.pk), (alice.pk, 2**62)):
        with pytest.raises(api.ApiError) as refused:
            api._post_message(user_id, pk, "x")
        assert refused.value.status == 404
    # No limit on: the counts are not read.
    settings.SSECHAT_CHAT_MAX_ACTIVE_ANSWERS = 0
    settings.SSECHAT_CHAT_REQUESTS_PER_MINUTE = 0
    with CaptureQueriesContext(connection) as queries:
        api._post_message(alice.pk, third.pk, "third")
    assert "COUNT(*)" not in queries.captured_queries[0]["sql"]


@pytest.mark.django_db(transaction=True)
def test_a_tick_ends_many_answers_in_one_transaction(alice):
    """``write_tick``: chunks and the ends of answers in one transaction of a few
    statements however many answers end; each end as ``finalize`` would make it."""
    answers = make_answers(alice, 6)
    streaming, ending = answers[:2], answers[2:]
    generation.write_chunks([(a.pk, a.conversation_id, "saved ", "saved ") for a in ending])
    generation.write_chunks([(a.pk, a.conversation_id, "published ", None) for a in ending])
    Message.objects.filter(pk=ending[-1].pk).update(status=Message.Status.CANCELLED)
    ends = [
        generation.End(a.pk, Message.Status.COMPLETE, None, "tail", None, len("saved published "))
        for a in ending[:-2]
    ]
    ends.append(generation.End(ending[-2].pk, Message.Status.FAILED, "boom", "", None, 0))
    ends.append(generation.End(ending[-1].pk, Message.Status.COMPLETE, None, "x", None, 0))
    chunks = [(a.pk, a.conversation_id, "more", None) for a in streaming]
    with CaptureQueriesContext(connection) as queries:
        gone, finished = generation.write_tick(chunks, ends)
    # Chunks' lock, ends' rows, their deltas not yet in the rows, one INSERT (two on
    # PostgreSQL), the ends' UPDATEs (one executemany): however many answers end.
    statements = [
        q for q in queries.captured_queries if not q["sql"].startswith(("BEGIN", "COMMIT"))
    ]
    assert len(statements) <= 7, [q["sql"][:60] for q in statements]
    assert gone == set() and finished[ending[-1].pk] is None  # cancelled before: not ended
    for answer in ending[:-2]:
        done = finished[answer.pk]
        answer.refresh_from_db()
        assert answer.status == "complete" and answer.content == "saved published tail"
        assert done.content == answer.content and answer.last_event_id == done.last_event_id
        events = list(Event.objects.filter(channel=f"chat:message:{answer.pk}").order_by("id"))
        assert [e.type for e in events] == ["delta", "delta", "delta", "done"]
        assert events[-1].id == answer.last_event_id
        assert json.loads(events[-1].data)["content"] == "saved published tail"
    failed = Message.objects.get(pk=ending[-2].pk)
    assert (failed.status, failed.error, failed.content) == ("failed", "boom", "saved published ")
    assert [Message.objects.get(pk=a.pk).status for a in streaming] == ["streaming"] * 2


@pytest.mark.django_db(transaction=True)
async def test_an_end_the_tick_could_not_write_is_ended_alone(alice, settings, monkeypatch):
    settings.SSECHAT_LLM_BACKEND = "demo"
    settings.SSECHAT_DEMO_TOKENS_PER_SECOND = 1000
    answer = (await sync_to_async(make_answers)(alice, 1))[0]
    real = generation.write_tick

    def failing(chunks, ends):
        if ends:
            raise generation.OperationalError("the database went away")
        return real(chunks, ends)

    monkeypatch.setattr(generation, "write_tick", failing)
    task = generation.launch(answer, [{"role": "user", "content": "[demo:echo] one two three"}])
    await asyncio.wait_for(task, 30)
    await sync_to_async(answer.refresh_from_db)()
    assert (answer.status, answer.content) == ("complete", "one two three")
