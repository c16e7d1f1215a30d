"""Bad input, tried against a real server: a clear 4xx, never a 500, never a crash.

- every JSON endpoint, fuzzed with hypothesis (random JSON of every shape, bodies built
  from each endpoint's own fields with wrong values, random bytes, deep nesting, odd
  content types), plus the hard cases: not JSON, bad UTF-8, empty, 100,000 levels deep,
  over the size limit with and without Content-Length;
- every stream: garbage, huge, negative, future and non-ASCII resume ids (header and
  parameter), unknown and too many query parameters, Accept variants;
- payloads that try to forge SSE frames (blank lines, CR, ``data:``/``event:``/``id:``
  lines) in notification titles and bodies, chat messages and model output (the demo
  model echoes them), read back raw with the spec parser: they arrive as data.

The encoder itself is fuzzed in tests/test_wire.py; here it is the whole server. All of
it runs on one server for the module, whose users are made (and deleted) by the module.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.db import connection
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chat.models import Message
from ssechat.accounts.models import ApiToken

from .hardening_tools import record
from .live import LiveServer, uvicorn_server
from .sse import EventStreamParser, parse
from .test_chat_helpers import FAST

SERVER_ENV = {
    **FAST,
    "SSECHAT_CHAT_REQUESTS_PER_MINUTE": "0",  # fuzzing starts many answers
    "SSECHAT_CHAT_MAX_ACTIVE_ANSWERS": "50",
}
FUZZ = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,  # the same examples on every run: CI stays reproducible
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@dataclass
class World:
    """The module's server and the objects the requests are about."""

    server: LiveServer
    tokens: dict[str, str]
    username: str = ""
    ids: dict[str, int] = field(default_factory=dict)
    counts: dict[str, dict[int, int]] = field(default_factory=dict)

    def client(self, who: str = "alice") -> httpx.Client:
        return httpx.Client(
            base_url=self.server.url,
            headers={"Authorization": f"Bearer {self.tokens[who]}"},
            timeout=30,
        )

    def count(self, endpoint: str, status: int) -> None:
        statuses = self.counts.setdefault(endpoint, {})
        statuses[status] = statuses.get(status, 0) + 1


def _read_answer(http: httpx.Client, answer_id: int) -> list:
    """Every event of an answer's stream (the server ends it after ``done``)."""
    response = http.get(f"/api/chat/messages/{answer_id}/stream/", timeout=60)
    assert response.status_code == 200, response.text[:200]
    return parse(response.content).events


@pytest.fixture(scope="module")
def world(live_server, django_db_blocker, log_dir):
    """A server, two users (``alice``; ``sender`` may send notifications) and their objects.

    The tests of this module use no database fixture (so nothing is flushed between them);
    the users are made here and deleted, with everything they own, at the end. Asking for
    ``live_server`` is what makes pytest-django set up the test database for them."""
    tag = uuid.uuid4().hex[:8]
    with django_db_blocker.unblock():
        assert "test" in connection.settings_dict["NAME"], "not on the test database"
        server = uvicorn_server(log_dir, **SERVER_ENV).start()
        User = get_user_model()
        alice = User.objects.create_user(f"fuzz-alice-{tag}", password="x")
        sender = User.objects.create_user(f"fuzz-sender-{tag}", password="x")
        sender.user_permissions.add(Permission.objects.get(codename="add_notification"))
        tokens = {
            "alice": ApiToken.create_for(alice, name="fuzz")[1],
            "sender": ApiToken.create_for(sender, name="fuzz")[1],
        }
    world = World(server, tokens, alice.username)
    with world.client() as http:
        world.ids["conversation"] = http.post("/api/chat/conversations/", json={}).json()["id"]
        finished = http.post("/api/chat/conversations/", json={}).json()["id"]
        posted = http.post(
            f"/api/chat/conversations/{finished}/messages/", json={"content": "[demo:echo] ok"}
        ).json()
        world.ids["answer"] = posted["assistant_message"]["id"]
        _read_answer(http, world.ids["answer"])
        # A conversation whose answer is still being written: messages to it get 409.
        busy = http.post("/api/chat/conversations/", json={}).json()["id"]
        posted = http.post(
            f"/api/chat/conversations/{busy}/messages/",
            json={"content": "[demo:slow] tell me a long story " * 20},
        ).json()
        world.ids["busy_conversation"] = busy
        world.ids["busy_answer"] = posted["assistant_message"]["id"]
    with world.client("sender") as http:
        made = http.post("/api/notifications/", json={"recipient": alice.username, "title": "hi"})
        world.ids["notification"] = made.json()["id"]
    yield world
    with django_db_blocker.unblock():
        streaming = list(
            Message.objects.filter(conversation__owner=alice, status="streaming").values_list(
                "id", flat=True
            )
        )
    with world.client() as http:
        for message_id in streaming:
            http.post(f"/api/chat/messages/{message_id}/cancel/")
    server.stop()
    with django_db_blocker.unblock():
        User.objects.filter(pk__in=[alice.pk, sender.pk]).delete()


