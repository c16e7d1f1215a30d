"""One client's view of some channels: stored backlog after its last id, then live.

The order matters and is the whole trick of resuming without gap or repeat:

1. register the mailbox with the hub, noting the hub's horizon ``H`` at that
   instant (every later event above ``H`` will reach the mailbox);
2. read the stored events in ``(last_id, H]`` from the database and send them;
3. send live events from the mailbox, dropping any id already sent.

A mailbox that overflows (slow client) is emptied; the stream then reads what
it missed from the database, up to the hub's current horizon, and goes on.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

from .db import run_db
from .hub import CLOSE, KEEPALIVE_SIGNAL, OVERFLOW, Connection, StoredEvent, get_hub
from .log import log_bounds, read_channels
from .wire import KEEPALIVE, encode_json_event

logger = logging.getLogger("ssechat.streams")

BACKLOG_PAGE = 1000
_ID_RE = re.compile(r"^[0-9]{1,18}$")


@dataclass(frozen=True, slots=True)
class Reset:
    """Tell the client its resume id cannot be honoured: reload state, then go on live."""

    id: int
    reason: str

    @property
    def frame(self) -> bytes:
        return encode_json_event({"reason": self.reason}, event="reset", id=self.id)


class Keepalive:
    __slots__ = ()
    frame = KEEPALIVE


class Live:
    """Yielded once, when the backlog is sent and live events begin.

    ``EventStream.position`` is then the id to give any event a view makes up
    itself (e.g. a count sent on connect): a client resuming from it misses nothing.
    """

    __slots__ = ()
    frame = b""


KEEPALIVE_ITEM = Keepalive()
LIVE = Live()


def resume_id(request) -> str | None:
    """The client's last event id: the ``Last-Event-ID`` header wins over ``lastEventId``."""
    header = request.META.get("HTTP_LAST_EVENT_ID")
    if header is not None and header.strip() != "":
        return header.strip()
    param = request.GET.get("lastEventId")
    if param is not None and param.strip() != "":
        return param.strip()
    return None


class EventStream:
    """Iterate a client's events: ``StoredEvent``, ``Reset``, ``Keepalive`` and one ``Live``.

    ``last_event_id`` is what the client sent (None: start live, or from the
    first stored event when ``from_start``). Iteration ends when the hub closes
    the connection (shutdown, maximum lifetime, revoked access).
    """

    def __init__(
        self,
        channels: Iterable[str],
        last_event_id: str | None = None,
        *,
        from_start: bool = False,
        user_id: int | None = None,
    ):
        self.channels = tuple(dict.fromkeys(channels))
        self.last_event_id = last_event_id
        self.from_start = from_start
        self.user_id = user_id
        self.connection: Connection | None = None
        # The id of the last event handed out (or the position the stream started at).
        self.position = 0
        self.sent = 0

    async def open(self) -> Connection:
        hub = get_hub()
        await hub.start()
        self.connection = hub.open(self.channels, self.user_id)
        return self.connection

    def close(self) -> None:
        if self.connection is not None:
            self.connection.hub.release(self.connection)

    async def _start_after(self, horizon: int) -> tuple[int, Reset | None]:
        """Where the backlog starts, and a Reset if the client's id is unusable."""
        raw = self.last_event_id
        if raw is None:
            if self.from_start:
                pruned, _ = await run_db(log_bounds)
                return pruned, None
            return horizon, None
        if not _ID_RE.match(raw):
            return horizon, Reset(horizon, "malformed last event id")
        wanted = int(raw)
        pruned, latest = await run_db(log_bounds)
        if wanted > latest:
            return horizon, Reset(horizon, "unknown last event id")
        if wanted < pruned:
            return horizon, Reset(horizon, "events after this id are no longer stored")
        return wanted, None

    async def __aiter__(self) -> AsyncIterator[StoredEvent | Reset | Keepalive | Live]:
        conn = self.connection or await self.open()
        try:
            horizon = conn.start_horizon
            after, reset = await self._start_after(horizon)
            if reset is not None:
                self.position = reset.id
                conn.wrote()
                yield reset
            last = after
            # Backlog: stored events in (after, horizon].
            async for event in self._read(after, horizon):
                last = event.id
                self.sent += 1
                conn.wrote()
                yield event
            # Everything up to the horizon is sent (or was before the client's id);
            # later events reach the mailbox, and ids the client already has are dropped.
            last = self.position = max(last, horizon)
            yield LIVE
            while True:
                item = await conn.get()
                if item.__class__ is StoredEvent:
                    if item.id <= last:
                        continue
                    last = self.position = item.id
                    self.sent += 1
                    conn.wrote()
                    yield item
                elif item is KEEPALIVE_SIGNAL:
                    yield KEEPALIVE_ITEM
                elif item is OVERFLOW:
                    # We fell behind: everything up to the hub's horizon is in the database.
                    upto = conn.hub.horizon
                    conn.drop_pending()
                    async for event in self._read(last, upto):
                        last = self.position = event.id
                        self.sent += 1
                        conn.wrote()
                        yield event
                    last = self.position = max(last, upto)
                elif item is CLOSE:
                    return
        finally:
            self.close()

    async def _read(self, after: int, upto: int) -> AsyncIterator[StoredEvent]:
        while after < upto:
            page = await run_db(read_channels, self.channels, after, upto, BACKLOG_PAGE)
            for event in page:
                yield event
            if len(page) < BACKLOG_PAGE:
                return
            after = page[-1].id
