"""The in-process hub: who is subscribed to what, and handing events to them.

One hub per process. The broker feeds it new events in id order; the hub hands
each event (one shared object, framed once) to the mailbox of every local
connection subscribed to the event's channel or its parent. Everything here
runs on the event loop (but ``offer`` and ``remember``, called by the threads
that commit); nothing blocks and nothing touches the database.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import threading
from collections import deque
from collections.abc import Callable, Iterable

from django.conf import settings

from .wire import encode_event

logger = logging.getLogger("ssechat.streams")

# Channels a hub keeps the events of at most (see Hub.remember): a cache, the oldest go.
MAX_REMEMBERED = 4096


class StoredEvent:
    """An event of the log as streams see it. Shared by all local subscribers."""

    __slots__ = ("_frame", "cache", "channel", "data", "id", "parent", "type")

    def __init__(self, id: int, channel: str, parent: str, type: str, data: str):
        self.id = id
        self.channel = channel
        self.parent = parent
        self.type = type
        self.data = data
        self._frame: bytes | None = None
        # Per-process memo for renderings of this event (e.g. an HTML fragment).
        self.cache: dict = {}

    @property
    def frame(self) -> bytes:
        """The SSE frame, encoded once however many clients receive it."""
        frame = self._frame
        if frame is None:
            frame = self._frame = encode_event(self.data, event=self.type, id=self.id)
        return frame

    def payload(self):
        payload = self.cache.get("payload")
        if payload is None:
            import json

            payload = self.cache["payload"] = json.loads(self.data)
        return payload

    def __repr__(self) -> str:
        return f"<StoredEvent #{self.id} {self.channel} {self.type}>"


class Signal:
    """A control item in a mailbox."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"<Signal {self.name}>"


KEEPALIVE_SIGNAL = Signal("keepalive")
CLOSE = Signal("close")
OVERFLOW = Signal("overflow")


_TIMED_OUT = object()


# How long an event committed here waits for an earlier id before the broker reads
# the log (see Hub.offer).
OFFER_GAP_WAIT = 0.02
# Events this process commits less than this long after the last ones it handed out
# wait for the rest of that interval, to go out together: at a high publish rate a
# client then gets a write per interval rather than per event. A quiet stream of
# events is not delayed.
OFFER_COALESCE = 0.005