# -- the JSON endpoints ------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: Callable[[World], str]
    who: str = "alice"
    fields: tuple[str, ...] = ()
    parses_body: bool = True  # False: the body is ignored (it must still do no harm)


ENDPOINTS = {
    "chat.conversations.create": Endpoint(
        "POST", lambda w: "/api/chat/conversations/", fields=("title",)
    ),
    "chat.conversation.update": Endpoint(
        "PATCH", lambda w: f"/api/chat/conversations/{w.ids['conversation']}/", fields=("title",)
    ),
    "chat.messages.create": Endpoint(
        "POST",
        lambda w: f"/api/chat/conversations/{w.ids['busy_conversation']}/messages/",
        fields=("content",),
    ),
    "chat.message.cancel": Endpoint(
        "POST", lambda w: f"/api/chat/messages/{w.ids['answer']}/cancel/", parses_body=False
    ),
    "chat.message.regenerate": Endpoint(
        "POST",
        lambda w: f"/api/chat/messages/{w.ids['busy_answer']}/regenerate/",
        parses_body=False,
    ),
    "notifications.create": Endpoint(
        "POST",
        lambda w: "/api/notifications/",
        who="sender",
        fields=("recipient", "topic", "level", "title", "body", "url", "data"),
    ),
    "notification.read": Endpoint(
        "POST", lambda w: f"/api/notifications/{w.ids['notification']}/read/", parses_body=False
    ),
    "notifications.read_all": Endpoint(
        "POST", lambda w: "/api/notifications/read-all/", parses_body=False
    ),
    "openai.chat.completions": Endpoint(
        "POST",
        lambda w: "/v1/chat/completions",
        fields=("model", "messages", "stream", "stream_options", "n"),
    ),
}

# Text of every kind: lone surrogates (sent as JSON escapes), NUL, line breaks, RTL marks.
ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=40)
# Text every database stores (what the frame-forging tests send, to be stored and read back).
STORABLE_TEXT = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"))
ODD_SCALARS = st.sampled_from(
    [None, True, False, 0, -1, 1.5, 2**70, -(2**63), "", " ", "\n", "x" * 300, "user",
     "[demo:echo] hi", "javascript:alert(1)", "/path", "http://example.com", "info"]
)  # fmt: skip


def json_values(text: st.SearchStrategy[str]) -> st.SearchStrategy:
    return st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | text | ODD_SCALARS,
        lambda children: (
            st.lists(children, max_size=4) | st.dictionaries(text, children, max_size=4)
        ),
        max_leaves=12,
    )


