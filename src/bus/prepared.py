"""Statements on the saga's path, sent by asyncpg itself on PostgreSQL.

SQLAlchemy spends more CPU on each statement it sends than asyncpg does sending it: an
execution context, a cursor adapter, a greenlet switch and a result object per call,
around every round trip (``benchmarks/statements.py`` measures both). An order takes
some thirty statements through the four services, so the ones on its path are
:class:`Prepared`: compiled by SQLAlchemy once per schema and set of parameters, then
handed to asyncpg with their parameters in order.

Only inside what SQLAlchemy opened: a transaction asyncpg has begun, or an autocommit
connection. The first statement of a transaction goes through SQLAlchemy, which sends the
BEGIN; so do all statements on SQLite. Errors come back as SQLAlchemy's (an
:class:`~sqlalchemy.exc.IntegrityError` for a broken constraint), and a lost connection
is invalidated so the pool does not hand it out again.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
from sqlalchemy import Table, exc
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.base import Executable
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.types import TypeDecorator

Row = Mapping[Any, Any]  # by column name: an asyncpg Record or a SQLAlchemy RowMapping
# asyncpg's errors that mean the connection is gone, not that the statement failed
_LOST = (
    OSError,
    asyncpg.InterfaceError,  # "connection is closed"
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
)


@dataclass(frozen=True, slots=True)
class _Compiled:
    sql: str
    names: tuple[str, ...]  # the parameters, in the order of $1, $2, ...
    defaults: tuple[tuple[str, Any], ...]  # parameters filled from columns' scalar defaults
    processors: tuple[Any, ...]  # each parameter's bind processor, or None
    results: tuple[tuple[str, Any], ...]  # result columns of the application's own types

    def rows(self, records: list[Any]) -> list[Row]:
        if not self.results:
            return records
        return [
            {**record, **{name: process(record[name]) for name, process in self.results}}
            for record in records
        ]

    def args(self, params: Row) -> list[Any]:
        if self.defaults:
            params = {**dict(self.defaults), **params}
        return [
            value if process is None else process(value)
            for value, process in zip(
                (params[name] for name in self.names), self.processors, strict=True
            )
        ]


class Prepared:
    """A statement built once, run by asyncpg where it can be and by SQLAlchemy elsewhere.

    Parameters go through their types' bind processors, as under SQLAlchemy. Results of
    built-in types come as asyncpg decodes them (as they do under SQLAlchemy's asyncpg
    dialect); a :class:`~sqlalchemy.types.TypeDecorator`'s result conversion is applied
    here. A statement with an expanding ``IN`` always goes through SQLAlchemy.
    """

    def __init__(self, statement: Executable) -> None:
        self.statement = statement
        self._compiled: dict[tuple[str | None, frozenset[str], bool], _Compiled | None] = {}

    async def rows(self, session: AsyncConnection, params: Row) -> list[Row]:
        """The rows the statement returns, each a mapping of column name to value."""
        driver = driver_for(session)
        compiled = driver and self._compile(session, params.keys(), many=False)
        if driver is None or compiled is None:
            result = await session.execute(self.statement, dict(params))
            return list(result.mappings().all())
        args = compiled.args(params)
        try:
            records = await driver.fetch(compiled.sql, *args)
        except Exception as error:
            raise await _translated(session, error, compiled.sql, args) from error
        return compiled.rows(records)

    async def run(self, session: AsyncConnection, params: Row) -> int:
        """Run the statement once; how many rows it changed."""
        driver = driver_for(session)
        compiled = driver and self._compile(session, params.keys(), many=False)
        if driver is None or compiled is None:
            result = await session.execute(self.statement, dict(params))
            return int(result.rowcount)
        args = compiled.args(params)
        try:
            status: str = await driver.execute(compiled.sql, *args)
        except Exception as error:
            raise await _translated(session, error, compiled.sql, args) from error
        return int(status.rsplit(" ", 1)[-1])  # "UPDATE 1", "INSERT 0 1"

    async def run_many(self, session: AsyncConnection, params: Sequence[Row]) -> None:
        """Run the statement once for each set of parameters, in one round trip."""
        if not params:
            return
        driver = driver_for(session)
        compiled = driver and self._compile(session, params[0].keys(), many=True)
        if driver is None or compiled is None:
            await session.execute(self.statement, [dict(p) for p in params])
            return
        rows = [compiled.args(p) for p in params]
        try:
            await driver.executemany(compiled.sql, rows)
        except Exception as error:
            raise await _translated(session, error, compiled.sql, rows) from error

    def _compile(self, session: AsyncConnection, keys: Any, *, many: bool) -> _Compiled | None:
        options = session.sync_connection.get_execution_options()  # type: ignore[union-attr]
        schema = (options.get("schema_translate_map") or {}).get(None)
        key = (schema, frozenset(keys), many)
        try:
            return self._compiled[key]
        except KeyError:
            pass
        dialect = session.dialect
        compiler = self.statement.compile(  # type: ignore[attr-defined]
            dialect=dialect,
            column_keys=sorted(key[1]),
            for_executemany=many,
            schema_translate_map={None: schema} if schema else None,
            render_schema_translate=bool(schema),
        )
        self._compiled[key] = compiled = _compile(self.statement, compiler, dialect)
        return compiled


@functools.cache
def insert_or_skip(table: Table) -> Prepared:
    """``INSERT ... ON CONFLICT DO NOTHING`` into ``table``: ``run`` says 0 when a unique
    key clashed (on PostgreSQL, after waiting for an uncommitted clashing row's fate).

    PostgreSQL's INSERT serves SQLite too: both compile its ``ON CONFLICT DO NOTHING``.
    """
    return Prepared(postgresql.insert(table).on_conflict_do_nothing())


def _compile(statement: Any, compiler: SQLCompiler, dialect: Any) -> _Compiled | None:
    """What asyncpg needs to run ``compiler``'s statement, or None if it cannot."""
    prefetched = [*compiler.insert_prefetch, *compiler.update_prefetch]
    defaults = []
    for column in prefetched:
        default = column.default if column in compiler.insert_prefetch else column.onupdate
        if default is None or not default.is_scalar:
            return None  # a default SQLAlchemy computes per row: leave it to SQLAlchemy
        defaults.append((column.key, default.arg))  # type: ignore[attr-defined]
    names = tuple(compiler.positiontup or ())
    if "__[POSTCOMPILE_" in compiler.string:
        return None  # an expanding IN, rendered per call
    processors = tuple(
        compiler.binds[name].type.dialect_impl(dialect).bind_processor(dialect) for name in names
    )
    results = tuple(
        (column.name, column.type.result_processor(dialect, None))
        for column in getattr(statement, "exported_columns", ())
        if isinstance(column.type, TypeDecorator)
    )
    return _Compiled(compiler.string, names, tuple(defaults), processors, results)


def driver_for(session: AsyncConnection) -> asyncpg.Connection | None:
    """The asyncpg connection under ``session``, if it may run a statement now."""
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


async def _translated(session: AsyncConnection, error: Exception, sql: str, args: Any) -> Exception:
    """``error`` as SQLAlchemy would have raised it (a lost connection is invalidated)."""
    if isinstance(error, _LOST):
        await session.invalidate(error)
        return exc.DBAPIError(sql, args, error, connection_invalidated=True)
    if isinstance(error, asyncpg.IntegrityConstraintViolationError):
        return exc.IntegrityError(sql, args, error)
    if isinstance(error, asyncpg.PostgresError):
        return exc.DBAPIError(sql, args, error)
    return error
