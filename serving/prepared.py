"""The group-commit writers' hot statements: SQL compiled once per dialect, run on the driver's cursor.

The audit writer and the ledger write a handful of statements per batch, and on the gateway's
2-core replica that thread shares the GIL with the event loop. Through ``Connection.execute``, a
budgeted batch of 4 records (audit rows, lease charges, the lease's update, the running totals) cost
0.50 ms of writer CPU, of which SQLite's own work (commit and fsync included) was ~0.17 ms: the rest
was SQLAlchemy's per-call machinery (cache key, execution context, events, result set-up), paid
again for every statement of every batch. SQLAlchemy has no lighter execution path, so this does
the one step it repeats needlessly, once: it compiles the statement for the connection's dialect
(its paramstyle, its types' bind processors, e.g. SQLite's DateTime text) and then hands parameter
rows straight to the DBAPI cursor of the SQLAlchemy connection, inside the transaction SQLAlchemy
began (SQLite's BEGIN IMMEDIATE included). Driver errors come back as SQLAlchemy's own exception
classes, so ``stores.retry_when_locked`` and every caller see what ``Connection.execute`` raised.

Parameters are plain values: an ``IN`` list is spelled out (``placeholders``), not SQLAlchemy's expanding
parameter. Query results come back as tuples, converted by the ``columns`` types given.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect


@dataclass(frozen=True)
class _Form:
    """The statement as one dialect's driver takes it."""

    sql: str
    positions: tuple[str, ...] | None  # parameter order for a positional paramstyle (SQLite's qmark)
    processors: dict[str, Callable[[Any], Any]]
    results: dict[str, Callable[[Any], Any]]

    def bind(self, params: Mapping[str, Any]) -> Any:
        processors = self.processors
        if self.positions is not None:
            return [processors[name](params[name]) if name in processors else params[name] for name in self.positions]
        return {name: processors[name](value) if name in processors else value for name, value in params.items()}


def _last_value(processor: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``processor`` that hands back its last result for the same object again: a batch's rows share their
    ``written_at`` and a lease's charges its ``created_at``, and SQLite's DateTime formats each in Python.
    The pair is one tuple, swapped whole, so a thread reading it never sees another's half-written entry."""
    last: tuple[Any, Any] = (object(), None)

    def process(value: Any) -> Any:
        nonlocal last
        seen, out = last
        if value is not seen:
            out = processor(value)
            last = (value, out)
        return out

    return process


def placeholders(name: str, n: int) -> str:
    """``:name_0, :name_1, ...``: the inside of an ``IN (...)`` of ``n`` values."""
    return ", ".join(f":{name}_{i}" for i in range(n))


class Prepared:
    """A textual statement; ``types`` are those of the parameters that need converting (DateTime), ``columns``
    those of the result columns."""

    def __init__(self, sql: str, *, columns: Mapping[str, sa.types.TypeEngine[Any]] | None = None,
                 **types: sa.types.TypeEngine[Any]) -> None:
        self.clause = sa.text(sql).bindparams(*(sa.bindparam(name, type_=type_) for name, type_ in types.items()))
        self.columns = dict(columns or {})
        self._forms: dict[tuple[str, str, str], _Form] = {}

    def _form(self, dialect: Dialect) -> _Form:
        key = (dialect.name, dialect.driver, dialect.paramstyle)
        form = self._forms.get(key)
        if form is None:
            compiled = self.clause.compile(dialect=dialect)
            processors = {name: processor for name, bind in compiled.binds.items()
                          if (processor := bind.type.dialect_impl(dialect).bind_processor(dialect)) is not None}
            positions = tuple(compiled.positiontup or ()) if compiled.positional else None
            results = {name: processor for name, type_ in self.columns.items()
                       if (processor := type_.dialect_impl(dialect).result_processor(dialect, None)) is not None}
            form = self._forms[key] = _Form(compiled.string, positions,
                                            {name: _last_value(processor) for name, processor in processors.items()},
                                            results)
        return form

    def rows(self, conn: sa.Connection, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        """The query's rows in ``conn``'s transaction, with the ``columns`` conversions applied."""
        form = self._form(conn.dialect)
        with self._cursor(conn, form, params) as cursor:
            cursor.execute(form.sql, form.bind(params))
            convert = [(i, form.results[column[0]]) for i, column in enumerate(cursor.description)
                       if column[0] in form.results]
            fetched = cursor.fetchall()
        if not convert:
            return [tuple(row) for row in fetched]
        out = []
        for row in fetched:
            values = list(row)
            for i, processor in convert:
                values[i] = processor(values[i])
            out.append(tuple(values))
        return out

    def execute(self, conn: sa.Connection, params: Sequence[Mapping[str, Any]]) -> int:
        """Run once per parameter row in ``conn``'s transaction; the rows changed, as the driver counts them
        (-1 where a driver does not sum an executemany)."""
        if not params:
            return 0
        form = self._form(conn.dialect)
        rows = [form.bind(p) for p in params]
        with self._cursor(conn, form, rows) as cursor:
            if len(rows) == 1:
                cursor.execute(form.sql, rows[0])
            else:
                cursor.executemany(form.sql, rows)
            return int(cursor.rowcount)

    @staticmethod
    @contextlib.contextmanager
    def _cursor(conn: sa.Connection, form: _Form, params: Any) -> Iterator[Any]:
        """A cursor of ``conn``'s DBAPI connection; driver errors raised as SQLAlchemy's (``OperationalError``...)."""
        dialect = conn.dialect
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            yield cursor
        except dialect.loaded_dbapi.Error as exc:
            raise sa.exc.DBAPIError.instance(form.sql, params, exc, dialect.loaded_dbapi.Error,
                                             dialect=dialect) from exc
        finally:
            cursor.close()