def shaped(endpoint: Endpoint, text: st.SearchStrategy[str]) -> st.SearchStrategy[dict]:
    """Objects built from the endpoint's own fields (some missing, values of any type)
    plus unknown keys: what a schema-driven fuzzer sends."""
    values = json_values(text)
    optional = {name: values for name in endpoint.fields}
    if "messages" in endpoint.fields:
        part = st.fixed_dictionaries({}, optional={"type": ODD_SCALARS, "text": values})
        message = st.fixed_dictionaries(
            {},
            optional={
                "role": st.sampled_from(["user", "assistant", "system", "developer", "tool"])
                | ODD_SCALARS,
                "content": values | st.lists(part, max_size=3),
                "name": values,
            },
        )
        optional["messages"] = st.lists(message, max_size=3) | values
    known = st.fixed_dictionaries({}, optional=optional)
    extra = st.dictionaries(text, values, max_size=2)
    return st.builds(lambda a, b: {**b, **a}, known, extra)


def nested(depth: int, kind: str) -> bytes:
    if kind == "list":
        return b"[" * depth + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


CONTENT_TYPES = st.sampled_from(
    ["application/json"] * 6 + ["application/json; charset=utf-8", "text/plain", None,
     "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "text/html"]
)  # fmt: skip


def valid_body(name: str, world: World) -> dict | None:
    """A body the endpoint accepts: the fuzzer's mutants start from it."""
    return {
        "chat.conversations.create": {"title": "t"},
        "chat.conversation.update": {"title": "t"},
        "chat.messages.create": {"content": "[demo:echo] hi"},
        "notifications.create": {
            "recipient": world.username, "topic": "general", "level": "info", "title": "t",
            "body": "b", "url": "/chat/", "data": {"k": 1},
        },
        "openai.chat.completions": {
            "model": "m", "stream": False, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "[demo:echo] hi"}],
        },
    }.get(name)  # fmt: skip


def mutants(valid: dict, text: st.SearchStrategy[str]) -> st.SearchStrategy[dict]:
    """The valid body with one thing wrong: a value of another type, a field missing, an
    unknown field (or, now and then, nothing wrong: the happy path is fuzzed too)."""
    values = json_values(text)
    keys = sorted(valid)

    def replace(key, value):
        return {**valid, key: value}

    def drop(key):
        return {k: v for k, v in valid.items() if k != key}

    def add(key, value):
        return {**valid, key: value}

    def message(part, value):  # inside messages[0] of the OpenAI body
        first = {**valid["messages"][0], part: value}
        return {**valid, "messages": [first]}

    options = [
        st.builds(replace, st.sampled_from(keys), values),
        st.builds(drop, st.sampled_from(keys)),
        st.builds(add, text, values),
        st.just(valid),
    ]
    if "messages" in valid:
        options.append(st.builds(message, st.sampled_from(["role", "content", "name"]), values))
    return st.one_of(options)


def bodies(endpoint: Endpoint, valid: dict | None) -> st.SearchStrategy[tuple[bytes, str | None]]:
    text = ANY_TEXT

    def as_json(value) -> bytes:
        return json.dumps(value, ensure_ascii=True, allow_nan=True).encode()

    options = [
        json_values(text).map(as_json),  # any JSON value: arrays, strings, numbers...
        shaped(endpoint, text).map(as_json),
        st.binary(max_size=200),
        st.builds(nested, st.integers(20, 2000), st.sampled_from(["list", "object"])),
    ]
    if valid is not None:  # twice as likely: they get past the first checks
        options += [mutants(valid, text).map(as_json)] * 2
    return st.tuples(st.one_of(options), CONTENT_TYPES)


def check_json_answer(endpoint: str, response: httpx.Response) -> None:
    assert response.status_code < 500, (endpoint, response.status_code, response.text[:300])
    content_type = response.headers.get("content-type", "")
    if endpoint.startswith("openai") and content_type.startswith("text/event-stream"):
        assert response.status_code == 200  # a valid streaming request
        return
    if response.status_code == 204:
        return
    assert content_type.startswith("application/json"), (endpoint, response.text[:300])
    body = response.json()
    if response.status_code >= 400:
        assert "error" in body, body


