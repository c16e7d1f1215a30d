"""No answer stays ``streaming`` for ever: heartbeats, and failing the answers of dead processes.

Each process that generates answers refreshes ``heartbeat_at`` of its answers
every ``SSECHAT_CHAT_HEARTBEAT_SECONDS`` (10 s) and, in the same periodic task,
looks for answers nobody is writing any more:

- a heartbeat older than ``SSECHAT_CHAT_STALE_SECONDS`` (30 s): its process
  died, hangs, or lost the database (any host);
- a process of this host that no longer exists (``worker`` is
  ``host:pid:nonce``): found at once, e.g. when a killed worker is restarted.

Such an answer is marked ``failed`` (keeping its text) and gets its ``done``
event. This runs when a process starts (an ``on_startup`` hook) and then
periodically; ``manage.py recover_answers`` runs it by hand.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from datetime import timedelta

from django.db.models import Q
from django.utils import timezone

from ssechat.streams.db import run_db, spawn
from ssechat.streams.rows import only_row

from . import limits
from .models import Message

logger = logging.getLogger("chat.recovery")

HOST = socket.gethostname()[:120] or "localhost"
DEAD_PROCESS = "The server process writing this answer stopped before it finished."
STALE = "The server writing this answer stopped responding, so the answer was abandoned."
SWEEP_BATCH = 500

_identity: tuple[int, str] | None = None


def worker_id() -> str:
    """``host:pid:nonce`` of this process (the nonce tells a restarted process with the
    same pid, as in a container, from the one before it)."""
    global _identity
    pid = os.getpid()
    if _identity is None or _identity[0] != pid:
        _identity = (pid, f"{HOST}:{pid}:{secrets.token_hex(4)}")
    return _identity[1]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return True
    try:  # a killed process not yet reaped by its parent is a zombie
        with open(f"/proc/{pid}/stat", "rb") as stat:
            state = stat.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except (OSError, IndexError):
        return True


def is_dead(worker: str) -> bool:
    """True when ``worker`` names a process of this host that no longer runs.

    Processes of other hosts cannot be checked: their answers go stale instead.
    """
    parts = worker.rsplit(":", 2)
    if len(parts) != 3:
        return False
    host, pid_text, _nonce = parts
    if host != HOST or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return worker != worker_id()
    return not _pid_alive(pid)


def _cutoff(now=None):
    return (now or timezone.now()) - timedelta(seconds=limits.stale_seconds())


def stale_filter(now=None) -> Q:
    """The streaming answers whose heartbeat is too old (or that never had one)."""
    cutoff = _cutoff(now)
    return Q(heartbeat_at__lt=cutoff) | Q(heartbeat_at__isnull=True, created_at__lt=cutoff)


def looks_stale(message: Message, now=None) -> bool:
    """:func:`stale_filter` on the row as read: a heartbeat only moves forward, so a
    row that was fresh when read is fresh now, and one that was not is checked again
    (under lock, ``only_if=stale_filter()``) before anything is done to it."""
    cutoff = _cutoff(now)
    if message.heartbeat_at is not None:
        return message.heartbeat_at < cutoff
    return message.created_at < cutoff


def sweep() -> list[int]:
    """Mark the abandoned answers failed and publish their ``done``; return their ids.

    Sync ORM code (run it with ``run_db``).
    """
    from .generation import finalize

    failed: list[int] = []
    # Processes of this host that are gone first: their answers get the precise reason.
    local = Message.objects.filter(
        status=Message.Status.STREAMING, worker__startswith=f"{HOST}:"
    ).values_list("id", "worker")[:SWEEP_BATCH]
    for message_id, worker in list(local):
        if is_dead(worker) and finalize(
            message_id, status=Message.Status.FAILED, error=DEAD_PROCESS, only_if=Q(worker=worker)
        ):
            failed.append(message_id)
    stale = stale_filter()
    ids = list(
        Message.objects.filter(stale, status=Message.Status.STREAMING)
        .order_by("id")
        .values_list("id", flat=True)[:SWEEP_BATCH]
    )
    for message_id in ids:
        # Conditional: a heartbeat that came in meanwhile keeps the answer alive.
        if finalize(message_id, status=Message.Status.FAILED, error=STALE, only_if=stale_filter()):
            failed.append(message_id)
    if failed:
        logger.warning("marked %d abandoned answer(s) failed: %s", len(failed), failed)
    return failed


def fail_if_abandoned(message: Message) -> Message:
    """``message``, marked failed first if nobody is writing it any more (sync)."""
    from .generation import finalize

    if message.status != Message.Status.STREAMING:
        return message
    if message.worker and is_dead(message.worker):
        done = finalize(
            message.pk,
            status=Message.Status.FAILED,
            error=DEAD_PROCESS,
            only_if=Q(worker=message.worker),
        )
    else:
        if not looks_stale(message):
            return message  # alive: no query (every answer stream that opens checks)
        done = finalize(
            message.pk, status=Message.Status.FAILED, error=STALE, only_if=stale_filter()
        )
    if done is not None:
        logger.warning("marked abandoned answer %s failed", message.pk)
        return done
    # Someone else ended it meanwhile: the row says how.
    return only_row(Message.objects.filter(pk=message.pk)) or message


def heartbeat(ids: list[int]) -> list[int]:
    """Refresh the heartbeat of this process's answers; return those no longer streaming
    (cancelled or failed from elsewhere), whose generation should stop."""
    Message.objects.filter(id__in=ids, status=Message.Status.STREAMING).update(
        heartbeat_at=timezone.now()
    )
    streaming = set(
        Message.objects.filter(id__in=ids, status=Message.Status.STREAMING).values_list(
            "id", flat=True
        )
    )
    return [i for i in ids if i not in streaming]


async def _monitor() -> None:
    from . import generation

    while True:
        await asyncio.sleep(limits.heartbeat_seconds())
        try:
            ids = generation.active_ids()
            if ids:
                for message_id in await run_db(heartbeat, ids):
                    generation.stop_local(message_id)
            await run_db(sweep)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("chat monitor: heartbeat or sweep failed; trying again later")


_monitors: dict[asyncio.AbstractEventLoop, asyncio.Task] = {}


def ensure_monitor() -> None:
    """Start the periodic heartbeat-and-sweep task on the running loop (once)."""
    loop = asyncio.get_running_loop()
    task = _monitors.get(loop)
    if task is not None and not task.done():
        return
    for old in [old for old in _monitors if old.is_closed()]:
        del _monitors[old]
    _monitors[loop] = spawn(_monitor(), name="chat-monitor")


async def on_server_start() -> None:
    """Startup hook: fail what dead processes left behind, then watch periodically."""
    try:
        await run_db(sweep)
    finally:
        ensure_monitor()
