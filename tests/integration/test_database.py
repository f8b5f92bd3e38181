"""The kit's database connections on the real PostgreSQL."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import bindparam, event, func, insert, literal_column, select, text
from sqlalchemy.exc import DBAPIError, IntegrityError

from bus.db import Database
from bus.envelope import Envelope
from bus.inbox import claims_of
from bus.outbox import outbox_table, write_outbox
from bus.prepared import Prepared, where_among
from inventory_svc.messages import StockReleased
from tests.integration.tables import effects, prices

pytestmark = pytest.mark.integration


async def test_reads_outside_a_transaction_see_what_is_committed_as_it_is_committed(
    postgres: Database,
) -> None:
    async with postgres.reading() as reader:
        assert await reader.scalar(text("SELECT txid_current_if_assigned()")) is None
        before = await reader.scalar(select(func.count()).select_from(effects))
        async with postgres.session() as writer, writer.begin():
            await writer.execute(insert(effects).values(name="committed"))
        # no snapshot of its own: the next statement sees the commit
        after = await reader.scalar(select(func.count()).select_from(effects))
    assert (before, after) == (0, 1)


async def test_a_transaction_after_a_read_still_rolls_back(postgres: Database) -> None:
    for _ in range(3):  # the pool hands back the connections the reads used
        async with postgres.reading() as reader:
            await reader.execute(select(effects))

    async def write_then_fail() -> None:
        async with postgres.session() as writer, writer.begin():
            await writer.execute(insert(effects).values(name="undone"))
            raise RuntimeError("the handler failed")

    with pytest.raises(RuntimeError):
        await write_then_fail()

    async with postgres.reading() as reader:
        assert await reader.scalar(select(func.count()).select_from(effects)) == 0


async def test_a_burst_wider_than_the_pool_waits_for_its_connections(
    database_url: str, unique: str
) -> None:
    db = Database(database_url, schema=unique, pool_size=3)
    try:

        async def backend() -> int:
            async with db.session() as connection:
                pid = await connection.scalar(text("SELECT pg_backend_pid()"))
                await asyncio.sleep(0.01)
                return int(pid)

        first = await asyncio.gather(*(backend() for _ in range(30)))
        second = await asyncio.gather(*(backend() for _ in range(30)))
    finally:
        await db.close()
    # the same three connections served both bursts: none opened and dropped on the way
    assert len(set(first)) == 3
    assert set(second) == set(first)


_ADD = Prepared(insert(effects))
_NAMES = Prepared(select(effects.c.name).order_by(effects.c.name))


@pytest.fixture
def through_sqlalchemy(postgres: Database) -> list[str]:
    """Statements SQLAlchemy sends on ``postgres``; what asyncpg sends alone is not here."""
    sent: list[str] = []
    event.listen(postgres.engine.sync_engine, "before_cursor_execute", lambda *a: sent.append(a[2]))
    return sent


async def _backend(db: Database) -> int:
    """The PostgreSQL backend of the connection the pool hands out next."""
    async with db.session() as session:
        return int(await session.scalar(text("SELECT pg_backend_pid()")))


async def _names(db: Database) -> list[str]:
    async with db.reading() as reader:
        return list((await reader.scalars(select(effects.c.name).order_by(effects.c.name))).all())


async def test_prepared_statements_run_inside_the_transaction_sqlalchemy_began(
    postgres: Database, through_sqlalchemy: list[str]
) -> None:
    async def write_then_fail() -> None:
        async with postgres.session() as session, session.begin():
            await _ADD.run(session, {"name": "a"})  # SQLAlchemy sends BEGIN with it
            await _ADD.run(session, {"name": "b"})
            await _ADD.run(session, {"name": "c"})
            assert [row["name"] for row in await _NAMES.rows(session, {})] == ["a", "b", "c"]
            raise RuntimeError("the handler failed")

    with pytest.raises(RuntimeError):
        await write_then_fail()
    assert len(through_sqlalchemy) == 1  # the first INSERT: asyncpg sent the rest
    assert await _names(postgres) == []

    async with postgres.session() as session, session.begin():
        await _ADD.run(session, {"name": "a"})
        assert await _ADD.run(session, {"name": "b"}) == 1
    assert await _names(postgres) == ["a", "b"]


async def test_prepared_statements_fill_in_column_defaults(
    postgres: Database, through_sqlalchemy: list[str]
) -> None:
    sent = Envelope.wrap(StockReleased(order_id="o-1", items=[]), source="test")
    async with postgres.session() as session, session.begin():
        await _ADD.run(session, {"name": "first"})
        await write_outbox(session, [(sent, "event")])
    assert len(through_sqlalchemy) == 1  # asyncpg wrote the outbox row
    async with postgres.reading() as reader:
        row = (await reader.execute(select(outbox_table))).one()
    assert (row.message_id, row.attempts, row.published_at) == (sent.id, 0, None)


async def _add_a_then(db: Database, second: dict[str, Any]) -> None:
    """Add "a" (SQLAlchemy sends it, after BEGIN), then ``second`` (asyncpg sends it)."""
    async with db.session() as session, session.begin():
        await _ADD.run(session, {"name": "a"})
        await _ADD.run(session, second)


async def test_a_prepared_statement_breaking_a_constraint_raises_sqlalchemys_error(
    postgres: Database, through_sqlalchemy: list[str]
) -> None:
    with pytest.raises(IntegrityError):
        await _add_a_then(postgres, {"name": "a"})
    assert len(through_sqlalchemy) == 1  # asyncpg sent the second
    assert await _names(postgres) == []


@pytest.mark.parametrize("in_transaction", [True, False])
async def test_a_connection_lost_under_a_prepared_statement_is_not_pooled_again(
    postgres: Database, through_sqlalchemy: list[str], in_transaction: bool
) -> None:
    # on an autocommit connection no ROLLBACK would find it dead: only the invalidation does
    lost: list[int] = []

    async def add_after_the_connection_is_gone() -> None:
        opened = postgres.session() if in_transaction else postgres.reading()
        async with opened as session:
            if in_transaction:
                await session.begin()
            await _ADD.run(session, {"name": "a"})
            lost.append(await session.scalar(text("SELECT pg_backend_pid()")))
            async with postgres.reading() as other:
                await other.execute(text(f"SELECT pg_terminate_backend({lost[0]})"))
            await _ADD.run(session, {"name": "b"})

    with pytest.raises(DBAPIError) as raised:
        await add_after_the_connection_is_gone()
    assert raised.value.connection_invalidated
    assert all('"b"' not in statement for statement in through_sqlalchemy)
    assert sum("INSERT" in statement for statement in through_sqlalchemy) <= 1  # "b": asyncpg
    pooled = {await _backend(postgres) for _ in range(3)}  # in turn, oldest first
    assert lost[0] not in pooled
    async with postgres.session() as session, session.begin():  # a working connection
        await _ADD.run(session, {"name": "c"})
    assert "c" in await _names(postgres)


async def test_prepared_statements_keep_values_written_into_them_and_convert_own_types(
    postgres: Database, through_sqlalchemy: list[str]
) -> None:
    others = Prepared(select(effects.c.name).where(effects.c.name != "skipped"))
    price_of = Prepared(select(prices.c.price).where(prices.c.name == bindparam("name")))
    async with postgres.session() as session, session.begin():
        await _ADD.run(session, {"name": "kept"})
        await _ADD.run(session, {"name": "skipped"})
        await Prepared(insert(prices)).run(session, {"name": "mouse", "price": Decimal("29.99")})
        assert [row["name"] for row in await others.rows(session, {})] == ["kept"]
        assert (await price_of.rows(session, {"name": "mouse"}))[0]["price"] == Decimal("29.99")
    assert len(through_sqlalchemy) == 1  # the first: asyncpg sent the rest
    async with postgres.reading() as reader:
        stored = await reader.scalar(select(literal_column("price")).select_from(prices))
    assert stored == 2999  # the bind conversion ran too


async def test_prepared_statements_on_a_reading_connection_commit_as_they_run(
    postgres: Database, through_sqlalchemy: list[str]
) -> None:
    async with postgres.reading() as reader:
        await _ADD.run(reader, {"name": "at once"})
        assert through_sqlalchemy == []  # autocommit: no BEGIN to wait for
        assert await _names(postgres) == ["at once"]


async def test_a_parameter_asyncpg_cannot_send_fails_without_dropping_the_connection(
    postgres: Database, through_sqlalchemy: list[str]
) -> None:
    before = await _backend(postgres)
    with pytest.raises(DBAPIError) as raised:
        await _add_a_then(postgres, {"name": 42})
    assert not raised.value.connection_invalidated
    assert await _backend(postgres) == before  # the connection stays in the pool
    assert sum("INSERT" in statement for statement in through_sqlalchemy) == 1  # not "42"


async def test_a_list_of_any_length_is_one_statement_for_asyncpg(
    postgres: Database, through_sqlalchemy: list[str]
) -> None:
    among = where_among(select(effects.c.name), effects.c.name, "names")
    async with postgres.reading() as reader:
        stored = [*"abcd", "n" * 100]  # the longest name the column holds
        for name in stored:
            await _ADD.run(reader, {"name": name})
        # a name longer than the column matches nothing, as with IN (cast to the column's
        # varchar(100), it would have been cut to one that is there)
        for names in (["a"], ["b", "c", "x"], [], ["n" * 101]):
            found = sorted(row["name"] for row in await among.rows(reader, {"names": names}))
            assert found == sorted(set(names) & set(stored))
        assert through_sqlalchemy == []
        prepared = await reader.scalars(text("SELECT statement FROM pg_prepared_statements"))
        ours = [sql for sql in prepared if "effects.name = ANY" in sql]
        assert len(ours) == 1  # parsed once for the three lengths


async def test_many_message_ids_are_claimed_in_one_statement(
    postgres: Database, through_sqlalchemy: list[str]
) -> None:
    claim_all = claims_of("things")
    async with postgres.session() as session, session.begin():
        assert await claim_all(session, ["m1", "m2", "m1"]) == {"m1", "m2"}
        assert await claim_all(session, ["m2", "m3"]) == {"m3"}
    assert len(through_sqlalchemy) == 1  # with BEGIN; asyncpg sent the second
    async with postgres.session() as session, session.begin():
        assert await claim_all(session, ["m1", "m4"]) == {"m4"}
        assert await claims_of("others")(session, ["m1"]) == {"m1"}  # another consumer's
