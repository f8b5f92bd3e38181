"""Reliability on the real RabbitMQ and PostgreSQL: nothing lost, nothing done twice."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import ClassVar

import pytest
from sqlalchemy import func, insert, select

import bus.amqp
from bus.amqp import AmqpBroker
from bus.broker import BrokerUnavailable, Delivery
from bus.db import Database
from bus.envelope import Envelope, Event, MessageRegistry
from bus.inbox import DUPLICATES, idempotent
from bus.outbox import OutboxRelay
from bus.transactions import Transactions, UnitOfWork
from tests.conftest import RabbitAdmin
from tests.integration.tables import effects
from tests.support import eventually

pytestmark = pytest.mark.integration


class ThingMade(Event):
    type: ClassVar[str] = "reliability.thing.made"
    name: str


REGISTRY = MessageRegistry([ThingMade])


async def effect_count(db: Database) -> int:
    async with db.session() as session:
        return int(await session.scalar(select(func.count()).select_from(effects)) or 0)


def recording_handler(db: Database, consumer: str, calls: list[str]):  # type: ignore[no-untyped-def]
    async def make_thing(delivery: Delivery, unit: UnitOfWork) -> None:
        calls.append(delivery.envelope.id)
        name = delivery.message.name  # type: ignore[attr-defined]
        await unit.session.execute(insert(effects).values(name=name))

    return idempotent(Transactions(db, "/tests"), consumer, make_thing)


class DiesAfterPublishing:
    """A broker proxy: publishes for real, then the process "dies" before the relay commits."""

    def __init__(self, broker: AmqpBroker) -> None:
        self.broker = broker

    async def publish_many(self, envelopes: Sequence[Envelope]) -> list[BaseException | None]:
        await self.broker.publish_many(envelopes)
        raise SystemExit("killed between the broker's confirm and the outbox update")


async def test_relay_killed_after_publish_republishes_and_consumers_apply_once(
    amqp: AmqpBroker, postgres: Database, unique: str
) -> None:
    calls: list[str] = []
    await amqp.consume(
        unique, [ThingMade.type], recording_handler(postgres, unique, calls), REGISTRY
    )
    async with Transactions(postgres, "/tests").begin() as unit:
        for n in range(20):
            unit.publish(ThingMade(name=f"thing-{n}"))

    dying = OutboxRelay(postgres, DiesAfterPublishing(amqp), service="tests")  # type: ignore[arg-type]
    with pytest.raises(SystemExit):
        await dying.publish_pending()
    assert await dying.backlog() == 20  # nothing was marked published

    restarted = OutboxRelay(postgres, amqp, service="tests")
    assert await restarted.flush() == 20

    await eventually(lambda: len(calls) == 20)
    await eventually(lambda: DUPLICATES.labels(unique)._value.get() == 20)
    assert await effect_count(postgres) == 20
    assert await restarted.backlog() == 0


async def test_consumer_dying_after_commit_before_ack_gets_redelivery_and_skips_it(
    amqp: AmqpBroker, postgres: Database, rabbit: RabbitAdmin, unique: str
) -> None:
    calls: list[str] = []
    handle = recording_handler(postgres, unique, calls)

    async def commit_then_lose_connection(delivery: Delivery) -> None:
        await handle(delivery)  # effects and inbox mark are committed here
        if len(calls) == 1:
            await asyncio.to_thread(rabbit.close_all_connections)  # ...and the ack is lost

    await amqp.consume(unique, [ThingMade.type], commit_then_lose_connection, REGISTRY)
    await amqp.publish(Envelope.wrap(ThingMade(name="only-once"), source="/tests"))

    await eventually(lambda: DUPLICATES.labels(unique)._value.get() == 1, within=30)
    assert await effect_count(postgres) == 1


async def test_consumer_and_publisher_resume_after_connections_are_closed(
    amqp: AmqpBroker, rabbit: RabbitAdmin, unique: str
) -> None:
    seen: list[str] = []

    async def record(delivery: Delivery) -> None:
        seen.append(delivery.message.name)  # type: ignore[attr-defined]

    await amqp.consume(unique, [ThingMade.type], record, REGISTRY)
    await amqp.publish(Envelope.wrap(ThingMade(name="before"), source="/tests"))
    await eventually(lambda: seen == ["before"])

    await asyncio.to_thread(rabbit.close_all_connections)

    async def published_after() -> bool:
        try:
            await amqp.publish(Envelope.wrap(ThingMade(name="after"), source="/tests"))
        except BrokerUnavailable:
            return False
        return True

    await eventually(published_after, within=30, every=0.5)
    await eventually(lambda: "after" in seen, within=30)
    assert seen.count("before") == 1


async def test_two_relays_on_postgres_publish_each_row_once(
    amqp: AmqpBroker, postgres: Database, unique: str
) -> None:
    seen: list[str] = []

    async def record(delivery: Delivery) -> None:
        seen.append(delivery.envelope.id)

    await amqp.consume(unique, [ThingMade.type], record, REGISTRY)
    async with Transactions(postgres, "/tests").begin() as unit:
        for n in range(300):
            unit.publish(ThingMade(name=f"row-{n}"))

    first = OutboxRelay(postgres, amqp, service="tests", batch_size=25)
    second = OutboxRelay(postgres, amqp, service="tests", batch_size=25)
    counts = await asyncio.gather(first.flush(), second.flush())

    assert sum(counts) == 300
    assert min(counts) > 0  # both took a share
    await eventually(lambda: len(seen) == 300)
    await asyncio.sleep(0.2)
    assert len(set(seen)) == len(seen) == 300


async def test_a_slow_handler_holds_back_no_other_ack(amqp: AmqpBroker, unique: str) -> None:
    # acks go out together where the tags allow; the ones above a message still being
    # handled must still go out, one by one, or a slow message would stall the rest
    release, done = asyncio.Event(), list[str]()

    async def handle(delivery: Delivery) -> None:
        name = delivery.message.name  # type: ignore[attr-defined]
        if name == "slow":
            await release.wait()
        done.append(name)

    consumer = await amqp.consume(unique, [ThingMade.type], handle, REGISTRY)
    for name in ("slow", "a", "b", "c", "d"):
        await amqp.publish(Envelope.wrap(ThingMade(name=name), source="/tests"))
    await eventually(lambda: sorted(done) == ["a", "b", "c", "d"])

    await consumer.stop(grace=0.2)  # the slow one is cut off, unacked

    async def back_in_queue() -> int:
        channel = await amqp.connection.channel()
        queue = await channel.declare_queue(unique, passive=True)
        await channel.close()
        return int(queue.declaration_result.message_count or 0)

    async def returned() -> bool:
        return await back_in_queue() > 0

    # the broker returns a closed channel's unacked messages in its own time
    await eventually(returned, within=10)
    await asyncio.sleep(0.5)  # anything else returned would have come back by now
    assert await back_in_queue() == 1, "only the unfinished message is back"


async def test_handlers_grouped_in_transactions_that_deadlock_on_postgres_each_commit_once(
    postgres: Database,
) -> None:
    # two groups side by side lock the same two rows in opposite orders: PostgreSQL breaks
    # the deadlock by failing one group, whose units then run alone and commit
    async with postgres.session() as session, session.begin():
        await session.execute(insert(effects), [{"name": "A"}, {"name": "B"}])
    calls: list[str] = []

    async def lock_both(delivery: Delivery, unit: UnitOfWork) -> None:
        order = delivery.message.name  # type: ignore[attr-defined]
        calls.append(order)
        for n, name in enumerate(order):
            lock = select(effects.c.name).where(effects.c.name == name).with_for_update()
            await unit.session.execute(lock)
            if n == 0:
                await asyncio.sleep(0.3)  # the other group takes its first row meanwhile
        await unit.session.execute(insert(effects).values(name=f"done {order}"))

    # two to a group: "AB" and "-" fill the first, "BA" starts the second
    handle = idempotent(Transactions(postgres, "/tests", group_size=2), "deadlock", lock_both)
    messages = [ThingMade(name=order) for order in ("AB", "-", "BA")]
    deliveries = [Delivery(Envelope.wrap(m, source="/tests"), m, "q", 1) for m in messages]

    await asyncio.wait_for(asyncio.gather(*(handle(d) for d in deliveries)), 20)

    async with postgres.session() as session:
        names = sorted((await session.scalars(select(effects.c.name))).all())
    assert names == ["A", "B", "done -", "done AB", "done BA"]
    assert len(calls) > 3  # the group PostgreSQL failed ran its units again, alone


async def test_an_observer_that_falls_behind_keeps_the_newest_messages(
    rabbit: RabbitAdmin, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bus.amqp, "OBSERVER_BACKLOG", 3)
    release, seen = asyncio.Event(), list[str]()

    async def stuck_then_reading(delivery: Delivery) -> None:
        await release.wait()  # a tail piped into a pager nobody scrolls
        seen.append(delivery.message.name)  # type: ignore[attr-defined]

    observer = AmqpBroker(rabbit.url, name=unique, prefetch=1)
    await observer.connect()
    try:
        await observer.subscribe([ThingMade.type], stuck_then_reading, REGISTRY)
        for n in range(10):
            await observer.publish(Envelope.wrap(ThingMade(name=str(n)), source="/tests"))
        release.set()
        await eventually(lambda: len(seen) == 4)
        await asyncio.sleep(0.3)
    finally:
        await observer.close()
    assert seen == ["0", "7", "8", "9"]  # the one in hand, then the newest three
