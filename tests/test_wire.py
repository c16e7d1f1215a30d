"""The SSE encoder against a spec-conformant parser: no payload can forge a frame."""

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ssechat.streams.wire import (
    FrameError,
    dumps,
    encode_comment,
    encode_event,
    encode_json_event,
    encode_retry,
)

from .sse import parse

ids = st.from_regex(r"[0-9A-Za-z._:-]{1,30}", fullmatch=True)
names = st.from_regex(r"[a-z][a-z0-9_.-]{0,20}", fullmatch=True)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=20,
)


def normalize_newlines(text: str) -> str:
    return re.sub(r"\r\n|\r", "\n", text)


@settings(max_examples=300, deadline=None)
@given(payload=st.text(), event=names, event_id=ids)
def test_any_text_arrives_as_one_event(payload, event, event_id):
    parsed = parse(encode_event(payload, event=event, id=event_id))
    assert len(parsed.events) == 1
    (got,) = parsed.events
    assert got.type == event
    assert got.last_event_id == event_id
    # EventSource reads every line break as a line break: CR and CR LF arrive as LF.
    assert got.data == normalize_newlines(payload)


@settings(max_examples=300, deadline=None)
@given(payload=json_values, event=names, event_id=ids)
def test_json_payloads_arrive_exactly(payload, event, event_id):
    parsed = parse(encode_json_event(payload, event=event, id=event_id))
    assert [e.type for e in parsed.events] == [event]
    assert json.loads(parsed.events[0].data) == payload


@settings(max_examples=200)
@given(payloads=st.lists(st.text(), min_size=1, max_size=5))
def test_concatenated_frames_stay_separate(payloads):
    raw = b"".join(encode_event(p, event="x", id=i) for i, p in enumerate(payloads, 1))
    parsed = parse(raw)
    assert [e.data for e in parsed.events] == [normalize_newlines(p) for p in payloads]
    assert [e.last_event_id for e in parsed.events] == [str(i) for i in range(1, len(payloads) + 1)]


@pytest.mark.parametrize(
    "payload",
    [
        "line one\nline two",
        "a\r\nb\rc\n",
        " leading space",
        "data: forged",
        "\n\ndata: forged\n\nevent: evil\nid: 999\n\n",
        "event: evil",
        "id: 999",
        "retry: 1",
        ": comment",
        "NUL \x00 inside",
        "unicode ✓ 漢字 🎉",
        "",
        "\n",
    ],
)
def test_hostile_text_never_forges_a_frame(payload):
    parsed = parse(encode_event(payload, event="delta", id=7))
    assert len(parsed.events) == 1
    assert parsed.events[0].type == "delta"
    assert parsed.events[0].last_event_id == "7"
    assert parsed.events[0].data == normalize_newlines(payload)
    assert parsed.retry is None


def test_hostile_json_arrives_byte_exact():
    payload = {"text": "\r\n\r\ndata: x\revent: evil\x00 \u2028"}
    raw = encode_json_event(payload, event="delta", id=1)
    assert raw.count(b"\n\n") == 1
    assert json.loads(parse(raw).events[0].data) == payload


@pytest.mark.parametrize("bad", ["a\nb", "a\rb", "a\x00b", "x\r\n"])
def test_ids_and_event_names_with_line_breaks_are_refused(bad):
    with pytest.raises(FrameError):
        encode_event("x", id=bad)
    with pytest.raises(FrameError):
        encode_event("x", event=bad)


def test_lone_surrogates_are_escaped_not_lost():
    payload = {"t": "\ud800"}
    text = dumps(payload)
    text.encode("utf-8")
    assert json.loads(text) == payload


def test_retry_and_comments():
    parsed = parse(encode_retry(2500) + encode_comment("keep\nalive") + encode_comment())
    assert parsed.retry == 2500
    assert parsed.events == []
    assert parsed.comments == [" keep", " alive", ""]