@pytest.mark.parametrize("name", sorted(ENDPOINTS))
def test_json_endpoints_fuzzed(world, name):
    endpoint = ENDPOINTS[name]
    path = endpoint.path(world)
    with world.client(endpoint.who) as http:

        @FUZZ
        @given(body=bodies(endpoint, valid_body(name, world)))
        def fuzz(body):
            content, content_type = body
            headers = {"Content-Type": content_type} if content_type else {}
            response = http.request(endpoint.method, path, content=content, headers=headers)
            world.count(name, response.status_code)
            check_json_answer(name, response)

        fuzz()
    record(f"fuzz_{name}", requests=sum(world.counts[name].values()),
           statuses=dict(sorted(world.counts[name].items())), server_errors=0)  # fmt: skip


LIMIT = 1024 * 1024  # DATA_UPLOAD_MAX_MEMORY_SIZE of the servers
HUGE = json.dumps({"title": "x" * (LIMIT + 100), "content": "x"}).encode()


def _chunked(data: bytes):
    for start in range(0, len(data), 64 * 1024):
        yield data[start : start + 64 * 1024]


HARD_CASES = {
    # name: (body, content type, status of an endpoint that reads JSON)
    "not json": (b"hello {", "application/json", 400),
    "bad utf-8": (b'{"title": "\xff\xfe"}', "application/json", 400),
    "bad utf-8 in a key": (b'{"\xc3\x28": 1}', "application/json", 400),
    "an array": (b"[1, 2]", "application/json", 400),
    "a string": (b'"title"', "application/json", 400),
    "NaN": (b'{"title": NaN, "content": Infinity}', "application/json", 400),
    "100000 deep": (nested(100_000, "list"), "application/json", 400),
    "deep object": (nested(5_000, "object"), "application/json", 400),
    "33 deep (the limit is 32)": (nested(33, "object"), "application/json", 400),
    "form": (b"title=x", "application/x-www-form-urlencoded", 415),
    "too large": (HUGE, "application/json", 413),
    "too large, chunked": (HUGE, "application/json", 413),
}


def _send_hard_case(world: World, name: str, case: str) -> httpx.Response:
    endpoint = ENDPOINTS[name]
    body, content_type, _ = HARD_CASES[case]
    content = _chunked(body) if case.endswith("chunked") else body
    with world.client(endpoint.who) as http:
        response = http.request(
            endpoint.method, endpoint.path(world), content=content,
            headers={"Content-Type": content_type},
        )  # fmt: skip
    check_json_answer(name, response)
    return response


KNOWN_BUGS = {
    ("chat.conversations.create", "too large"),
    *((name, "too large, chunked") for name, e in ENDPOINTS.items() if e.parses_body),
}


@pytest.mark.parametrize("name", sorted(ENDPOINTS))
def test_json_endpoints_hard_cases(world, name):
    """Each hard case gets its 4xx, in JSON (known bugs: the xfail tests below)."""
    endpoint = ENDPOINTS[name]
    for case, (body, _, status) in HARD_CASES.items():
        if (name, case) in KNOWN_BUGS or (not endpoint.parses_body and len(body) > 10_000):
            continue  # the bugs have tests below; megabytes to a body-less URL prove little
        response = _send_hard_case(world, name, case)
        if endpoint.parses_body:
            assert response.status_code == status, (case, response.status_code, response.text)


@pytest.mark.parametrize(
    "name", sorted(name for name, endpoint in ENDPOINTS.items() if endpoint.parses_body)
)
def test_json_endpoints_too_large_chunked(world, name):
    response = _send_hard_case(world, name, "too large, chunked")
    assert response.status_code == 413


def test_create_conversation_too_large(world):
    response = _send_hard_case(world, "chat.conversations.create", "too large")
    assert response.status_code == 413


def test_an_empty_body(world):
    """No body at all: 400 where a JSON object is required, fine where it is optional."""
    for name, endpoint in sorted(ENDPOINTS.items()):
        with world.client(endpoint.who) as http:
            response = http.request(endpoint.method, endpoint.path(world))
        check_json_answer(name, response)
        if endpoint.parses_body and name != "chat.conversations.create":
            assert response.status_code == 400, (name, response.text)


