"""Statements on the saga's path, sent by asyncpg itself on PostgreSQL.

SQLAlchemy spends more CPU on each statement it sends than asyncpg does sending it: an
execution context, a cursor adapter, a greenlet switch and a result object per call,
around every round trip (``benchmarks/statements.py`` measures both). An order takes
some twenty-five statements through the four services, so the ones on its path are
:class:`Prepared`: compiled by SQLAlchemy once per schema and set of parameters, then
handed to asyncpg with their parameters in order.

Only inside what SQLAlchemy opened: a transaction asyncpg has begun, or an autocommit
connection. The first statement of a transaction goes through SQLAlchemy, which sends the
BEGIN; so do all statements on SQLite, and any statement this module cannot compile for
asyncpg. Errors come back as SQLAlchemy's (an :class:`~sqlalchemy.exc.IntegrityError`
for a broken constraint, else a :class:`~sqlalchemy.exc.DBAPIError`), and a connection
that is gone is invalidated, so the pool does not hand it out again. Other pooled
connections that went stale with it (a database restart) are found by SQLAlchemy, which
sends each transaction's first statement and then renews the whole pool.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
from sqlalchemy import ColumnElement, String, Table, any_, bindparam, exc, func
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import sqltypes
from sqlalchemy.sql.base import Executable
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.types import TypeDecorator

# a row, read by column name: an asyncpg Record, a dict or a SQLAlchemy RowMapping
Row = Mapping[Any, Any]


@dataclass(frozen=True, slots=True)
class _Compiled:
    sql: str
    names: tuple[str, ...]  # the parameters, in the order of $1, $2, ...
    given: Mapping[str, Any]  # parameters the caller leaves out: defaults, values in the SQL
    processors: tuple[Any, ...]  # each parameter's bind processor, or None
    results: tuple[tuple[str, Any], ...]  # result columns of the application's own types

    def args(self, params: Row) -> list[Any]:
        if self.given:
            params = {**self.given, **params}
        return [
            value if process is None else process(value)
            for value, process in zip(
                (params[name] for name in self.names), self.processors, strict=True
            )
        ]

    def rows(self, records: list[Any]) -> list[Row]:
        if not self.results:
            return records
        return [
            {**record, **{name: process(record[name]) for name, process in self.results}}
            for record in records
        ]


class Prepared:
    """A statement built once, run by asyncpg where it can be and by SQLAlchemy elsewhere.

    Parameters go through their types' bind processors, as under SQLAlchemy, and columns
    the caller leaves out take their scalar defaults, as SQLAlchemy's would (not in an
    INSERT with a WITH: SQLAlchemy gives that none, and its caller must). Results of
    plain types (strings, integers, decimals, times, booleans, bytes) come as asyncpg
    decodes them, which is what SQLAlchemy's asyncpg dialect hands back too; a
    :class:`~sqlalchemy.types.TypeDecorator` over one of them has its result conversion
    applied here. Anything else (an expanding ``IN``, a default computed per row, result
    columns sharing a name, other result types) goes through SQLAlchemy.
    """

    def __init__(self, statement: Executable, *, elsewhere: Executable | None = None) -> None:
        """``elsewhere``: what SQLAlchemy sends instead, where asyncpg does not run this."""
        self.statement = statement
        self._portable = statement if elsewhere is None else elsewhere
        self._compiled: dict[tuple[str | None, frozenset[str]], _Compiled | None] = {}

    async def rows(self, session: AsyncConnection, params: Row) -> list[Row]:
        """The rows the statement returns, each read by column name."""
        fast = self._fast(session, params.keys())
        if fast is None:
            result = await session.execute(self._portable, dict(params))
            return list(result.mappings().all())
        driver, compiled = fast
        args = compiled.args(params)
        try:
            records = await driver.fetch(compiled.sql, *args)
        except _ASYNCPG_ERRORS as error:
            raise await _as_sqlalchemy(session, driver, error, compiled.sql, args) from error
        return compiled.rows(records)

    async def run(self, session: AsyncConnection, params: Row) -> int:
        """Run the statement once; how many rows it changed."""
        fast = self._fast(session, params.keys())
        if fast is None:
            result = await session.execute(self._portable, dict(params))
            return int(result.rowcount)
        driver, compiled = fast
        args = compiled.args(params)
        try:
            status: str = await driver.execute(compiled.sql, *args)
        except _ASYNCPG_ERRORS as error:
            raise await _as_sqlalchemy(session, driver, error, compiled.sql, args) from error
        return int(status.rsplit(" ", 1)[-1])  # "UPDATE 1", "INSERT 0 1"

    def _fast(
        self, session: AsyncConnection, keys: Any
    ) -> tuple[asyncpg.Connection, _Compiled] | None:
        """The asyncpg connection and the compiled statement, if asyncpg may run it now."""
        driver = _driver_for(session)
        if driver is None:
            return None
        options = session.sync_connection.get_execution_options()  # type: ignore[union-attr]
        schema = (options.get("schema_translate_map") or {}).get(None)
        key = (schema, frozenset(keys))
        if key not in self._compiled:
            compiler = self.statement.compile(  # type: ignore[attr-defined]
                dialect=session.dialect,
                column_keys=sorted(key[1]),
                schema_translate_map={None: schema} if schema else None,
                render_schema_translate=bool(schema),
            )
            self._compiled[key] = _compile(self.statement, compiler, key[1], session.dialect)
        compiled = self._compiled[key]
        return None if compiled is None else (driver, compiled)


@functools.cache
def insert_or_skip(table: Table, *returning: Any) -> Prepared:
    """``INSERT ... ON CONFLICT DO NOTHING`` into ``table``: ``run`` says 0 when a unique
    key clashed (on PostgreSQL, after waiting for an uncommitted clashing row's fate), and
    ``rows`` gives the ``returning`` columns of a row inserted, none of one skipped.

    PostgreSQL's INSERT serves SQLite too: both compile its ``ON CONFLICT DO NOTHING``.
    """
    statement = postgresql.insert(table).on_conflict_do_nothing()
    return Prepared(statement.returning(*returning) if returning else statement)


def unnested(name: str, kind: Any) -> Any:
    """``unnest(:name)`` (PostgreSQL): a row for each element of the list given as ``name``,
    a list of ``kind``. Rows sent so, as one array a column, are one statement however many
    there are; several ``unnested`` in one SELECT go in step."""
    return func.unnest(bindparam(name, type_=ARRAY(kind)))


def as_arrays(rows: Sequence[Row], **arrays: str) -> dict[str, list[Any]]:
    """``rows`` (one mapping each) as the lists :func:`unnested` takes: each keyword names
    a list and the row key it gathers. The same rows serve an executemany elsewhere."""
    return {name: [row[key] for row in rows] for name, key in arrays.items()}


def where_among(statement: Any, column: ColumnElement[Any], name: str) -> Prepared:
    """``statement`` for the rows whose ``column`` is in the list given as ``name``.

    asyncpg gets the list as one array (``= ANY``): one statement text whatever the
    list's length, prepared once per connection, where each length of ``IN`` list is a
    statement of its own to parse. SQLAlchemy sends an ``IN`` list, which any database reads.
    """
    # an array of varchar(n) would cut longer values to n, and match what IN would not
    kind = String() if type(column.type) is String else column.type
    return Prepared(
        statement.where(column == any_(bindparam(name, type_=ARRAY(kind)))),
        elsewhere=statement.where(column.in_(bindparam(name, expanding=True))),
    )


def _compile(
    statement: Any, compiler: SQLCompiler, keys: frozenset[str], dialect: Any
) -> _Compiled | None:
    """What asyncpg needs to run ``compiler``'s statement, or None if it cannot."""
    if "__[POSTCOMPILE_" in compiler.string:
        return None  # an expanding IN, rendered per call
    names = tuple(compiler.positiontup or ())
    defaults = {}
    for column in compiler.insert_prefetch:
        defaults[column.key] = column.default
    for column in compiler.update_prefetch:
        defaults[column.key] = column.onupdate
    given = []
    for name in names:
        if name in keys:
            continue
        default = defaults.get(name)
        if default is not None and default.is_scalar:
            given.append((name, default.arg))  # type: ignore[attr-defined]
        elif name not in defaults and not compiler.binds[name].required:
            given.append((name, compiler.binds[name].effective_value))  # a value in the SQL
        else:
            return None  # a default computed per row, or a parameter missing: SQLAlchemy's
    processors = tuple(
        compiler.binds[name].type.dialect_impl(dialect).bind_processor(dialect) for name in names
    )
    columns = list(getattr(statement, "exported_columns", ()))
    if len({column.name for column in columns}) < len(columns):
        return None  # asyncpg would name them apart (name, name_1): leave that to SQLAlchemy
    results = []
    for column in columns:
        kind = column.type
        if isinstance(kind, TypeDecorator):
            if not _decoded_alike(kind.impl_instance):
                return None
            process = kind.dialect_impl(dialect).result_processor(dialect, None)
            if process is not None:
                results.append((column.name, process))
        elif not _decoded_alike(kind):
            return None
    return _Compiled(compiler.string, names, dict(given), processors, tuple(results))


# types asyncpg hands back as SQLAlchemy's asyncpg dialect does (no result processing)
_PLAIN = (
    sqltypes.String,
    sqltypes.Integer,
    sqltypes.DateTime,
    sqltypes.Date,
    sqltypes.Boolean,
    sqltypes.LargeBinary,
)


def _decoded_alike(kind: Any) -> bool:
    """Whether asyncpg decodes a column of this type as SQLAlchemy would hand it back."""
    if isinstance(kind, sqltypes.Enum):
        return False  # SQLAlchemy hands back the enum's members, asyncpg strings
    if isinstance(kind, sqltypes.Numeric):
        return bool(kind.asdecimal) and not isinstance(kind, sqltypes.Float)  # Decimal
    return isinstance(kind, _PLAIN)


def _driver_for(session: AsyncConnection) -> asyncpg.Connection | None:
    """The asyncpg connection under ``session``, if a :class:`Prepared` may use it now."""
    if session.dialect.driver != "asyncpg" or session.sync_connection is None:
        return None
    try:
        pooled = session.sync_connection.connection
    except exc.SQLAlchemyError:  # closed or invalidated: SQLAlchemy says what is wrong
        return None
    driver: asyncpg.Connection = pooled.driver_connection
    adapted = pooled.dbapi_connection
    if driver.is_in_transaction() or getattr(adapted, "autocommit", False):
        return driver
    return None  # SQLAlchemy has yet to send BEGIN


# the connection is gone, or asyncpg's side of it is out of step with the server (an idle
# connection whose backend was terminated refuses the next statement so)
_BROKEN = (OSError, asyncpg.PostgresConnectionError, asyncpg.InternalClientError)
_ASYNCPG_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, *_BROKEN)


async def _as_sqlalchemy(
    session: AsyncConnection, driver: asyncpg.Connection, error: Exception, sql: str, args: Any
) -> exc.DBAPIError:
    """asyncpg's ``error`` as SQLAlchemy would have raised it; a connection that is gone is
    invalidated first. Called on failure: a context manager around every statement cost
    about 2.1 us a statement, some 50 us an order."""
    if driver.is_closed() or isinstance(error, _BROKEN):
        await session.invalidate(error)
        return exc.DBAPIError(sql, args, error, connection_invalidated=True)
    if isinstance(error, asyncpg.IntegrityConstraintViolationError):
        return exc.IntegrityError(sql, args, error)
    return exc.DBAPIError(sql, args, error)
