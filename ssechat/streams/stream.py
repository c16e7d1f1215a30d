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
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Iterable
from dataclasses import dataclass
from typing import Any

from .db import run_db
from .hub import (
    CLOSE,
    KEEPALIVE_SIGNAL,
    OVERFLOW,
    Connection,
    Signal,
    StoredEvent,
    get_hub,
    stream_auth,
)
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


# What ``poll()`` answers when nothing is ready (await ``wait()``, then poll again),
# and when the stream has ended.
PENDING = Signal("pending")
END = Signal("end")


class _Ready:
    """What ``wait()`` returns when something is ready already: awaiting it does not
    suspend (and allocates no future)."""

    __slots__ = ()

    def __await__(self):
        return iter(())


READY = _Ready()

_START, _BACKLOG, _LIVE, _CATCHUP, _DONE = range(5)


class EventStream:
    """Iterate a client's events: ``StoredEvent``, ``Reset``, ``Keepalive`` and one ``Live``.

    ``last_event_id`` is what the client sent (None: start live, or from the
    first stored event when ``from_start``). Iteration ends when the hub closes
    the connection (shutdown, maximum lifetime, revoked access).

    Besides ``async for``, a stream can be read without an async generator per
    layer: ``poll()`` hands out the next item that is ready now (or PENDING, or
    END), and ``wait()`` gives an awaitable to await before polling again. Live,
    that awaitable is the mailbox's own future, so the response that sends the
    frames awaits it directly and takes every item already waiting at once.
    """

    __slots__ = (
        "_after",
        "_auth",
        "_bounds",
        "_exhausted",
        "_phase",
        "_ready",
        "_signal",
        "_upto",
        "channels",
        "connection",
        "from_start",
        "last_event_id",
        "position",
        "sent",
        "user_id",
    )

    def __init__(
        self,
        channels: Iterable[str],
        last_event_id: str | None = None,
        *,
        from_start: bool = False,
        user_id: int | None = None,
        bounds: tuple[int, int] | None = None,
    ):
        self.channels = tuple(dict.fromkeys(channels))
        # The request's (user id, credentials key), read now: the connection is opened
        # later, from the stream's task, after the request's context is gone.
        self._auth = stream_auth.get()
        # (pruned through, latest id) as the caller just read them (log_bounds), to
        # check the resume position without another trip to the database threads.
        self._bounds = bounds
        self.last_event_id = last_event_id
        self.from_start = from_start
        self.user_id = user_id
        self.connection: Connection | None = None
        # The id of the last event handed out (or the position the stream started at).
        self.position = 0
        self.sent = 0
        self._phase = _START
        # Items read from the database (a page, a reset, LIVE), handed out before the mailbox.
        self._ready: deque | None = None
        self._signal = None  # OVERFLOW or CLOSE taken from the mailbox, for wait() to act on
        self._after = 0  # ids up to this are sent (or the client had them)
        self._upto = 0  # the backlog or catch-up being read ends at this id
        self._exhausted = False  # the last page read was the last one

    async def open(self) -> Connection:
        hub = get_hub()
        await hub.start()
        self.connection = hub.open(self.channels, self.user_id, auth=self._auth)
        self._auth = None
        return self.connection

    def close(self) -> None:
        if self.connection is not None:
            self.connection.hub.release(self.connection)

    async def _log_bounds(self) -> tuple[int, int]:
        bounds, self._bounds = self._bounds, None
        return bounds if bounds is not None else await run_db(log_bounds)

    async def _start_after(self, horizon: int) -> tuple[int, Reset | None]:
        """Where the backlog starts, and a Reset if the client's id is unusable."""
        raw = self.last_event_id
        if raw is None:
            if self.from_start:
                pruned, _ = await self._log_bounds()
                return pruned, None
            return horizon, None
        if not _ID_RE.match(raw):
            return horizon, Reset(horizon, "malformed last event id")
        wanted = int(raw)
        pruned, latest = await self._log_bounds()
        if wanted > latest:
            return horizon, Reset(horizon, "unknown last event id")
        if wanted < pruned:
            return horizon, Reset(horizon, "events after this id are no longer stored")
        return wanted, None

    def poll(self):
        """The next item if it is ready now; PENDING (await ``wait()`` first) or END."""
        ready = self._ready
        if ready is not None:
            item = ready.popleft()
            if not ready:
                self._ready = None  # a live stream keeps no deque (its first block is 760 B)
            if item.__class__ is StoredEvent:
                self._after = self.position = item.id
                self.sent += 1
                self.connection.last_write = self.connection.hub.write_stamp
            elif item.__class__ is Reset:
                self.connection.last_write = self.connection.hub.write_stamp
            return item
        if self._phase != _LIVE:
            return END if self._phase == _DONE else PENDING
        if self._signal is not None:
            return PENDING
        conn = self.connection
        while True:
            item = conn._first
            if item is not None and not conn.overflowed:  # Connection.take, inlined
                rest = conn._rest
                conn._first = rest.popleft() if rest else None
            elif item is None and not conn.overflowed and not conn.closed:
                return PENDING  # an empty mailbox (the usual end of a pull)
            else:
                item = conn.take()
                if item is None:
                    return PENDING
            if item.__class__ is StoredEvent:
                if item.id <= self._after:
                    continue  # sent from the database already
                self._after = self.position = item.id
                self.sent += 1
                conn.last_write = conn.hub.write_stamp
                return item
            if item is KEEPALIVE_SIGNAL:
                return KEEPALIVE_ITEM
            # OVERFLOW or CLOSE: wait() deals with it.
            self._signal = item
            return PENDING

    def wait(self) -> Awaitable[None]:
        """What to await before polling again (done at once if something is ready)."""
        if self._phase == _LIVE and self._signal is None and self._ready is None:
            conn = self.connection
            if conn._first is not None or conn.overflowed or conn.closed:
                return READY
            waiter = conn._waiter = conn.hub.loop.create_future()
            return waiter
        if self._ready is not None or self._phase == _DONE:
            return READY
        return self._advance()

    def arm(self, waker: Any) -> bool:
        """If nothing is ready and nothing needs awaiting, have the next ``put`` call
        ``waker.done()`` and ``waker.set_result(None)`` (as it would a mailbox future's)
        and answer True; else False (poll, or await ``wait()``)."""
        if self._phase != _LIVE or self._signal is not None or self._ready is not None:
            return False
        conn = self.connection
        if conn._first is not None or conn.overflowed or conn.closed:
            return False
        conn._waiter = waker
        return True

    async def _advance(self) -> None:
        """The steps that need the database: start, backlog pages, catch-up, end."""
        phase = self._phase
        if phase == _START:
            conn = self.connection or await self.open()
            if self._recall():
                return
            horizon = conn.start_horizon
            after, reset = await self._start_after(horizon)
            if reset is not None:
                self.position = reset.id
                self._hand_out(reset)
            # Backlog: stored events in (after, horizon].
            self._after, self._upto, self._phase = after, horizon, _BACKLOG
            self._exhausted = False
        elif phase in (_BACKLOG, _CATCHUP):
            if not await self._read_page():
                # Everything up to the horizon is sent (or was before the client's id);
                # later events reach the mailbox, and ids the client already has are dropped.
                self._after = self.position = max(self._after, self._upto)
                if phase == _BACKLOG:
                    self._hand_out(LIVE)
                self._phase = _LIVE
        elif phase == _LIVE:
            signal, self._signal = self._signal, None
            if signal is OVERFLOW:
                # We fell behind: everything up to the hub's horizon is in the database.
                conn = self.connection
                self._upto = conn.hub.horizon
                conn.drop_pending()
                self._phase, self._exhausted = _CATCHUP, False
            elif signal is CLOSE:
                self._phase = _DONE

    def _recall(self) -> bool:
        """Take the backlog from the hub's memory (see ``Hub.remember``), with no trip to
        the database threads, if it holds it; False if not (read the log)."""
        raw = self.last_event_id
        if raw is None or not _ID_RE.match(raw):
            return False
        hub = self.connection.hub
        after = int(raw)
        events = hub.recall(self.channels, after)
        if events is None:
            return False
        for event in events:
            self._hand_out(event)
        # The rest as a backlog that has been read: LIVE next, then the mailbox (whose
        # events up to the horizon are dropped as sent).
        self._after, self._upto, self._phase = after, hub.horizon, _BACKLOG
        self._exhausted = True
        return True

    async def _read_page(self) -> bool:
        """Hand out the next page of stored events in (``_after``, ``_upto``] (called when
        everything read before is handed out); False when there are none left."""
        if self._exhausted or self._after >= self._upto:
            return False
        page = await run_db(read_channels, self.channels, self._after, self._upto, BACKLOG_PAGE)
        self._exhausted = len(page) < BACKLOG_PAGE
        for event in page:
            self._hand_out(event)
        return bool(page)

    def _hand_out(self, item) -> None:
        if self._ready is None:
            self._ready = deque()
        self._ready.append(item)

    def __aiter__(self) -> AsyncIterator[StoredEvent | Reset | Keepalive | Live]:
        return iterate_polled(self, self.close)


async def iterate(source) -> AsyncIterator:
    """``async for`` over anything with ``poll()`` and ``wait()`` (see EventStream)."""
    poll, wait = source.poll, source.wait
    while True:
        item = poll()
        if item is PENDING:
            await wait()
        elif item is END:
            return
        else:
            yield item


async def iterate_polled(source, close) -> AsyncIterator:
    """Iterate a ``poll()``/``wait()`` source (an EventStream, a feed) as an async
    iterator; ``close()`` when the iteration ends, however it ends."""
    try:
        while True:
            item = source.poll()
            if item is PENDING:
                await source.wait()
            elif item is END:
                return
            else:
                yield item
    finally:
        close()