UNSTORABLE = [
    ("title", "\ud800"), ("body", "ok \udfff"), ("url", "/\ud800"), ("recipient", "\ud800"),
    ("title", "a\u0000b"), ("body", "\u0000"), ("recipient", "alice\u0000"),
    ("data", {"\u0000": 1}), ("data", {"k": "\ud800"}),
]  # fmt: skip


def test_notification_text_the_database_cannot_store_is_400(world):
    """What no database can store is refused with a 400 naming the field (as the chat
    does), never a 500."""
    with world.client("sender") as http:
        for field_name, value in UNSTORABLE:
            body = {"recipient": world.username, "title": "t", field_name: value}
            response = http.post(
                "/api/notifications/",
                content=json.dumps(body, ensure_ascii=True),
                headers={"Content-Type": "application/json"},
            )
            assert response.status_code == 400, (field_name, value, response.status_code)
            assert response.json()["field"] == field_name


# -- streams -------------------------------------------------------------------------------

# Digits of other scripts: see test_non_ascii_digits_are_a_malformed_resume_id.
UNICODE_DIGITS = ["\u0661\u0662", "\uff11\uff12"]
BAD_RESUME_IDS = [
    "abc", "-1", "1.5", "+5", "0x10", "1e3", "7 8", "9" * 5000, "99999999999999",
    "9" * 19, "%ff", "\u00e9t\u00e9",
]  # fmt: skip


def _streams(world: World) -> dict[str, str]:
    return {
        "notifications": "/api/notifications/stream/",
        "conversation": f"/api/chat/conversations/{world.ids['conversation']}/stream/",
        "answer": f"/api/chat/messages/{world.ids['answer']}/stream/",
        "demo": "/demo/stream/",
    }


# Events a stream sends at once after a bad resume id (then it is quiet until something
# happens): a reset and the unread count; a reset; a reset and the answer's done; a value.
AT_ONCE = {"notifications": 2, "conversation": 1, "answer": 2, "demo": 1}


def _open(http: httpx.Client, path: str, headers: dict | None = None, want: int = 0):
    """Status and the first ``want`` events of a stream (0: just the first bytes)."""
    parser = EventStreamParser()
    with http.stream("GET", path, headers=headers or {}) as response:
        if response.status_code != 200:
            response.read()
            return response, parser.events
        deadline = time.monotonic() + 15
        for chunk in response.iter_raw():
            parser.feed(chunk)
            if len(parser.events) >= want or time.monotonic() > deadline:
                break
    return response, parser.events


def test_streams_with_bad_resume_ids(world):
    """Header and parameter: the log's streams answer a ``reset`` (then go on), a finished
    answer gives its ``done`` or 204, the demo counts from 1; never an error."""
    from urllib.parse import quote

    seen: dict[str, int] = {}
    with world.client() as http:
        for stream, path in _streams(world).items():
            for bad in BAD_RESUME_IDS:
                for where in ("header", "parameter"):
                    if where == "header" and bad != bad.strip():
                        continue  # HTTP itself has no header value with outer spaces
                    if where == "header":
                        headers = {"Last-Event-ID": bad.encode("utf-8")}
                        url = path
                    else:
                        headers = None
                        url = f"{path}?lastEventId={quote(bad, safe='%')}"
                    response, events = _open(http, url, headers, want=AT_ONCE[stream])
                    key = f"{stream}:{response.status_code}"
                    seen[key] = seen.get(key, 0) + 1
                    assert response.status_code in (200, 204), (stream, bad, where)
                    assert all(e.last_event_id.isdigit() for e in events), events
                    if stream == "demo":
                        assert events and events[0].type == "message"
                    elif response.status_code == 200:
                        assert events[0].type == "reset", (stream, bad, where, events)
                        assert "reason" in json.loads(events[0].data)
                        if stream == "answer":
                            assert events[-1].type == "done"
                    else:  # a finished answer resumed after its `done`: 204
                        assert stream == "answer" and bad.isascii() and bad.isdigit(), bad
    record("stream_resume_ids", streams=4, ids=len(BAD_RESUME_IDS), where=2,
           requests=sum(seen.values()), statuses=seen, server_errors=0)  # fmt: skip


