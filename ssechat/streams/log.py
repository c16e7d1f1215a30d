"""Reading and writing the event log (sync ORM code; async callers use ``run_db``)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import partial
from typing import Any

from django.db import DEFAULT_DB_ALIAS, connections, transaction
from django.db.models import Max, Q
from django.db.models.signals import post_save, pre_save
from django.utils import timezone

from .hub import StoredEvent, get_hub
from .models import Event, EventLogState
from .rows import insert
from .wire import check_field, dumps

MAX_CHANNEL_LENGTH = 200
MAX_TYPE_LENGTH = 64
NOTIFY_CHANNEL = "ssechat_events"

_FIELDS = ("id", "channel", "parent", "type", "data")


def _validate_name(kind: str, value: str, limit: int) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{kind} must be a non-empty string")
    if len(value) > limit:
        raise ValueError(f"{kind} is longer than {limit} characters")
    return check_field(kind, value)


_pg_sequence: dict[str, str] = {}


def _pg_event_sequence(conn, cursor) -> str:
    """The name of the event table's id sequence on ``conn`` (looked up once)."""
    seq = _pg_sequence.get(conn.alias)
    if seq is None:
        cursor.execute("SELECT pg_get_serial_sequence(%s, 'id')", [Event._meta.db_table])
        seq = _pg_sequence[conn.alias] = cursor.fetchone()[0]
    return seq


def _pg_insert(conn, channel: str, parent: str, event_type: str, data: str) -> int:
    table = Event._meta.db_table
    with conn.cursor() as cursor:
        seq = _pg_event_sequence(conn, cursor)
        # The transaction takes its xid *before* the event id, so a broker that
        # sees a gap in ids knows every transaction that could still fill it
        # was already running (see brokers.PostgresBroker). The NOTIFY is
        # delivered at commit, and not at all on rollback.
        cursor.execute(
            f"""
            WITH xact AS MATERIALIZED (SELECT pg_current_xact_id()),
            ins AS (
                INSERT INTO {table} (id, channel, parent, type, data, created_at)
                SELECT nextval(%s::regclass), %s, %s, %s, %s, now() FROM xact
                RETURNING id
            )
            SELECT id, pg_notify(%s, '') FROM ins
            """,  # noqa: S608 - the table name is the model's own
            [seq, channel, parent, event_type, data, NOTIFY_CHANNEL],
        )
        return cursor.fetchone()[0]


def _pg_insert_many(conn, rows: list[tuple[str, str, str, str]]) -> list[int]:
    """Several events in two statements (one round trip each, whatever their number):
    their ids, taken after the transaction's xid as ``_pg_insert`` takes one, then
    one multi-row INSERT with one NOTIFY. The ids are handed to the rows in
    ascending order, so the events' ids follow their order."""
    table = Event._meta.db_table
    with conn.cursor() as cursor:
        seq = _pg_event_sequence(conn, cursor)
        cursor.execute(
            "WITH xact AS MATERIALIZED (SELECT pg_current_xact_id())"
            " SELECT nextval(%s::regclass) FROM xact, generate_series(1, %s)",
            [seq, len(rows)],
        )
        ids = sorted(row[0] for row in cursor.fetchall())
        if len(ids) != len(rows):  # never: one id per row asked for
            raise RuntimeError("the event sequence returned a wrong number of ids")
        values = ", ".join(["(%s, %s, %s, %s, %s, now())"] * len(rows))
        params: list = []
        for event_id, row in zip(ids, rows, strict=True):
            params.append(event_id)
            params += row
        params.append(NOTIFY_CHANNEL)
        cursor.execute(
            f"WITH ins AS (INSERT INTO {table} (id, channel, parent, type, data, created_at)"  # noqa: S608 - the model's own table
            f" VALUES {values} RETURNING 1) SELECT pg_notify(%s, '') FROM ins LIMIT 1",
            params,
        )
        cursor.fetchall()
    return ids


def _prepare(channel: str, event_type: str, payload: Any, parent: str) -> tuple[str, ...]:
    """(channel, parent, type, data) of an event to store, its names checked."""
    _validate_name("channel", channel, MAX_CHANNEL_LENGTH)
    _validate_name("event type", event_type, MAX_TYPE_LENGTH)
    if parent:
        _validate_name("parent channel", parent, MAX_CHANNEL_LENGTH)
    return channel, parent, event_type, dumps(payload)


def publish(
    channel: str,
    event_type: str,
    payload: Any,
    *,
    parent: str = "",
    using: str | None = None,
) -> int:
    """Store an event in the caller's transaction; wake streams after commit.

    Returns the event id. Nothing is sent if the transaction rolls back.
    """
    channel, parent, event_type, data = _prepare(channel, event_type, payload, parent)
    alias = using or DEFAULT_DB_ALIAS
    conn = connections[alias]
    if conn.vendor == "postgresql":
        event_id = _pg_insert(conn, channel, parent, event_type, data)
    else:
        event = Event(channel=channel, parent=parent, type=event_type, data=data)
        event_id = insert(event, alias).pk
    # After commit, the hub gets the event itself: no read back from the database
    # when nothing else came between (see Hub.offer).
    stored = StoredEvent(event_id, channel, parent, event_type, data)
    transaction.on_commit(partial(get_hub().offer, stored), using=alias)
    return event_id


_MANY_BATCH = 500  # rows per INSERT (5 parameters each; SQLite allows 32,766)


