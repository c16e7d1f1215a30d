"""Brokers: how a process learns of new events and feeds them to its hub in order.

Both brokers read each new event from the database once per process and hand
it to all local subscribers; they differ in how they are woken.

``LocalBroker`` (SQLite, one server process): a publish in this process wakes
it at once; anything written by another process (``manage.py notify``, a
shell) is found by a cheap poll of ``id > horizon`` every
``SSECHAT_POLL_INTERVAL`` seconds. SQLite has one writer at a time, and a
transaction holds the write lock from its insert to its commit, so ids commit
in order and the horizon is simply the newest id read.

``PostgresBroker``: LISTEN/NOTIFY on one async psycopg connection per process
(never one per client), plus one async connection to read. On PostgreSQL ids
come from a sequence and transactions commit out of order: id 11 can be
visible while id 10 is still in flight, or id 10 may never exist (rollback).
So the broker only advances its horizon over contiguous ids. At a gap, every
transaction that could still fill it was already running when the later id
was seen (publish takes its xid before its id), so the broker then takes a
transaction id of its own: it is above every xid assigned so far. Once the
oldest running transaction (a snapshot's ``xmin``) is past that bound, whatever
is still missing never will be, and the broker moves on. A resume therefore
never skips an event, and nothing waits longer than the transactions that
actually hold the ids.

(The bound is not the snapshot's ``xmax``: that is the latest *completed* xid
plus one, and a transaction with a higher xid may already be running, holding
an earlier id, while the snapshot's ``xmin`` has caught up with that ``xmax``.)
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import TYPE_CHECKING

from django.conf import settings
from django.db import connections

from .db import run_db, spawn
from .hub import StoredEvent
from .log import NOTIFY_CHANNEL, latest_id, read_after
from .models import Event

if TYPE_CHECKING:
    from .hub import Hub

logger = logging.getLogger("ssechat.streams")

READ_BATCH = 2000


def broker_name() -> str:
    choice = (settings.SSECHAT_BROKER or "").strip().lower()
    if choice:
        if choice not in {"local", "postgres"}:
            raise ValueError(f"SSECHAT_BROKER must be 'local' or 'postgres', not {choice!r}")
        return choice
    return "postgres" if connections["default"].vendor == "postgresql" else "local"


def make_broker(hub: Hub):
    if broker_name() == "postgres":
        return PostgresBroker(hub)
    return LocalBroker(hub)


def _unseen(events: list[StoredEvent], horizon: int) -> list[StoredEvent]:
    """``events`` (in id order) above ``horizon``: while a read was on its way, the hub
    may have handed out some of them itself (``Hub.offer``)."""
    if events and events[0].id <= horizon:
        return [event for event in events if event.id > horizon]
    return events


class _Backoff:
    def __init__(self, first: float = 0.1, cap: float = 5.0):
        self.first, self.cap, self.delay = first, cap, first

    def reset(self) -> None:
        self.delay = self.first

    async def sleep(self) -> None:
        await asyncio.sleep(self.delay * (0.5 + random.random()))
        self.delay = min(self.cap, self.delay * 2)


class LocalBroker:
    name = "local"

    def __init__(self, hub: Hub):
        self.hub = hub
        self.interval = settings.SSECHAT_POLL_INTERVAL
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self.hub.advance(await run_db(latest_id))
        self._task = spawn(self._run(), name="ssechat-local-broker")

    def wake(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        backoff = _Backoff()
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.read_new()
                backoff.reset()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("local broker: reading new events failed; retrying")
                await backoff.sleep()

    async def read_new(self) -> None:
        while True:
            events = await run_db(read_after, self.hub.horizon, READ_BATCH)
            self.hub.dispatch(_unseen(events, self.hub.horizon))
            if len(events) < READ_BATCH:
                return

    async def stop(self) -> None:
        self.abandon()

    def abandon(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None


def pg_conninfo(alias: str = "default") -> str:
    """A libpq connection string for Django's database settings."""
    from psycopg.conninfo import make_conninfo

    conn = connections[alias]
    params = conn.get_connection_params()
    allowed = {
        "dbname", "user", "password", "host", "port", "sslmode", "sslrootcert", "sslcert",
        "sslkey", "passfile", "options", "application_name", "connect_timeout",
        "target_session_attrs", "service",
    }  # fmt: skip
    kwargs = {k: v for k, v in params.items() if k in allowed and v not in (None, "")}
    if "database" in params and "dbname" not in kwargs:
        kwargs["dbname"] = params["database"]
    kwargs.setdefault("application_name", "ssechat-broker")
    return make_conninfo(**{k: str(v) for k, v in kwargs.items()})


