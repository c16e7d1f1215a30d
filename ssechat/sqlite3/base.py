"""Django's SQLite backend, with this process's write transactions taking turns on a lock.

SQLite has one writer at a time. A transaction that finds the write lock taken
waits in SQLite's busy handler, which sleeps in steps of up to 100 ms: under a
burst of writes from several threads (100 chat answers starting while their
chunks are being stored) a write that would have waited a millisecond sleeps
tens of them, and every answer's next chunk with it. Here a write transaction
of this process first takes a lock of the process, which hands the turn over
as soon as the holder commits. Other processes' writers (``manage.py``) still
meet SQLite's busy handler, as before.

It also remembers each query's conversion from Django's ``%s`` placeholders to
SQLite's ``?`` (a regular expression over the whole query, through a lazy
object, at every execution): the same queries run again and again (a stream
connect's session lookup, a chat tick's writes).

``ENGINE = "ssechat.sqlite3"``; settings.py uses it for ``sqlite://`` URLs.
"""

from __future__ import annotations

import threading

from django.db.backends.sqlite3 import base
from django.utils.asyncio import async_unsafe

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def write_lock(name: str) -> threading.Lock:
    """The lock of the database file ``name`` in this process."""
    with _locks_guard:
        lock = _locks.get(name)
        if lock is None:
            lock = _locks[name] = threading.Lock()
        return lock


_MAX_CONVERTED = 2048  # queries remembered (the dict empties itself past that)
_MAX_CONVERTED_LENGTH = 4096  # longer queries (long IN lists) are converted each time
_converted: dict[str, str] = {}


class SQLiteCursorWrapper(base.SQLiteCursorWrapper):
    def convert_query(self, query, *, param_names=None):
        if param_names is not None:
            return super().convert_query(query, param_names=param_names)
        converted = _converted.get(query)
        if converted is None:
            converted = super().convert_query(query)
            if len(query) <= _MAX_CONVERTED_LENGTH:
                if len(_converted) >= _MAX_CONVERTED:
                    _converted.clear()
                _converted[query] = converted
        return converted


class DatabaseWrapper(base.DatabaseWrapper):
    _holds_write_lock = False
    _write_lock: threading.Lock | None = None

    @async_unsafe
    def create_cursor(self, name=None):
        return self.connection.cursor(factory=SQLiteCursorWrapper)

    def _start_transaction_under_autocommit(self) -> None:
        if self.transaction_mode in ("IMMEDIATE", "EXCLUSIVE") and not self._holds_write_lock:
            if self._write_lock is None:
                self._write_lock = write_lock(str(self.settings_dict["NAME"]))
            timeout = float(self.settings_dict.get("OPTIONS", {}).get("timeout", 5))
            # Not acquired in time (a writer stuck): SQLite's busy handler decides, as before.
            self._holds_write_lock = self._write_lock.acquire(timeout=timeout)
        try:
            super()._start_transaction_under_autocommit()
        except BaseException:
            self._release_write_lock()
            raise

    def _release_write_lock(self) -> None:
        if self._holds_write_lock:
            self._holds_write_lock = False
            self._write_lock.release()

    def _commit(self):
        try:
            return super()._commit()
        finally:
            self._release_write_lock()

    def _rollback(self):
        try:
            return super()._rollback()
        finally:
            self._release_write_lock()

    def _close(self):
        try:
            return super()._close()
        finally:
            self._release_write_lock()