def publish_many(
    events: Sequence[tuple[str, str, Any, str]], *, using: str | None = None
) -> list[int]:
    """:func:`publish` for several ``(channel, event_type, payload, parent)`` events, in
    order, in the caller's transaction; their ids, in the same order.

    On SQLite the rows go in ONE ``INSERT ... RETURNING`` per batch (a chat tick
    stores a chunk of every streaming answer at once): SQLite numbers the rows
    of an INSERT in the order of its VALUES, so the returned ids, sorted, are
    the events' ids in order. On PostgreSQL a batch is two statements (its ids,
    then one INSERT and one NOTIFY): one per event made a tick of 100 answers
    100 round trips, each a wait for the GIL. Elsewhere (or with save signals
    connected to ``Event`` on SQLite) each event is stored as ``publish`` stores
    it. One after-commit hand-over to the hub for all of them.
    """
    if not events:
        return []
    prepared = [_prepare(*event) for event in events]
    alias = using or DEFAULT_DB_ALIAS
    conn = connections[alias]
    if conn.vendor == "postgresql":
        ids = []
        for start in range(0, len(prepared), _MANY_BATCH):
            ids += _pg_insert_many(conn, prepared[start : start + _MANY_BATCH])
    elif (
        conn.vendor == "sqlite"
        and conn.features.can_return_columns_from_insert
        and not (pre_save.has_listeners(Event) or post_save.has_listeners(Event))
    ):
        ids = []
        for start in range(0, len(prepared), _MANY_BATCH):
            ids += _sqlite_insert_many(conn, prepared[start : start + _MANY_BATCH])
    else:
        ids = [
            insert(Event(channel=c, parent=p, type=t, data=d), alias).pk for c, p, t, d in prepared
        ]
    stored = [StoredEvent(i, c, p, t, d) for i, (c, p, t, d) in zip(ids, prepared, strict=True)]
    transaction.on_commit(partial(_offer_all, stored), using=alias)
    return ids


def _offer_all(events: list[StoredEvent]) -> None:
    offer = get_hub().offer
    for event in events:
        offer(event)


def _sqlite_insert_many(conn, rows: list[tuple[str, str, str, str]]) -> list[int]:
    quote = conn.ops.quote_name
    now = conn.ops.adapt_datetimefield_value(timezone.now())
    columns = ", ".join(quote(c) for c in ("channel", "parent", "type", "data", "created_at"))
    values = ", ".join(["(%s, %s, %s, %s, %s)"] * len(rows))
    params: list = []
    for row in rows:
        params += row
        params.append(now)
    with conn.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {quote(Event._meta.db_table)} ({columns}) VALUES {values}"  # noqa: S608 - the model's own table
            f" RETURNING {quote('id')}",
            params,
        )
        ids = sorted(row[0] for row in cursor.fetchall())
    if len(ids) != len(rows):  # never: one id per row inserted
        raise RuntimeError("the event log returned a wrong number of ids")
    return ids


async def apublish(
    channel: str, event_type: str, payload: Any, *, parent: str = "", using: str | None = None
) -> int:
    """:func:`publish` from async code (its own transaction)."""
    from .db import run_db

    return await run_db(publish, channel, event_type, payload, parent=parent, using=using)


def _rows_to_events(rows: Iterable[tuple]) -> list[StoredEvent]:
    return [StoredEvent(*row) for row in rows]


def read_after(after: int, limit: int) -> list[StoredEvent]:
    """All events with ids above ``after`` (the broker's read), in id order."""
    rows = Event.objects.filter(id__gt=after).order_by("id").values_list(*_FIELDS)[:limit]
    return _rows_to_events(rows)


def read_channels(channels: Iterable[str], after: int, upto: int, limit: int) -> list[StoredEvent]:
    """Events of ``channels`` (or their children) with ``after < id <= upto``."""
    channels = list(channels)
    rows = (
        Event.objects.filter(Q(channel__in=channels) | Q(parent__in=channels))
        .filter(id__gt=after, id__lte=upto)
        .order_by("id")
        .values_list(*_FIELDS)[:limit]
    )
    return _rows_to_events(rows)


def latest_id() -> int:
    return Event.objects.aggregate(m=Max("id"))["m"] or 0


_bounds_sql: dict[str, str] = {}


def log_bounds() -> tuple[int, int]:
    """(pruned_through, latest id): a resume id must lie between them.

    One plain query (every stream that resumes, and every chat answer's stream, reads
    them when it opens: through the ORM they were two, each compiled anew).
    """
    conn = connections[DEFAULT_DB_ALIAS]
    sql = _bounds_sql.get(conn.alias)
    if sql is None:
        quote = conn.ops.quote_name
        state, event = EventLogState._meta, Event._meta
        pruned_column = state.get_field("pruned_through").column
        sql = _bounds_sql[conn.alias] = (
            f"SELECT (SELECT {quote(pruned_column)} FROM {quote(state.db_table)}"  # noqa: S608 - the models' own tables
            f" WHERE {quote(state.pk.column)} = 1),"
            f" (SELECT MAX({quote(event.pk.column)}) FROM {quote(event.db_table)})"
        )
    with conn.cursor() as cursor:
        cursor.execute(sql)
        pruned, latest = cursor.fetchone()
    pruned = pruned or 0
    return pruned, max(latest or 0, pruned)