class PostgresBroker:
    name = "postgres"

    def __init__(self, hub: Hub):
        self.hub = hub
        self.interval = max(settings.SSECHAT_POLL_INTERVAL, 0.05)
        self.table = Event._meta.db_table
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._reader = None
        self._conninfo = pg_conninfo()
        # The earliest gap in ids above the horizon, and when it was first seen.
        self._gap_id: int | None = None
        self._gap_bound = 0  # an xid above every one assigned when the gap was seen
        self._gap_new = False  # a gap just seen: its bound is still to be taken
        self._gap_seen_at = 0.0
        self.listening = False
        self.reconnects = 0

    async def _connect(self):
        import psycopg

        return await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)

    async def start(self) -> None:
        self._reader = await self._connect()
        # Start at the newest id, but only once every transaction that had an xid
        # when we looked has ended: one of them may hold a smaller id.
        horizon = await self._latest()
        bound = await self._xid_bound()
        while True:
            xmin, _ = await self._snapshot()
            if xmin >= bound:
                break
            await asyncio.sleep(0.01)
        self.hub.advance(horizon)
        self._tasks = [
            spawn(self._listen(), name="ssechat-pg-listen"),
            spawn(self._read_loop(), name="ssechat-pg-read"),
        ]

    def wake(self) -> None:
        self._wake.set()

    async def _snapshot(self) -> tuple[int, int]:
        cur = await self._reader.execute(
            "SELECT pg_snapshot_xmin(pg_current_snapshot())::text,"
            " pg_snapshot_xmax(pg_current_snapshot())::text"
        )
        xmin, xmax = await cur.fetchone()
        return int(xmin), int(xmax)

    async def _latest(self) -> int:
        cur = await self._reader.execute(f"SELECT coalesce(max(id), 0) FROM {self.table}")  # noqa: S608
        (latest,) = await cur.fetchone()
        return int(latest)

    async def _xid_bound(self) -> int:
        """An xid above every one assigned so far: a transaction id of our own (the
        reader is in autocommit, so it ends at once). Taken once per gap, not per read."""
        cur = await self._reader.execute("SELECT pg_current_xact_id()::text")
        (xid,) = await cur.fetchone()
        return int(xid)

    async def _listen(self) -> None:
        backoff = _Backoff()
        while True:
            conn = None
            try:
                conn = await self._connect()
                await conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                self.listening = True
                backoff.reset()
                # Anything committed while we were not listening is read now.
                self.wake()
                async for _ in conn.notifies():
                    self._wake.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.listening = False
                self.reconnects += 1
                logger.warning("postgres broker: listening connection lost (%s); reconnecting", exc)
                await backoff.sleep()
            finally:
                self.listening = False
                if conn is not None:
                    try:
                        await conn.close()
                    except Exception:
                        pass

    async def _read_loop(self) -> None:
        backoff = _Backoff()
        while True:
            timeout = self.interval if self._gap_id is None else self._gap_recheck_delay()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                if self._reader is None or self._reader.closed:
                    self._reader = await self._connect()
                await self.read_new()
                backoff.reset()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("postgres broker: reading events failed (%s); retrying", exc)
                if self._reader is not None:
                    try:
                        await self._reader.close()
                    except Exception:
                        pass
                    self._reader = None
                await backoff.sleep()
                self._wake.set()

    def _gap_recheck_delay(self) -> float:
        waited = self.hub.loop.time() - self._gap_seen_at
        return min(self.interval, max(0.005, waited / 2))

    async def read_new(self) -> None:
        while True:
            cur = await self._reader.execute(
                f"""
                SELECT s.xmin, e.id, e.channel, e.parent, e.type, e.data
                FROM (SELECT pg_snapshot_xmin(pg_current_snapshot())::text AS xmin) s
                LEFT JOIN LATERAL (
                    SELECT id, channel, parent, type, data FROM {self.table}
                    WHERE id > %s ORDER BY id LIMIT %s
                ) e ON true
                """,  # noqa: S608
                [self.hub.horizon, READ_BATCH],
            )
            rows = await cur.fetchall()
            if not rows:
                return
            xmin = int(rows[0][0])
            read = [StoredEvent(*row[1:]) for row in rows if row[1] is not None]
            events = _unseen(read, self.hub.horizon)
            if self._gap_id is not None and self._gap_id <= self.hub.horizon:
                self._gap_id = None  # filled, and handed out by Hub.offer meanwhile
            deliverable = self._contiguous(events, xmin)
            self.hub.dispatch(deliverable)
            if self._gap_new:
                self._gap_bound = await self._xid_bound()
                self._gap_new = False
            if len(read) < READ_BATCH or len(deliverable) < len(events):
                return

    def _contiguous(self, events: list[StoredEvent], xmin: int) -> list[StoredEvent]:
        """The prefix of ``events`` that can be handed out without skipping an id.

        A gap seen for the first time sets ``_gap_new``: the caller then takes its bound."""
        out: list[StoredEvent] = []
        expected = self.hub.horizon + 1
        for event in events:
            if event.id != expected:
                gap = expected
                if self._gap_id == gap and not self._gap_new and xmin >= self._gap_bound:
                    # Every transaction that could fill [gap, event.id) has ended.
                    self._gap_id = None
                else:
                    if self._gap_id != gap:
                        self._gap_id, self._gap_new = gap, True
                        self._gap_seen_at = self.hub.loop.time()
                    elif self.hub.loop.time() - self._gap_seen_at > 10:
                        logger.warning(
                            "postgres broker: event #%d held back for %.0fs by a long"
                            " transaction that took an earlier id",
                            event.id,
                            self.hub.loop.time() - self._gap_seen_at,
                        )
                        self._gap_seen_at = self.hub.loop.time()
                    break
            elif self._gap_id is not None and self._gap_id <= event.id:
                self._gap_id = None
            out.append(event)
            expected = event.id + 1
        return out

    async def stop(self) -> None:
        self.abandon()
        if self._reader is not None:
            try:
                await self._reader.close()
            except Exception:
                pass
            self._reader = None

    def abandon(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks = []
