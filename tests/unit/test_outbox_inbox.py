"""The outbox and inbox on SQLite with the in-memory broker."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import ClassVar

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, func, insert, select

from bus.broker import Delivery
from bus.db import Database
from bus.envelope import Command, Envelope, Event, MessageRegistry
from bus.inbox import idempotent
from bus.memory import MemoryBroker
from bus.observability import EVENTS_UNHEARD
from bus.outbox import OutboxRelay, Transactions, UnitOfWork, outbox_table
from tests.support import eventually


class ThingMade(Event):
    type: ClassVar[str] = "thing.made"
    name: str


class MakeThing(Command):
    type: ClassVar[str] = "thing.make"
    name: str


REGISTRY = MessageRegistry([ThingMade])
metadata = MetaData()
things = Table(
    "things", metadata, Column("id", Integer, primary_key=True), Column("name", String(50))
)


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(f"sqlite+aiosqlite:///{tmp_path}/test.db", metadata=[metadata])
    await database.create_all()
    yield database
    await database.close()


@pytest.fixture
async def broker() -> AsyncIterator[MemoryBroker]:
    memory = MemoryBroker(retry_delays_ms=(10,))
    await memory.connect()
    yield memory
    await memory.close()


async def count(db: Database, table: Table) -> int:
    async with db.session() as session:
        return int(await session.scalar(select(func.count()).select_from(table)) or 0)


async def test_messages_are_written_only_when_the_transaction_commits(db: Database) -> None:
    transactions = Transactions(db, "/tests")
    async with transactions.begin() as unit:
        await unit.session.execute(insert(things).values(name="kept"))
        unit.publish(ThingMade(name="kept"))

    async def write_then_fail() -> None:
        async with transactions.begin() as unit:
            await unit.session.execute(insert(things).values(name="lost"))
            unit.publish(ThingMade(name="lost"))
            raise RuntimeError("handler failed")

    with pytest.raises(RuntimeError):
        await write_then_fail()

    assert await count(db, things) == 1
    async with db.session() as session:
        bodies = (await session.scalars(select(outbox_table.c.body))).all()
    assert [Envelope.from_json(body).data for body in bodies] == [{"name": "kept"}]


async def test_commit_wakes_the_relay(db: Database) -> None:
    woken: list[bool] = []
    transactions = Transactions(db, "/tests", on_commit=lambda: woken.append(True))
    async with transactions.begin():
        pass  # nothing published: no wake-up
    async with transactions.begin() as unit:
        unit.publish(ThingMade(name="x"))
    assert woken == [True]


async def test_relay_publishes_pending_rows_once_and_marks_them(
    db: Database, broker: MemoryBroker
) -> None:
    seen: list[str] = []

    async def record(delivery: Delivery) -> None:
        seen.append(delivery.envelope.id)

    await broker.consume("things", ["thing.*"], record, REGISTRY)
    transactions = Transactions(db, "/tests")
    async with transactions.begin() as unit:
        sent = [unit.publish(ThingMade(name=str(n))).id for n in range(5)]
    relay = OutboxRelay(db, broker, service="tests", batch_size=2)

    assert await relay.flush() == 5
    assert await relay.flush() == 0
    await eventually(lambda: sorted(seen) == sorted(sent))
    assert await relay.backlog() == 0


async def test_with_a_linger_commits_close_together_share_one_batch(
    db: Database, broker: MemoryBroker
) -> None:
    await broker.declare("things", ["thing.*"])
    batches: list[int] = []
    publish_many = broker.publish_many

    async def counted(envelopes: Sequence[Envelope]) -> list[BaseException | None]:
        batches.append(len(envelopes))
        return await publish_many(envelopes)

    broker.publish_many = counted  # type: ignore[method-assign]
    relay = OutboxRelay(db, broker, service="tests", poll_seconds=5, linger=1.0)
    transactions = Transactions(db, "/tests", on_commit=relay.wake)
    relay.start()
    await asyncio.sleep(0.2)  # its first pass finds nothing; now it waits to be woken
    try:
        for n in range(3):  # three transactions within the linger
            async with transactions.begin() as unit:
                unit.publish(ThingMade(name=str(n)))
        await eventually(lambda: sum(batches) == 3, within=5)
    finally:
        await relay.stop()

    assert batches == [3]


async def test_event_nobody_subscribes_to_is_done_and_counted(
    db: Database, broker: MemoryBroker
) -> None:
    unheard = EVENTS_UNHEARD.labels("tests", ThingMade.type)
    before = unheard._value.get()
    async with Transactions(db, "/tests").begin() as unit:
        unit.publish(ThingMade(name="nobody listens"))
    relay = OutboxRelay(db, broker, service="tests")

    assert await relay.publish_pending() == 0
    assert await relay.backlog() == 0
    assert unheard._value.get() == before + 1


async def test_unroutable_command_is_retried_later_then_given_up(
    db: Database, broker: MemoryBroker
) -> None:
    transactions = Transactions(db, "/tests")
    async with transactions.begin() as unit:
        unit.publish(MakeThing(name="no owner"))
    relay = OutboxRelay(db, broker, service="tests", max_attempts=2)

    assert await relay.publish_pending() == 0
    assert await relay.publish_pending() == 0  # postponed: not due yet
    async with db.session() as session, session.begin():
        await session.execute(outbox_table.update().values(next_attempt_at=None))
    assert await relay.publish_pending() == 0

    async with db.session() as session:
        row = (await session.execute(select(outbox_table))).one()
    assert row.attempts == 2
    assert row.failed_at is not None
    assert "no queue is bound" in row.last_error
    assert await relay.backlog() == 0


async def test_idempotent_handler_takes_effect_once_per_message(
    db: Database, broker: MemoryBroker
) -> None:
    transactions = Transactions(db, "/tests")
    calls: list[int] = []

    async def make_thing(delivery: Delivery, unit: UnitOfWork) -> None:
        calls.append(delivery.attempt)
        name = delivery.message.name  # type: ignore[attr-defined]
        await unit.session.execute(insert(things).values(name=name))

    handler = idempotent(transactions, "things", make_thing)
    envelope = Envelope.wrap(ThingMade(name="once"), source="/tests")
    delivery = Delivery(envelope, ThingMade(name="once"), "things", 1)

    await handler(delivery)
    await handler(delivery)
    await handler(Delivery(envelope, ThingMade(name="once"), "other-queue", 2))

    assert calls == [1]
    assert await count(db, things) == 1


async def test_failed_handler_leaves_no_inbox_mark_so_the_retry_runs(db: Database) -> None:
    transactions = Transactions(db, "/tests")
    calls: list[int] = []

    async def flaky(delivery: Delivery, unit: UnitOfWork) -> None:
        calls.append(delivery.attempt)
        await unit.session.execute(insert(things).values(name="flaky"))
        if delivery.attempt == 1:
            raise ConnectionError("downstream unavailable")

    handler = idempotent(transactions, "things", flaky)
    envelope = Envelope.wrap(ThingMade(name="flaky"), source="/tests")
    with pytest.raises(ConnectionError):
        await handler(Delivery(envelope, ThingMade(name="flaky"), "things", 1))
    await handler(Delivery(envelope, ThingMade(name="flaky"), "things", 2))

    assert calls == [1, 2]
    assert await count(db, things) == 1
