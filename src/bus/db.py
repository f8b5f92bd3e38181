"""The database: SQLAlchemy 2 async, SQLite by default, PostgreSQL in production.

Each service keeps its tables in a schema of its own on PostgreSQL (so services can share
one database) and in a file of its own on SQLite. Tables are declared without a schema;
``schema_translate_map`` places them at run time.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

from sqlalchemy import MetaData, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import StaticPool

from bus.settings import Settings

BUS_METADATA = MetaData()
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


# Brings a table an earlier version created up to date (create_all makes only missing
# tables): given the connection creating the tables and the PostgreSQL schema (None on
# SQLite), it must change nothing when there is nothing to change.
Upgrade = Callable[[AsyncConnection, str | None], Awaitable[None]]


class Database:
    """One service's database: an engine, a session factory, and its tables."""

    def __init__(
        self,
        url: str,
        *,
        schema: str | None = None,
        metadata: Iterable[MetaData] = (),
        pool_size: int = 10,
        pool_timeout: float = 5.0,
        upgrades: Iterable[Upgrade] = (),
    ) -> None:
        parsed = make_url(url)
        self.url = url
        self.dialect = parsed.get_backend_name()
        self.metadata = (BUS_METADATA, *metadata)
        self.upgrades = tuple(upgrades)
        self.schema = schema if self.dialect == "postgresql" else None
        if self.schema is not None and not _SCHEMA_NAME.match(self.schema):
            raise ValueError(f"invalid schema name {self.schema!r}")
        self.engine = self._create_engine(parsed.database or "", pool_size, pool_timeout)
        self._reads = (
            self.engine.execution_options(isolation_level="AUTOCOMMIT")
            if self.is_postgres
            else self.engine
        )

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        metadata: Iterable[MetaData] = (),
        upgrades: Iterable[Upgrade] = (),
    ) -> Database:
        """The service's database as its settings say: URL, schema and connection pool."""
        return cls(
            settings.db_url,
            schema=settings.schema_name,
            metadata=metadata,
            pool_size=settings.db_pool_size,
            pool_timeout=settings.db_pool_timeout_seconds,
            upgrades=upgrades,
        )

    def _create_engine(self, database: str, pool_size: int, pool_timeout: float) -> AsyncEngine:
        if self.dialect == "sqlite":
            in_memory = database in ("", ":memory:")
            if not in_memory:
                Path(database).parent.mkdir(parents=True, exist_ok=True)
            engine = create_async_engine(
                self.url,
                connect_args={"timeout": 30},
                poolclass=StaticPool if in_memory else None,
            )
            _serialise_sqlite_writers(engine)
            return engine
        options: dict[str, Any] = {}
        if self.schema is not None:
            options["schema_translate_map"] = {None: self.schema}
        # No pre-ping: it costs two round trips per transaction. After a database restart
        # the first statement on a stale connection fails, SQLAlchemy discards the pool,
        # and that one message is retried (or that one request answered 503) like any
        # other failure; connections are also recycled before a server could drop them.
        # A fixed pool: work beyond ``pool_size`` waits for a connection. Overflow
        # connections are closed as soon as they are handed back, so under load every
        # burst forked a PostgreSQL backend and set up a connection only to drop it
        # (about 30 a second at full speed, a sixth of the saga's throughput).
        return create_async_engine(
            self.url,
            pool_size=pool_size,
            max_overflow=0,
            # past this wait for a connection: sqlalchemy.exc.TimeoutError, a 503 over HTTP
            # and a retry for a message, rather than a queue longer than any caller waits
            pool_timeout=pool_timeout,
            pool_recycle=1800,
            # pg_stat_activity names the service each connection belongs to
            connect_args={"server_settings": {"application_name": self.schema or "microshop"}},
            execution_options=options,
        )

    @property
    def is_postgres(self) -> bool:
        """True on PostgreSQL (row locks with SKIP LOCKED are available)."""
        return self.dialect == "postgresql"

    def reading(self) -> AsyncConnection:
        """A connection for reads that need no snapshot of their own: on PostgreSQL each
        statement sees what is committed when it runs, and no BEGIN or ROLLBACK is sent
        (two round trips saved). Reads that must agree with each other use :meth:`session`.
        """
        return self._reads.connect()

    @contextlib.asynccontextmanager
    async def one_statement_each(self) -> AsyncIterator[AsyncConnection]:
        """A connection for writes that each stand alone: on PostgreSQL each statement
        commits as it runs (no BEGIN, no COMMIT); on SQLite they share one transaction."""
        if self.is_postgres:
            async with self._reads.connect() as session:
                yield session
        else:
            async with self.session() as session, session.begin():
                yield session

    def session(self) -> AsyncConnection:
        """A connection from the pool; use ``async with db.session() as s, s.begin(): ...``.

        A Core connection, not an ORM session: the services write SQL expressions, and
        the ORM's unit-of-work machinery cost a tenth of every transaction's CPU.
        """
        return self.engine.connect()

    async def create_all(self) -> None:
        """Create the schema (on PostgreSQL) and every table that does not exist yet, then
        run the ``upgrades`` that bring tables an earlier version made up to date."""
        async with self.engine.begin() as connection:
            if self.schema is not None:
                # instances starting together would race on the catalogue: take turns
                await advisory_xact_lock(connection, self.schema)
                await connection.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"'))
            for metadata in self.metadata:
                await connection.run_sync(metadata.create_all)
            for upgrade in self.upgrades:
                await upgrade(connection, self.schema)

    async def drop_schema(self) -> None:
        """Drop this service's schema and everything in it (tests use it to clean up)."""
        async with self.engine.begin() as connection:
            if self.schema is not None:
                await connection.execute(text(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE'))
            else:
                for metadata in self.metadata:
                    await connection.run_sync(metadata.drop_all)

    async def ping(self) -> bool:
        """True when a trivial query succeeds (readiness)."""
        async with self.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
        return True

    async def close(self) -> None:
        """Close every pooled connection."""
        await self.engine.dispose()


async def advisory_xact_lock(session: AsyncConnection, key: str) -> None:
    """Make other transactions that take the same ``key`` wait until this one ends.

    A transaction-scoped advisory lock on PostgreSQL; nothing on SQLite, whose writers
    already take turns (every transaction begins IMMEDIATE).
    """
    if dialect_of(session) == "postgresql":
        await session.execute(_ADVISORY_LOCK, {"key": key})


_ADVISORY_LOCK = text("SELECT pg_advisory_xact_lock(hashtext(:key))")


def dialect_of(session: AsyncConnection) -> str:
    """``"postgresql"`` or ``"sqlite"``: the database this connection talks to."""
    return session.dialect.name


def _serialise_sqlite_writers(engine: AsyncEngine) -> None:
    # SQLite's deferred BEGIN lets two transactions read, then deadlock when both try to
    # write; BEGIN IMMEDIATE takes the write lock up front, so writers queue instead.
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")
