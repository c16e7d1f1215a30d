"""Rows with less ORM work: one row by a unique key; one row inserted or updated
with plain SQL.

``only_row`` reads the row a lookup on a unique key matches without the ORDER
BY that ``QuerySet.first()`` adds (Django compiles the ordering on every call:
a tenth of the CPU of starting a chat answer went to it).

``insert`` saves a new row as ``Model.save()`` would insert it. The ORM spends
far more CPU building an INSERT (``Model.save`` → ``SQLInsertCompiler``) than
the database spends running it; a publish makes two of them. This prepares
each value with the field's own ``pre_save`` and ``get_db_prep_save`` (what
the compiler calls), so the stored row is the same.

It falls back to ``Model.save`` whenever the ORM would do more than insert:
a model with ``pre_save``/``post_save`` receivers, a primary key that is not
an auto field, a database that cannot return the new id.

``update`` is ``Model.save(update_fields=...)`` the same way: one UPDATE of the
row's given fields by its primary key, values prepared by the fields;
``update_many`` the same for several rows in one ``executemany``.
"""

from __future__ import annotations

from typing import Any, TypeVar

from django.db import DatabaseError, connections
from django.db.models import QuerySet
from django.db.models.fields import AutoFieldMixin
from django.db.models.signals import post_save, pre_save

T = TypeVar("T")

_sql: dict[tuple[str, type], tuple[str, list, bool]] = {}


def only_row(query: QuerySet[T]) -> T | None:
    """The row of ``query`` (a lookup on a unique key: at most one row), or None."""
    for row in query.order_by()[:1]:  # no ORDER BY, not even the model's default one
        return row
    return None


def _insert_sql(connection: Any, model: type) -> tuple[str, list, bool]:
    key = (connection.alias, model)
    found = _sql.get(key)
    if found is None:
        meta = model._meta
        quote = connection.ops.quote_name
        fields = [f for f in meta.concrete_fields if f is not meta.pk]
        returning = connection.features.can_return_columns_from_insert
        sql = (
            f"INSERT INTO {quote(meta.db_table)} ({', '.join(quote(f.column) for f in fields)})"  # noqa: S608 - the model's own table
            f" VALUES ({', '.join(['%s'] * len(fields))})"
        )
        if returning:
            sql += f" RETURNING {quote(meta.pk.column)}"
        found = _sql[key] = (sql, fields, returning)
    return found


def _plain(model: type) -> bool:
    """Whether saving ``model`` is nothing but its SQL (no receivers, no parents)."""
    meta = model._meta
    return not (meta.parents or pre_save.has_listeners(model) or post_save.has_listeners(model))


def insert(instance: Any, using: str) -> Any:
    """Save a new ``instance`` (its pk unset) with one INSERT; return it, pk set."""
    model = type(instance)
    meta = model._meta
    if instance.pk is not None or not isinstance(meta.pk, AutoFieldMixin) or not _plain(model):
        instance.save(using=using, force_insert=True)
        return instance
    connection = connections[using]
    sql, fields, returning = _insert_sql(connection, model)
    instance._prepare_related_fields_for_save(operation_name="save")
    params = [f.get_db_prep_save(f.pre_save(instance, True), connection) for f in fields]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        if returning:
            new_id = cursor.fetchone()[0]
        else:
            new_id = connection.ops.last_insert_id(cursor, meta.db_table, meta.pk.column)
    setattr(instance, meta.pk.attname, meta.pk.to_python(new_id))
    instance._state.adding = False
    instance._state.db = using
    return instance


def _update_sql(connection: Any, model: type, fields: list[str]) -> tuple[str, list]:
    meta = model._meta
    quote = connection.ops.quote_name
    chosen = [meta.get_field(name) for name in fields]
    sets = ", ".join(f"{quote(f.column)} = %s" for f in chosen)
    sql = f"UPDATE {quote(meta.db_table)} SET {sets} WHERE {quote(meta.pk.column)} = %s"  # noqa: S608 - the model's own table and columns
    return sql, chosen


def _update_params(instance: Any, chosen: list, connection: Any) -> list:
    params = [f.get_db_prep_save(f.pre_save(instance, False), connection) for f in chosen]
    params.append(type(instance)._meta.pk.get_db_prep_value(instance.pk, connection))
    return params


def update(instance: Any, fields: list[str], using: str) -> None:
    """Save ``fields`` (names) of a stored ``instance`` with one UPDATE by its pk.

    Raises ``DatabaseError`` if no row has that pk, as ``save(update_fields=...)`` does.
    """
    _update([instance], fields, using)


def update_many(instances: list[Any], fields: list[str], using: str) -> None:
    """:func:`update` for several stored instances of one model: one statement run
    for each (``executemany``: on PostgreSQL in one pipeline, not a round trip each).
    Raises ``DatabaseError`` if a row was not there."""
    if instances:
        _update(instances, fields, using)


def _update(instances: list[Any], fields: list[str], using: str) -> None:
    model = type(instances[0])
    if not _plain(model):
        for instance in instances:
            instance.save(using=using, update_fields=fields)
        return
    connection = connections[using]
    sql, chosen = _update_sql(connection, model, fields)
    with connection.cursor() as cursor:
        if len(instances) == 1:
            cursor.execute(sql, _update_params(instances[0], chosen, connection))
        else:
            cursor.executemany(sql, [_update_params(i, chosen, connection) for i in instances])
        if 0 <= cursor.rowcount < len(instances):
            raise DatabaseError("Save with update_fields did not affect any rows.")


def column(connection: Any, model: type, name: str) -> str:
    """The quoted column of ``model``'s field ``name``, for plain SQL on ``connection``."""
    return connection.ops.quote_name(model._meta.get_field(name).column)
