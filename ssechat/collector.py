"""The garbage collector in a server process: its thresholds, and the time it takes.

A process holding thousands of open streams holds many long-lived objects, and
each full collection walks all of them. With Python's default thresholds
(700, 10, 10) a burst of connects (each leaves a stream's objects alive) makes
a full collection every time the heap has grown by a quarter, and a third of
the server's time in a connect storm went to the collector. Higher thresholds
collect young objects less often, so a burst is walked fewer times; reference
counting still frees everything that is not in a cycle at once, and cycles
wait a little longer (``SSECHAT_GC_THRESHOLD``, applied by ``ssechat.asgi``).
"""

from __future__ import annotations

import gc
import time

_seconds = [0.0, 0.0, 0.0]
_collections = [0, 0, 0]
_collected = [0, 0, 0]
_started = [0.0]


def apply_threshold(threshold: tuple[int, int, int] | None) -> None:
    """Set the collector's thresholds (None: leave Python's)."""
    if threshold is not None:
        gc.set_threshold(*threshold)


def _callback(phase: str, info: dict) -> None:
    if phase == "start":
        _started[0] = time.perf_counter()
    else:
        generation = info["generation"]
        _seconds[generation] += time.perf_counter() - _started[0]
        _collections[generation] += 1
        _collected[generation] += info["collected"]


def install_stats() -> None:
    """Count collections and their time (``/healthz`` shows them with SSECHAT_STATS)."""
    if _callback not in gc.callbacks:
        gc.callbacks.append(_callback)


def snapshot() -> dict:
    """Thresholds; collections, seconds and objects collected per generation since
    :func:`install_stats`."""
    return {
        "threshold": list(gc.get_threshold()),
        "collections": list(_collections),
        "seconds": [round(s, 4) for s in _seconds],
        "collected": list(_collected),  # objects freed only by the collector (in cycles)
    }