def test_non_ascii_digits_are_a_malformed_resume_id(world):
    from urllib.parse import quote

    path = _streams(world)["answer"]
    with world.client() as http:
        for bad in UNICODE_DIGITS:
            response, events = _open(http, f"{path}?lastEventId={quote(bad)}", want=2)
            assert response.status_code == 200, (bad, response.status_code)
            assert events[0].type == "reset", (bad, events)


def test_streams_ignore_unknown_parameters(world):
    with world.client() as http:
        for stream, path in _streams(world).items():
            query = "?utm_source=x&format=json&topics=&lastEventId=&x%00=%ff&a[]=1&a[]=2"
            response, _ = _open(http, path + query)
            assert response.status_code == 200, (stream, response.text[:200])


def test_streams_with_too_many_parameters(world):
    query = "?" + "&".join(f"k{n}=v" for n in range(1500))
    with world.client() as http:
        for stream, path in _streams(world).items():
            response, _ = _open(http, path + query)
            assert response.status_code == 400, (stream, response.status_code, response.text)
            assert response.json()["error"]


def test_api_urls_answer_json_errors(world):
    with world.client() as http:
        for path in (
            "/api/no-such-thing/",
            "/api/notifications/stream/%ff",
            "/api/notifications/?" + "&".join(f"k{n}=v" for n in range(1500)),
        ):
            response = http.get(path)
            assert 400 <= response.status_code < 500, (path, response.status_code)
            assert response.headers["content-type"] == "application/json", path  # fmt: skip


ACCEPTS = [
    ("text/event-stream", 200),
    ("TEXT/EVENT-STREAM", 200),
    ("text/event-stream; charset=utf-8", 200),
    ("*/*;q=0.1", 200),
    ("text/*", 200),
    ("application/json, text/event-stream;q=0.5", 200),
    ("text/event-stream;q=1e999", 200),
    ("application/json", 406),
    ("text/html", 406),
    ("text/event-stream;q=0", 406),
    ("text/event-stream;q=nan", 406),
    ("text/event-stream;q=-1", 406),
    (";;;,,,=", 406),
    (", ".join(f"type{n}/sub{n}" for n in range(3000)), 406),
]


def test_streams_accept_variants(world):
    with world.client() as http:
        for stream, path in _streams(world).items():
            if stream == "demo":
                continue
            for accept, status in ACCEPTS:
                response, _ = _open(http, path, {"Accept": accept})
                assert response.status_code == status, (stream, accept, response.status_code)
                if status == 406:
                    assert response.json()["error"] == "not_acceptable"


# -- payloads that try to forge frames ---------------------------------------------------

FORGERIES = [
    "\n\ndata: forged\n\n", "\r\rdata: forged\r\r", "\r\n\r\nevent: done\r\ndata: {}\r\n\r\n",
    "event: reset\n", "id: 999999\n", "retry: 1\n", ": comment\n", "data:", "\n", "\r",
    "\u2028", "\u0085", "\x0b\x0c", "\ufeff", "<script>", "\\n\\ndata: x",
]  # fmt: skip
HOSTILE_TEXT = st.lists(st.sampled_from(FORGERIES) | STORABLE_TEXT, min_size=1, max_size=6).map(
    "".join
)


class Feed:
    """A notification feed read raw (sync), parsed by the spec parser."""

    def __init__(self, http: httpx.Client, query: str = ""):
        self.context = http.stream("GET", "/api/notifications/stream/" + query)
        self.response = self.context.__enter__()
        assert self.response.status_code == 200
        self.chunks = self.response.iter_raw()
        self.parser = EventStreamParser()

    def until(self, predicate, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self.parser.events):
            assert time.monotonic() < deadline, [e.type for e in self.parser.events[-5:]]
            self.parser.feed(next(self.chunks))

    def close(self) -> None:
        self.context.__exit__(None, None, None)