def _expire(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(_TIMED_OUT)


class Connection:
    """The mailbox of one open stream.

    A bounded queue: when a slow client lets it fill up, it is emptied and
    marked overflowed, and the stream catches up from the database instead.

    The oldest item waits in ``_first``; a deque for the ones behind it is made
    only when a second item queues (an idle or keeping-up stream never needs
    one, and a deque's first block is 760 bytes).
    """

    __slots__ = (
        "_first",
        "_rest",
        "_waiter",
        "auth_key",
        "channels",
        "close_reason",
        "closed",
        "deadline",
        "hub",
        "last_write",
        "limit",
        "overflowed",
        "start_horizon",
        "user_id",
    )

    def __init__(
        self,
        hub: Hub,
        channels: tuple[str, ...],
        user_id: int | None,
        limit: int,
        auth_key: str | None = None,
    ):
        self.hub = hub
        self.channels = channels
        self.user_id = user_id
        self.auth_key = auth_key
        self.limit = limit
        self._first = None
        self._rest: deque | None = None
        self._waiter: asyncio.Future | None = None
        self.overflowed = False
        self.closed = False
        self.close_reason = ""
        self.start_horizon = hub.horizon
        self.last_write = 0.0
        self.deadline = 0.0

    def put(self, item) -> None:
        if self.closed:
            return
        if self._first is None:
            self._first = item
        else:
            self._queue(item)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _queue(self, item) -> None:
        """Queue behind ``_first`` (which is set), or overflow."""
        rest = self._rest
        if rest is None:
            rest = self._rest = deque()
        if len(rest) + 1 >= self.limit:
            self._first = None
            rest.clear()
            self.overflowed = True
            self.hub.overflows += 1
        else:
            rest.append(item)

    def close(self, reason: str) -> None:
        if not self.closed:
            self.close_reason = reason
            self.put(CLOSE)
            self.closed = True

    def take(self):
        """The next item if one is waiting (StoredEvent, KEEPALIVE_SIGNAL, OVERFLOW or
        CLOSE), else None. Never waits."""
        if self.overflowed:
            self.overflowed = False
            self._first = None
            if self._rest is not None:
                self._rest.clear()
            return OVERFLOW
        item = self._first
        if item is not None:
            rest = self._rest
            self._first = rest.popleft() if rest else None
            return item
        if self.closed:
            return CLOSE
        return None

    def waiter(self) -> asyncio.Future:
        """A future resolved by the next ``put`` (call only when ``take()`` gave None)."""
        waiter = self._waiter = self.hub.loop.create_future()
        return waiter

    async def get(self, timeout: float | None = None):
        """The next item: a StoredEvent, KEEPALIVE_SIGNAL, OVERFLOW or CLOSE.

        With a ``timeout``, None when nothing arrived in time.
        """
        item = self.take()
        if item is not None:
            return item
        loop = self.hub.loop
        waiter = self.waiter()
        timer = loop.call_later(timeout, _expire, waiter) if timeout is not None else None
        try:
            await waiter
        finally:
            if self._waiter is waiter:
                self._waiter = None
            if timer is not None:
                timer.cancel()
        return self.take()

    def drop_pending(self) -> None:
        self._first = None
        if self._rest is not None:
            self._rest.clear()
        self.overflowed = False

    def wrote(self) -> None:
        """Note that the stream sent something (keep-alives are due only when idle)."""
        self.last_write = self.hub.write_stamp


class Hub:
    def __init__(self) -> None:
        self.by_channel: dict[str, set[Connection]] = {}
        self.connections: set[Connection] = set()
        self.by_user: dict[int, set[Connection]] = {}
        self.by_auth: dict[str, set[Connection]] = {}
        # Every event with an id at or below this has been handed out (or never will exist).
        self.horizon = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.broker = None
        self._ready: asyncio.Event | None = None
        self._start_lock: asyncio.Lock | None = None
        self.shutting_down = False
        self.keepalive = settings.SSECHAT_KEEPALIVE_SECONDS
        self.max_lifetime = settings.SSECHAT_STREAM_MAX_SECONDS
        self.queue_limit = settings.SSECHAT_SUBSCRIBER_QUEUE
        # Dispatch wakes the streams once per this many events (one write each to their
        # clients), well below a mailbox's limit so that one that keeps up never overflows.
        self.wake_batch = max(1, min(64, self.queue_limit // 4))
        self.dispatched = 0
        self.overflows = 0  # mailboxes emptied for a slow client (it then reads the log)
        # Events committed by this process, waiting for the loop (see offer()).
        self._offered: deque[StoredEvent] = deque()
        self._offer_scheduled = False
        self._early: dict[int, StoredEvent] = {}  # offered, with an id missing before them
        self._offers_due = 0.0  # loop time before which offers wait (OFFER_COALESCE)
        self._offer_timer: asyncio.TimerHandle | None = None
        self._gap_timer: asyncio.TimerHandle | None = None
        self.handed_over = 0  # events dispatched from offer() without a read-back
        # Channels whose dispatched events are kept, so a stream of one opening here reads
        # no log (see remember()): channel -> (since, events in id order).
        self._remembered: dict[str, tuple[int, list[StoredEvent]]] = {}
        self._remember_lock = threading.Lock()
        self.recalled = 0  # streams whose backlog came from memory
        # Keep-alives and maximum lifetimes: one sweep per tick for the whole hub (no
        # timer per connection). Each connection waits in the wheel's bucket of the tick
        # at or after which something may be due for it; a write only updates a float.
        due = [1.0] + [s / 4 for s in (self.keepalive, self.max_lifetime) if s > 0]
        self.tick = max(min(due), 0.005)
        self._wheel: dict[int, list[Connection]] = {}
        self._swept = 0  # buckets up to this index have been swept
        self._sweeper: asyncio.TimerHandle | None = None
        # What a write records as its time: the next tick's time, never earlier than
        # the write itself, so a keep-alive never comes after less than
        # SSECHAT_KEEPALIVE_SECONDS of silence (and at most about two ticks later).
        self.write_stamp = 0.0

    # -- lifecycle -------------------------------------------------------------
    async def start(self) -> None:
        """Start the broker on this loop (once) and wait until the horizon is known."""
        loop = asyncio.get_running_loop()
        if self.loop is not loop:
            # A new event loop (tests, or a fresh worker): start over on it.
            self._reset_for_loop(loop)
        if self._ready.is_set():
            return
        async with self._start_lock:
            if self._ready.is_set():
                return
            from .brokers import make_broker

            self.broker = make_broker(self)
            await self.broker.start()
            self._ready.set()

    def _reset_for_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.broker is not None:
            self.broker.abandon()
        self.loop = loop
        self.broker = None
        self._ready = asyncio.Event()
        self._start_lock = asyncio.Lock()
        self.shutting_down = False
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self._wheel.clear()
        self._offered.clear()
        self._offer_scheduled = False
        self._early.clear()
        self._offers_due = 0.0
        self._forget_all()  # a new broker: what the old one dispatched is not all
        for timer in (self._gap_timer, self._offer_timer):
            if timer is not None:
                timer.cancel()
        self._gap_timer = self._offer_timer = None
        for conn in list(self.connections):
            conn.closed = True
        self.by_channel.clear()
        self.connections.clear()
        self.by_user.clear()
        self.by_auth.clear()

    async def stop(self) -> None:
        self.close_all("shutdown")
        if self.broker is not None:
            await self.broker.stop()
            self.broker = None
        if self._ready is not None:
            self._ready.clear()
        self._forget_all()

    def begin_shutdown(self) -> None:
        """The server is going down: end every open stream now (clients will resume)."""
        if not self.shutting_down:
            self.shutting_down = True
            logger.info("shutdown: closing %d open stream(s)", len(self.connections))
            self.close_all("shutdown")

    def offer(self, event: StoredEvent) -> None:
        """This process committed ``event``: hand it out without reading it back.
        Thread-safe (called after commit, from the committing thread).

        It is dispatched at once if its id is the horizon's next one (then every
        event up to it has been handed out, so the horizon's promise holds). If
        an id before it is missing, it waits for that one's offer, and after
        ``OFFER_GAP_WAIT`` the broker reads the log from the horizon instead.
        Many commits in a row cost one wake-up of the loop."""
        loop = self.loop
        if self.broker is None or loop is None or loop.is_closed():
            return
        self._offered.append(event)  # deque.append is atomic
        if self._offer_scheduled:
            return
        self._offer_scheduled = True
        try:
            loop.call_soon_threadsafe(self._take_offered)
        except RuntimeError:  # loop closed meanwhile
            self._offer_scheduled = False

    def _take_offered(self) -> None:
        loop = self.loop
        now = loop.time()
        if now < self._offers_due:
            # Events handed out less than OFFER_COALESCE ago: the ones offered since
            # wait until then, to go out together (one write per client for all of
            # them). Offers made meanwhile only queue (the flag stays set).
            if self._offer_timer is None:
                self._offer_timer = loop.call_at(self._offers_due, self._take_offered_late)
            return
        # The flag first: an offer made while we drain schedules another call rather
        # than being left in the deque.
        self._offer_scheduled = False
        offered, early, horizon = self._offered, self._early, self.horizon
        while offered:
            event = offered.popleft()
            if event.id > horizon:  # else the broker read it already
                early[event.id] = event
        ready = []
        expected = horizon + 1
        while early:
            event = early.pop(expected, None)
            if event is None:
                break
            ready.append(event)
            expected += 1
        if ready:
            self.handed_over += len(ready)
            self._offers_due = now + OFFER_COALESCE
            self.dispatch(ready)
        if early and self._gap_timer is None:
            # An id in between is not ours yet: most often another thread's commit
            # whose offer is on its way; else another process's, which the broker
            # reads if the gap is still there in a moment.
            self._gap_timer = self.loop.call_later(OFFER_GAP_WAIT, self._gap_waited)
        elif not early and self._gap_timer is not None:
            self._gap_timer.cancel()
            self._gap_timer = None

    def _take_offered_late(self) -> None:
        self._offer_timer = None
        self._take_offered()

    def _gap_waited(self) -> None:
        self._gap_timer = None
        if self.broker is not None and any(n > self.horizon for n in self._early):
            self.broker.wake()  # the broker reads them all from the log
        self._early.clear()

    # -- connections -----------------------------------------------------------
    def open(
        self,
        channels: Iterable[str],
        user_id: int | None = None,
        *,
        auth: tuple[int | None, str | None] | None = None,
    ) -> Connection:
        """Register a stream. Its user and credentials (``auth``: user id, credentials
        key) default to the request's (``stream_auth``, set by the lean lane for the
        view), so revoking them closes it."""
        auth_user, auth_key = stream_auth.get() if auth is None else auth
        if user_id is None:
            user_id = auth_user
        conn = Connection(self, tuple(channels), user_id, self.queue_limit, auth_key)
        for channel in conn.channels:
            self.by_channel.setdefault(channel, set()).add(conn)
        self.connections.add(conn)
        if user_id is not None:
            self.by_user.setdefault(user_id, set()).add(conn)
        if auth_key is not None:
            self.by_auth.setdefault(auth_key, set()).add(conn)
        now = self.loop.time()
        conn.last_write = now
        if self.max_lifetime > 0:
            conn.deadline = now + self.max_lifetime
        if self._sweeper is None:
            self._swept = int(now / self.tick)
            self.write_stamp = now + self.tick
        self._place(conn)
        if self.shutting_down:
            conn.close("shutdown")
        return conn

    def release(self, conn: Connection) -> None:
        conn.closed = True
        # It leaves the timer wheel at its bucket's sweep; hold nothing meanwhile.
        conn.drop_pending()
        conn._waiter = None
        for channel in conn.channels:
            subs = self.by_channel.get(channel)
            if subs is not None:
                subs.discard(conn)
                if not subs:
                    del self.by_channel[channel]
        self.connections.discard(conn)
        for index, key in ((self.by_user, conn.user_id), (self.by_auth, conn.auth_key)):
            if key is not None:
                subs = index.get(key)
                if subs is not None:
                    subs.discard(conn)
                    if not subs:
                        del index[key]

    def open_count(self, user_id: int) -> int:
        return len(self.by_user.get(user_id, ()))

    def close_all(self, reason: str) -> None:
        for conn in list(self.connections):
            conn.close(reason)

    def close_user(self, user_id: int, reason: str) -> int:
        conns = list(self.by_user.get(user_id, ()))
        for conn in conns:
            conn.close(reason)
        return len(conns)

    def close_auth(self, auth_key: str, reason: str) -> int:
        conns = list(self.by_auth.get(auth_key, ()))
        for conn in conns:
            conn.close(reason)
        return len(conns)

    # -- keep-alives and maximum lifetime: one timer wheel per hub -------------------
    def _place(self, conn: Connection) -> None:
        """Put ``conn`` in the bucket of the first tick at which something may be due."""
        due = conn.last_write + self.keepalive if self.keepalive > 0 else float("inf")
        if conn.deadline and conn.deadline < due:
            due = conn.deadline
        if due == float("inf"):
            return
        index = max(math.ceil(due / self.tick), self._swept + 1)
        bucket = self._wheel.get(index)
        if bucket is None:
            self._wheel[index] = [conn]
        else:
            bucket.append(conn)
        if self._sweeper is None:
            self._sweeper = self.loop.call_at((self._swept + 1) * self.tick, self._sweep)

    def _sweep(self) -> None:
        # (self._sweeper stays set while sweeping: _place schedules no other timer.)
        now = self.loop.time()
        self.write_stamp = now + self.tick
        current = int(now / self.tick)
        wheel = self._wheel
        # A small tolerance: a bucket's time and its connections' due times are floats.
        slack = self.tick * 1e-3
        keepalive = self.keepalive
        for index in range(self._swept + 1, current + 1):
            bucket = wheel.pop(index, None)
            if bucket is None:
                continue
            self._swept = index
            for conn in bucket:
                if conn.closed:
                    continue  # released or closed: it leaves the wheel here
                if conn.deadline and now + slack >= conn.deadline:
                    conn.close("max_lifetime")
                    continue
                if keepalive > 0 and now + slack - conn.last_write >= keepalive:
                    conn.put(KEEPALIVE_SIGNAL)
                    conn.last_write = now
                self._place(conn)
        self._swept = max(self._swept, current)
        self._sweeper = self.loop.call_at((current + 1) * self.tick, self._sweep) if wheel else None

    # -- delivery --------------------------------------------------------------
    def dispatch(self, events: list[StoredEvent]) -> None:
        """Hand events (in id order, all above the horizon) to their subscribers."""
        step = self.wake_batch
        if len(events) > step:  # a mailbox that keeps up must never fill: wake in slices
            for start in range(0, len(events), step):
                self.dispatch(events[start : start + step])
            return
        by_channel = self.by_channel
        remembered = self._remembered
        # Waiters are woken once every event is in the mailboxes: a stream that gets
        # several events of one batch writes them to its client in one go.
        woken = []
        wake = woken.append
        for event in events:
            if remembered:
                kept = remembered.get(event.channel)
                if kept is not None:
                    kept[1].append(event)
            for channel in (event.channel, event.parent) if event.parent else (event.channel,):
                subs = by_channel.get(channel)
                if not subs:
                    continue
                # Connection.put, inlined: this loop runs once per subscriber per event.
                for conn in subs:
                    if conn.closed:
                        continue
                    if conn._first is None:
                        conn._first = event
                    else:
                        conn._queue(event)
                    waiter = conn._waiter
                    if waiter is not None:
                        conn._waiter = None
                        wake(waiter)
            if event.channel == CONTROL_CHANNEL:
                self._control(event)
        if events:
            self.horizon = events[-1].id
            self.dispatched += len(events)
        for waiter in woken:
            if not waiter.done():
                waiter.set_result(None)

    def advance(self, horizon: int) -> None:
        if horizon > self.horizon:
            self.horizon = horizon

    # -- events kept in memory for the streams that open soon ---------------------
    def remember(self, channel: str, since: int) -> None:
        """Keep every event dispatched on ``channel`` from now until :meth:`forget`, so
        that a stream of it opening in this process reads no log (:meth:`recall`).

        ``since``: the channel has no event with a larger id dispatched yet, nor can
        one be until this call returns. Call it in the transaction that creates what
        the channel is about (a new answer: nothing can publish on its channel before
        the row commits). Thread-safe; nothing is kept while the hub is not running
        (its broker would not dispatch every event)."""
        ready = self._ready
        if self.broker is None or ready is None or not ready.is_set():
            return
        with self._remember_lock:
            remembered = self._remembered
            remembered[channel] = (since, [])
            while len(remembered) > MAX_REMEMBERED:
                del remembered[next(iter(remembered))]  # never used: its streams read the log

    def forget(self, channel: str) -> None:
        with self._remember_lock:
            self._remembered.pop(channel, None)

    def _forget_all(self) -> None:
        with self._remember_lock:  # remember() may be evicting from another thread
            self._remembered.clear()

    def recall(self, channels: tuple[str, ...], after: int) -> list[StoredEvent] | None:
        """The events of ``channels`` in (``after``, horizon] from memory, in id order;
        None when this process does not hold them all (read them from the log).
        On the loop: with :meth:`open` in the same step, no event falls in between."""
        kept = self._remembered.get(channels[0]) if len(channels) == 1 else None
        if kept is None or not kept[0] <= after <= self.horizon:
            return None
        self.recalled += 1
        return [event for event in kept[1] if event.id > after]

    def _control(self, event: StoredEvent) -> None:
        payload = event.payload()
        if event.type == "close_user" and isinstance(payload.get("user_id"), int):
            count = self.close_user(payload["user_id"], "access revoked")
        elif event.type == "close_auth" and isinstance(payload.get("key"), str):
            count = self.close_auth(payload["key"], "credentials revoked")
        else:
            return
        for hook in REVOCATION_HOOKS:
            hook(event.type, payload)
        if count:
            logger.info("%s: closed %d stream(s)", event.type, count)


# Control events for every process (e.g. end a user's streams when access is revoked).
CONTROL_CHANNEL = "ssechat:control"

# (user id, credentials key) of the request being served; see Hub.open.
stream_auth: contextvars.ContextVar[tuple[int | None, str | None]] = contextvars.ContextVar(
    "ssechat_stream_auth", default=(None, None)
)

# Called with (event type, payload) for each revocation, in every process (e.g. to drop caches).
REVOCATION_HOOKS: list[Callable[[str, dict], None]] = []

_hub: Hub | None = None
_hub_lock = threading.Lock()


def get_hub() -> Hub:
    global _hub
    if _hub is None:
        with _hub_lock:
            if _hub is None:
                _hub = Hub()
    return _hub
