"""The kit's database connections on the real PostgreSQL."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import func, insert, select, text

from bus.db import Database
from tests.integration.tables import effects

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
