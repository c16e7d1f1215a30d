"""A spec-conformant EventSource parser (WHATWG HTML, "Interpreting an event stream").

Used to check the bytes a server sends, independently of any client library.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ParsedEvent:
    type: str
    data: str
    last_event_id: str


@dataclass
class EventStreamParser:
    events: list[ParsedEvent] = field(default_factory=list)
    retry: int | None = None
    last_event_id: str = ""
    comments: list[str] = field(default_factory=list)
    _data: list[str] = field(default_factory=list)
    _type: str = ""
    _pending: str = ""
    _started: bool = False

    def feed(self, chunk: bytes | str) -> list[ParsedEvent]:
        text = chunk.decode("utf-8", "replace") if isinstance(chunk, bytes) else chunk
        if not self._started and text:
            self._started = True
            if text.startswith("\ufeff"):
                text = text[1:]
        buffer = self._pending + text
        before = len(self.events)
        start = 0
        i = 0
        n = len(buffer)
        while i < n:
            ch = buffer[i]
            if ch == "\r":
                if i + 1 == n:
                    break  # could be CR LF split across chunks
                self._line(buffer[start:i])
                i += 2 if buffer[i + 1] == "\n" else 1
                start = i
            elif ch == "\n":
                self._line(buffer[start:i])
                i += 1
                start = i
            else:
                i += 1
        self._pending = buffer[start:]
        return self.events[before:]

    def _line(self, line: str) -> None:
        if line == "":
            self._dispatch()
            return
        if line.startswith(":"):
            self.comments.append(line[1:])
            return
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._type = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\x00" not in value:
            self.last_event_id = value
        elif name == "retry" and value.isdigit() and value.isascii():
            self.retry = int(value)

    def _dispatch(self) -> None:
        if not self._data:
            self._type = ""
            return
        data = "\n".join(self._data)
        self.events.append(ParsedEvent(self._type or "message", data, self.last_event_id))
        self._data = []
        self._type = ""


def parse(raw: bytes | str) -> EventStreamParser:
    parser = EventStreamParser()
    parser.feed(raw)
    return parser
