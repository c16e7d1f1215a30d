"""Server-Sent Events wire format, exactly as the WHATWG EventSource parser reads it.

A frame is a block of ``field: value`` lines ended by a blank line. The parser
splits lines on CR LF, CR or LF, so a payload's own line breaks become separate
``data:`` lines (the reader joins them back with LF): no payload can end a frame
early or start another. Ids and event names are single-line by contract; one
holding CR, LF or NUL is refused (the spec would ignore such an id silently).

Payloads the project sends are JSON, whose text never holds a raw CR or LF, so
they arrive byte for byte.
"""

from __future__ import annotations

import json
import re
from typing import Any

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_FORBIDDEN_IN_FIELD = re.compile(r"[\r\n\x00]")

KEEPALIVE = b": ping\n\n"


class FrameError(ValueError):
    """An id or event name that cannot be put on the wire."""


def check_field(name: str, value: str) -> str:
    if _FORBIDDEN_IN_FIELD.search(value):
        raise FrameError(f"SSE {name} must not contain CR, LF or NUL: {value!r}")
    return value


def dumps(payload: Any) -> str:
    """JSON text for a payload: compact, UTF-8 where it can be, ASCII-escaped otherwise."""
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates cannot be sent as UTF-8; JSON escapes keep them exact.
        text = json.dumps(payload, ensure_ascii=True, separators=(",", ":"))
    return text


def _data_lines(data: str) -> str:
    if "\n" in data or "\r" in data:
        return "".join(f"data: {line}\n" for line in _LINE_BREAK.split(data))
    return f"data: {data}\n"


def encode_event(
    data: str,
    *,
    event: str | None = None,
    id: str | int | None = None,
    retry: int | None = None,
) -> bytes:
    """One SSE frame. ``data`` is text; use :func:`dumps` for JSON payloads."""
    parts = []
    if id is not None:
        parts.append(f"id: {check_field('id', str(id))}\n")
    if event is not None:
        parts.append(f"event: {check_field('event', event)}\n")
    if retry is not None:
        parts.append(f"retry: {int(retry)}\n")
    parts.append(_data_lines(data))
    parts.append("\n")
    return "".join(parts).encode("utf-8", "surrogatepass")


def encode_json_event(
    payload: Any,
    *,
    event: str | None = None,
    id: str | int | None = None,
) -> bytes:
    return encode_event(dumps(payload), event=event, id=id)


def encode_comment(text: str = "") -> bytes:
    """A comment: ignored by EventSource, keeps proxies and the TCP connection awake."""
    if not text:
        return b":\n\n"
    return ("".join(f": {line}\n" for line in _LINE_BREAK.split(text)) + "\n").encode("utf-8")


def encode_retry(milliseconds: int) -> bytes:
    return f"retry: {int(milliseconds)}\n\n".encode("ascii")
