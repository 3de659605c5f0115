"""Writing many rows at once: COPY on PostgreSQL, one executemany on SQLite.

:func:`bulk_insert` is the one place the catalog writes rows by the thousand (a
registration's samples, a sync's or an index version's assignments, groups and clusters).
On PostgreSQL (psycopg 3) it streams them with ``COPY table (columns) FROM STDIN`` through
the session's own connection, so the rows belong to the caller's transaction: a failure
anywhere (a bad value, a dropped connection, a later statement) rolls back every row with
the rest of it. psycopg's ``write_row`` does the quoting of COPY's text format (tabs,
newlines, backslashes, quotes, any unicode; NULL as ``\\N``), and each value goes through
its column's SQLAlchemy bind processing first, so JSON columns are serialized exactly as an
``insert()`` would write them (``None`` included: a JSON column stores JSON ``null`` for it,
as before) and bytes columns become ``bytea``. Python-side column defaults (``created_at``)
are filled in as ``insert()`` would. Text containing NUL is refused by PostgreSQL, as by
``insert()``: the same ``sqlalchemy.exc.DataError``.

SQLite's executemany is already fast (one prepared statement, no round trips): it is kept,
``insert(table)`` with the list of rows, exactly as before.

Ids are never passed: an integer id of a table that hands them out comes from its sequence
(PostgreSQL's never go back) or from SQLite's AUTOINCREMENT (migration 0005), so the rule
that an id is never handed out twice holds. A caller that needs the new ids selects them
back by a key it wrote (``store_items``: the batch's range of positions in its dataset).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from operator import itemgetter
from typing import Any

from sqlalchemy import Connection, Insert, Table, insert
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from sqlalchemy.sql import sqltypes

Rows = Iterable[Mapping[str, Any]] | Iterable[Sequence[Any]] | Mapping[str, Sequence[Any]]


def bulk_insert(session: Session | Connection, table: Any, rows: Rows, *, columns: Sequence[str] | None = None) -> int:  # noqa: ANN401 - a Table, a mapped class or an insert()
    """Insert ``rows`` into ``table`` (a :class:`~sqlalchemy.Table`, a mapped class, or a plain
    ``insert()`` of one, which the executemany path then runs as it is) in the caller's
    transaction; returns the number of rows.

    ``rows`` is one of: a list of mappings (column name -> value; the columns are the first
    row's keys, or ``columns``); a list of tuples in the order of ``columns``; or a mapping of
    column name -> sequence of values (numpy arrays welcome), all as long. Passing the
    table's autoincrement id is refused (ids come from the database).
    """
    statement = table if isinstance(table, Insert) else None
    target: Table = statement.table if statement is not None else getattr(table, "__table__", table)  # type: ignore[assignment]
    batch = _Batch.of(rows, columns)
    if not batch.count:
        return 0
    unknown = [n for n in batch.names if n not in target.c]
    if unknown:
        raise ValueError(f"{target.name} has no column {', '.join(unknown)}")
    auto = target.autoincrement_column
    if auto is not None and auto.name in batch.names:
        raise ValueError(f"{target.name}.{auto.name} is handed out by the database (ids are never reused): leave it out")
    if isinstance(session, Session):
        session.flush()  # rows added through the ORM (the dataset the samples reference) go first
        conn = session.connection()
    else:
        conn = session
    if conn.dialect.name != "postgresql" or conn.dialect.driver != "psycopg":
        session.execute(insert(table) if statement is None else statement, batch.dicts())
    else:
        _copy(conn, target, batch)
    return batch.count


class _Batch:
    """Rows of any accepted shape, read once, row by row: no copy of the whole batch is made
    (a million tuples built at once cost more in the garbage collector than COPY takes)."""

    def __init__(self, names: list[str], count: int, mappings: list[Mapping[str, Any]] | None = None,
                 tuples: Iterable[Sequence[Any]] | None = None) -> None:
        self.names, self.count, self._mappings, self._tuples = names, count, mappings, tuples

    @classmethod
    def of(cls, rows: Rows, columns: Sequence[str] | None) -> _Batch:
        if isinstance(rows, Mapping):
            names = list(columns) if columns is not None else list(rows)
            cols = [_plain(rows[n]) for n in names]
            lengths = {len(c) for c in cols}
            if len(lengths) > 1:
                raise ValueError(f"columns of different lengths: {dict(zip(names, map(len, cols)))}")
            return cls(names, lengths.pop() if lengths else 0, tuples=zip(*cols))
        items: list[Any] = rows if isinstance(rows, list) else list(rows)
        if items and isinstance(items[0], Mapping):
            return cls(list(columns) if columns is not None else list(items[0]), len(items), mappings=items)
        if items and columns is None:
            raise ValueError("rows given as tuples need their column names (columns=...)")
        return cls(list(columns or []), len(items), tuples=items)

    def tuples(self) -> Iterable[Sequence[Any]]:
        """The rows as tuples in the order of :attr:`names`."""
        if self._mappings is None:
            assert self._tuples is not None
            return self._tuples
        if len(self.names) == 1:
            name = self.names[0]
            return ((r[name],) for r in self._mappings)
        return map(itemgetter(*self.names), self._mappings)  # one C call per row

    def dicts(self) -> list[Mapping[str, Any]]:
        """The rows as mappings (the list given, when it was one and no columns were picked)."""
        if self._mappings is not None and list(self._mappings[0]) == self.names:
            return self._mappings
        return [dict(zip(self.names, t)) for t in self.tuples()]


def _plain(values: Any) -> Sequence[Any]:  # noqa: ANN401 - a sequence or an array
    """A column of values as Python objects (a numpy array's items are numpy scalars psycopg would not know)."""
    tolist = getattr(values, "tolist", None)
    return tolist() if callable(tolist) else list(values)


def _filler(arg: Any, call: bool) -> Callable[[], Any]:  # noqa: ANN401 - a column default's value or function
    """A column default's value for one row: its constant, or its function's result (SQLAlchemy
    wraps a default function to take an execution context; there is none here)."""
    return (lambda: arg(None)) if call else (lambda: arg)


def _processor(column: Any, dialect: Any) -> Callable[[Any], Any] | None:  # noqa: ANN401 - SQLAlchemy objects
    """The column's bind processing for ``dialect``. A JSON column's gives its JSON text (the
    text insert() sends: the psycopg dialect only wraps that same text in ``Json``)."""
    impl = column.type.dialect_impl(dialect)
    if isinstance(impl, sqltypes.JSON):
        return sqltypes.JSON.bind_processor(impl, dialect)
    return impl.bind_processor(dialect)


def _copy(conn: Connection, table: Table, batch: _Batch) -> None:
    from psycopg import Error as PsycopgError
    from psycopg import sql
    from psycopg.copy import QueuedLibpqWriter

    dialect = conn.dialect
    names = batch.names
    processors = [_processor(table.c[n], dialect) for n in names]
    fill: list[Callable[[], Any]] = []
    for column in table.columns:
        if column.name in names or column.default is None or column is table.autoincrement_column:
            continue
        default: Any = column.default
        if not (default.is_scalar or default.is_callable):  # a SQL expression or a sequence: COPY cannot evaluate it
            raise ValueError(f"{table.name}.{column.name} has a default COPY cannot fill: give its values")
        fill.append(_filler(default.arg, default.is_callable))
        names = [*names, column.name]
        processors.append(_processor(column, dialect))
    process = [(i, p) for i, p in enumerate(processors) if p is not None]
    target = sql.Identifier(table.schema, table.name) if table.schema else sql.Identifier(table.name)
    statement = sql.SQL("COPY {} ({}) FROM STDIN").format(target, sql.SQL(", ").join(map(sql.Identifier, names)))
    raw = conn.connection.driver_connection
    shown = statement.as_string(raw)
    try:
        # the queued writer sends on a thread while this one formats the next rows
        with raw.cursor() as cursor, cursor.copy(statement, writer=QueuedLibpqWriter(cursor)) as copy:  # type: ignore[union-attr]
            write = copy.write_row
            if not process and not fill:
                for row in batch.tuples():
                    write(row)
            else:
                for row in batch.tuples():
                    values = [*row, *(f() for f in fill)] if fill else list(row)
                    for i, p in process:
                        values[i] = p(values[i])
                    write(values)
    except PsycopgError as exc:
        # as SQLAlchemy reports a failed statement: its exception classes (OperationalError for a
        # dropped connection, which the catalog turns into "retry in a moment"; DataError for NUL
        # in text), and a dead connection is invalidated, not handed back to the pool
        invalidated = dialect.is_disconnect(exc, raw, None)  # type: ignore[arg-type]
        if invalidated:
            conn.invalidate(exc)
        raise DBAPIError.instance(shown, None, exc, PsycopgError, connection_invalidated=invalidated, dialect=dialect) from exc
