"""Users read with plain SQL: what ``ModelBackend.get_user`` returns, without the ORM build.

Building ``User.objects.get(pk=...)`` costs far more CPU than running its
query (about 440 µs against 30 µs here), and a stream connect does little
else. The SQL below selects the same columns the ORM would, converts them
with the backend's and the fields' own converters, and builds the instance
with ``Model.from_db``, as the ORM does.

It can also read the session row and the user row in one query, when the
caller already knows which user the session belongs to.
"""

from __future__ import annotations

import threading
from typing import Any

from django.contrib.auth import get_user_model
from django.db import connections, router

_local = threading.local()


class UserRows:
    """SQL and converters for the user model on one database connection (one thread)."""

    def __init__(self, alias: str):
        self.alias = alias
        self.connection = connection = connections[alias]
        self.model = model = get_user_model()
        meta = model._meta
        quote = connection.ops.quote_name
        self.fields = fields = list(meta.concrete_fields)
        self.attnames = [f.attname for f in fields]
        self.width = len(fields)
        self.table = meta.db_table
        self.columns = ", ".join(f"u.{quote(f.column)}" for f in fields)
        self.pk_field = meta.pk
        self.pk_index = fields.index(meta.pk)
        self.user_sql = (
            f"SELECT {self.columns} FROM {quote(meta.db_table)} u"  # noqa: S608 - the model's own table
            f" WHERE u.{quote(meta.pk.column)} = %s"
        )
        # The converters the ORM's compiler would apply (backend's, then the field's).
        self.converters: list[tuple[int, Any, list]] = []
        for index, field in enumerate(fields):
            col = field.get_col(meta.db_table)
            found = connection.ops.get_db_converters(col) + col.get_db_converters(connection)
            if found:
                self.converters.append((index, col, found))

    def pk_param(self, user_id: Any) -> Any:
        return self.pk_field.get_db_prep_value(user_id, self.connection)

    def session_join_sql(self, session_table: str) -> str:
        """session_data plus the user's columns (NULL when there is no such user)."""
        quote = self.connection.ops.quote_name
        return (
            f"SELECT s.session_data, {self.columns} FROM {quote(session_table)} s"  # noqa: S608
            f" LEFT JOIN {quote(self.table)} u ON u.{quote(self.pk_field.column)} = %s"
            " WHERE s.session_key = %s AND s.expire_date > %s"
        )

    def build(self, row: tuple) -> Any:
        """A user instance from raw column values (as ``Model.from_db`` gets them)."""
        values = list(row)
        connection = self.connection
        for index, col, converters in self.converters:
            value = values[index]
            for converter in converters:
                value = converter(value, col, connection)
            values[index] = value
        return self.model.from_db(self.alias, self.attnames, values)

    def fetch(self, user_id: Any, cursor: Any = None) -> tuple | None:
        """The raw row of a user, or None (``cursor``: an open one on this connection)."""
        if cursor is None:
            with self.connection.cursor() as cursor:
                cursor.execute(self.user_sql, [self.pk_param(user_id)])
                return cursor.fetchone()
        cursor.execute(self.user_sql, [self.pk_param(user_id)])
        return cursor.fetchone()


def user_rows(alias: str | None = None) -> UserRows:
    """The :class:`UserRows` of this thread's connection to ``alias`` (the user model's)."""
    if alias is None:
        alias = router.db_for_read(get_user_model())
    cache = getattr(_local, "rows", None)
    if cache is None:
        cache = _local.rows = {}
    rows = cache.get(alias)
    if rows is None or rows.connection is not connections[alias]:
        rows = cache[alias] = UserRows(alias)
    return rows


def reset() -> None:
    """Forget the SQL built in this thread (the user model or settings changed: tests)."""
    _local.rows = {}