def test_notification_text_never_forges_frames(world):
    """Titles and bodies full of line breaks and field lines arrive as one ``notification``
    event each, byte-exact in JSON, and as one escaped HTML fragment each."""
    username = world.username
    with world.client() as http, world.client("sender") as sender:
        feed_json, feed_html = Feed(http), Feed(http, "?format=html")
        feed_json.until(lambda ev: any(e.type == "unread" for e in ev))
        feed_html.until(lambda ev: any(e.type == "unread" for e in ev))
        sent: list[tuple[int, str, str]] = []

        @settings(FUZZ, max_examples=25)
        @given(title=HOSTILE_TEXT, body=HOSTILE_TEXT)
        def send(title, body):
            if not title.strip() or len(title.strip()) > 200:
                return
            made = sender.post(
                "/api/notifications/",
                json={"recipient": username, "title": title, "body": body, "topic": "forge"},
            )
            assert made.status_code == 201, made.text
            sent.append((made.json()["id"], title.strip(), body))

        try:
            send()
            last = sent[-1][0]
            feed_json.until(
                lambda ev: any(e.type == "notification" and json.loads(e.data)["id"] == last
                               for e in ev)
            )  # fmt: skip
            feed_html.until(
                lambda ev: any(e.type == "notification" and f'id="notification-{last}"' in e.data
                               for e in ev)
            )  # fmt: skip
        finally:
            feed_json.close()
            feed_html.close()
    got = [json.loads(e.data) for e in feed_json.parser.events if e.type == "notification"]
    assert [(n["id"], n["title"], n["body"]) for n in got] == sent
    assert {e.type for e in feed_json.parser.events} == {"notification", "unread"}
    fragments = [e.data for e in feed_html.parser.events if e.type == "notification"]
    assert len(fragments) == len(sent)
    for fragment, (made_id, _, _) in zip(fragments, sent, strict=True):
        assert fragment.startswith("<li") and f'id="notification-{made_id}"' in fragment
        assert "<script>" not in fragment
    assert {e.type for e in feed_html.parser.events} == {"notification", "unread"}
    assert feed_json.parser.retry is not None and feed_html.parser.retry == feed_json.parser.retry
    record("forge_notification_text", notifications=len(sent), events_per_notification=1,
           forged_frames=0)  # fmt: skip


def test_chat_text_and_model_output_never_forge_frames(world):
    """A message full of frame syntax is stored as sent; the demo model echoes it back as
    its answer: the deltas join to exactly the text, and only ``delta``/``done`` arrive."""
    texts: list[str] = []
    with world.client() as http:
        conversation = http.post("/api/chat/conversations/", json={}).json()["id"]

        @settings(FUZZ, max_examples=15)
        @given(text=HOSTILE_TEXT)
        def ask(text):
            posted = http.post(
                f"/api/chat/conversations/{conversation}/messages/",
                json={"content": "[demo:echo] " + text},
            )
            assert posted.status_code == 201, posted.text
            assert posted.json()["user_message"]["content"] == "[demo:echo] " + text
            events = _read_answer(http, posted.json()["assistant_message"]["id"])
            assert {e.type for e in events} <= {"delta", "done"}
            assert [e.type for e in events].count("done") == 1 and events[-1].type == "done"
            deltas = "".join(json.loads(e.data)["text"] for e in events if e.type == "delta")
            assert deltas == text == json.loads(events[-1].data)["content"]
            texts.append(text)

        ask()
        # The same text through the OpenAI-compatible stream: only `data:` frames.
        for text in ["".join(FORGERIES), *FORGERIES[:3], "\r", "\n"]:
            response = http.post(
                "/v1/chat/completions",
                json={"model": "m", "stream": True,
                      "messages": [{"role": "user", "content": "[demo:echo] " + text}]},
            )  # fmt: skip
            assert response.status_code == 200
            events = parse(response.content).events
            assert {e.type for e in events} == {"message"}
            assert events[-1].data == "[DONE]"
            chunks = [json.loads(e.data) for e in events[:-1]]
            content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
            assert content == text
            texts.append(text)
    record("forge_chat_and_model_output", answers=len(texts), forged_frames=0)
