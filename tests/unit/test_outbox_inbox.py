"""The outbox and inbox on SQLite with the in-memory broker."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, event, func, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection

from bus.broker import Delivery
from bus.db import Database
from bus.envelope import Command, Envelope, Event, MessageRegistry
from bus.inbox import DUPLICATES, claims_of, idempotent, inbox_table
from bus.memory import MemoryBroker
from bus.observability import EVENTS_UNHEARD, UNITS_PER_TRANSACTION
from bus.outbox import Committed, OutboxRelay, outbox_table
from bus.transactions import Once, Transactions, UnitOfWork
from tests.support import eventually


class ThingMade(Event):
    type: ClassVar[str] = "thing.made"
    name: str


class MakeThing(Command):
    type: ClassVar[str] = "thing.make"
    name: str


class ThingNoted(Event):
    type: ClassVar[str] = "thing.noted"
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


@pytest.fixture
async def seen(broker: MemoryBroker) -> list[str]:
    """The ids of the messages a consumer of ``thing.*`` is handed."""
    ids: list[str] = []

    async def record(delivery: Delivery) -> None:
        ids.append(delivery.envelope.id)

    await broker.consume("things", ["thing.*"], record, REGISTRY)
    return ids


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


async def make(transactions: Transactions, name: str) -> str:
    """Commit a transaction that makes one thing; the id of its message."""
    async with transactions.begin() as unit:
        return unit.publish(ThingMade(name=name)).id


async def drained(relay: OutboxRelay) -> bool:
    return await relay.backlog() == 0


async def test_commit_hands_the_relay_what_it_wrote(db: Database) -> None:
    handed: list[list[tuple[str, str]]] = []
    transactions = Transactions(
        db, "/tests", on_commit=lambda rows: handed.append([(e.type, k) for e, k in rows])
    )
    async with transactions.begin():
        pass  # nothing published: nothing to hand over
    async with transactions.begin() as unit:
        unit.publish(ThingMade(name="x"))
        unit.publish(MakeThing(name="y"))
    assert handed == [[("thing.made", "event"), ("thing.make", "command")]]


async def test_relay_publishes_what_commits_at_once_and_marks_it(
    db: Database, broker: MemoryBroker, seen: list[str]
) -> None:
    # the poll is a minute away and would leave rows this young alone anyway
    relay = OutboxRelay(db, broker, service="tests", poll_seconds=60, fresh_seconds=60)
    transactions = Transactions(db, "/tests", on_commit=relay.committed)
    relay.start()
    try:
        async with transactions.begin() as unit:
            sent = [unit.publish(ThingMade(name=str(n))).id for n in range(3)]
        await eventually(lambda: sorted(seen) == sorted(sent), within=5)
        await eventually(lambda: drained(relay))
    finally:
        await relay.stop()


async def test_the_next_batch_goes_out_while_the_last_is_being_marked(
    db: Database, broker: MemoryBroker, seen: list[str]
) -> None:
    relay = OutboxRelay(db, broker, service="tests", poll_seconds=60, fresh_seconds=60)
    mark, marking, release = relay._mark, asyncio.Event(), asyncio.Event()

    async def slow_mark(sent: Any) -> None:
        marking.set()
        await release.wait()  # the first mark waits on a slow disk flush
        await mark(sent)

    relay._mark = slow_mark  # type: ignore[method-assign]
    transactions = Transactions(db, "/tests", on_commit=relay.committed)
    relay.start()
    try:
        first = await make(transactions, "first")
        await asyncio.wait_for(marking.wait(), 5)
        second = await make(transactions, "second")
        await eventually(lambda: second in seen, within=5)  # not held back by the mark
        release.set()
        await eventually(lambda: drained(relay))
    finally:
        release.set()
        await relay.stop()
    assert seen == [first, second]


async def test_a_mark_that_fails_leaves_its_rows_to_the_poll_and_the_relay_goes_on(
    db: Database, broker: MemoryBroker, seen: list[str]
) -> None:
    relay = OutboxRelay(db, broker, service="tests", poll_seconds=0.05, fresh_seconds=0.3)
    mark, failures = relay._mark, [OSError("the database went away")]

    async def failing_once(sent: Any) -> None:
        if failures:
            raise failures.pop()
        await mark(sent)

    relay._mark = failing_once  # type: ignore[method-assign]
    transactions = Transactions(db, "/tests", on_commit=relay.committed)
    relay.start()
    await asyncio.sleep(0.1)  # past its first poll
    try:
        first = await make(transactions, "first")
        await eventually(lambda: first in seen, within=5)
        second = await make(transactions, "second")
        await eventually(lambda: drained(relay), within=5)
    finally:
        await relay.stop()
    # the unmarked one again, from the poll (whichever goes first)
    assert collections.Counter(seen) == {first: 2, second: 1}


async def test_a_cancelled_error_from_the_broker_does_not_end_the_relay(
    db: Database, broker: MemoryBroker, seen: list[str]
) -> None:
    relay = OutboxRelay(db, broker, service="tests", poll_seconds=0.05, fresh_seconds=0.3)
    publish_many, failures = broker.publish_many, [asyncio.CancelledError()]

    async def failing_once(envelopes: Sequence[Envelope]) -> list[BaseException | None]:
        if failures:  # as aiormq fails confirms on a connection it gave up on
            raise failures.pop()
        return await publish_many(envelopes)

    broker.publish_many = failing_once  # type: ignore[method-assign]
    transactions = Transactions(db, "/tests", on_commit=relay.committed)
    relay.start()
    try:
        made = await make(transactions, "made")
        await eventually(lambda: made in seen, within=5)
    finally:
        await relay.stop()
    assert not failures


async def test_the_poll_leaves_fresh_rows_to_the_fast_path_and_takes_the_rest(
    db: Database, broker: MemoryBroker
) -> None:
    await broker.declare("things", ["thing.*"])
    # written by a process that died before its relay published it
    async with Transactions(db, "/tests").begin() as unit:
        unit.publish(ThingMade(name="orphan"))
    relay = OutboxRelay(db, broker, service="tests", poll_seconds=0.05, fresh_seconds=1.0)

    assert await relay.publish_pending(fresh_seconds=60) == 0  # too young for the poll
    relay.start()  # its first poll takes rows of every age
    try:
        await eventually(lambda: drained(relay))
        async with Transactions(db, "/tests").begin() as unit:  # not handed to this relay
            unit.publish(ThingMade(name="another instance's"))
        await asyncio.sleep(0.15)  # three polls, all while the row is younger than 1 s
        assert await relay.backlog() == 1
        await eventually(lambda: drained(relay))  # once it is 1 s old
    finally:
        await relay.stop()


async def test_a_row_the_broker_refuses_on_the_fast_path_is_postponed_for_the_poll(
    db: Database, broker: MemoryBroker
) -> None:
    relay = OutboxRelay(db, broker, service="tests", poll_seconds=60)
    transactions = Transactions(db, "/tests", on_commit=relay.committed)
    relay.start()
    try:
        async with transactions.begin() as unit:
            unit.publish(MakeThing(name="no owner yet"))

        async def tried_once() -> bool:
            async with db.session() as session:
                return await session.scalar(select(outbox_table.c.attempts)) == 1

        await eventually(tried_once)
    finally:
        await relay.stop()
    async with db.session() as session:
        row = (await session.execute(select(outbox_table))).one()
    assert row.next_attempt_at is not None
    assert row.published_at is None
    assert "no queue is bound" in row.last_error

    await broker.declare("things", ["thing.*"])  # its owner binds: the retry goes through
    async with db.session() as session, session.begin():
        await session.execute(outbox_table.update().values(next_attempt_at=None))
    assert await relay.flush() == 1
    assert await relay.backlog() == 0


async def test_relay_publishes_pending_rows_once_and_marks_them(
    db: Database, broker: MemoryBroker, seen: list[str]
) -> None:
    transactions = Transactions(db, "/tests")
    async with transactions.begin() as unit:
        sent = [unit.publish(ThingMade(name=str(n))).id for n in range(5)]
    relay = OutboxRelay(db, broker, service="tests", batch_size=2)

    assert await relay.flush() == 5
    assert await relay.flush() == 0
    await eventually(lambda: sorted(seen) == sorted(sent))
    assert await relay.backlog() == 0


async def test_event_nobody_subscribes_to_is_done_and_counted(
    db: Database, broker: MemoryBroker
) -> None:
    unheard = EVENTS_UNHEARD.labels("tests", ThingMade.type)
    before = unheard._value.get()
    async with Transactions(db, "/tests").begin() as unit:
        unit.publish(ThingMade(name="nobody listens"))
    relay = OutboxRelay(db, broker, service="tests")

    assert await relay.publish_pending() == 1  # done with, though no one got it
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
    # each message alone: in a group, a failed handler also runs once more by itself
    transactions = Transactions(db, "/tests", group_size=1)
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


# group commit: messages that arrive together share one transaction


def delivery(name: str, attempt: int = 1, envelope: Envelope | None = None) -> Delivery:
    message = ThingMade(name=name)
    return Delivery(envelope or Envelope.wrap(message, source="/tests"), message, "q", attempt)


def commits(db: Database) -> list[None]:
    """Grows by one each time a transaction commits on ``db``."""
    seen: list[None] = []
    event.listen(db.engine.sync_engine, "commit", lambda _: seen.append(None))
    return seen


class Recorder:
    """A handler that makes a thing and notes it; it fails for the names in ``fail``."""

    def __init__(self, fail: set[str] | None = None) -> None:
        self.calls: list[str] = []
        self.fail = fail or set()

    async def __call__(self, delivery: Delivery, unit: UnitOfWork) -> None:
        name = delivery.message.name  # type: ignore[attr-defined]
        self.calls.append(name)
        await unit.session.execute(things.insert().values(name=name))
        unit.publish(ThingNoted(name=name))
        await asyncio.sleep(0)  # let the others arrive meanwhile
        if name in self.fail:
            raise ConnectionError(f"{name} failed")


async def test_messages_that_arrive_together_commit_in_one_transaction(db: Database) -> None:
    handed: list[Committed] = []
    transactions = Transactions(db, "/tests", on_commit=handed.append)
    record = Recorder()
    handle = idempotent(transactions, "things", record)
    sizes = UNITS_PER_TRANSACTION.labels("/tests")
    before = sizes._sum.get()
    committed = commits(db)

    await asyncio.gather(*(handle(delivery(str(n))) for n in range(5)))

    assert sorted(record.calls) == ["0", "1", "2", "3", "4"]
    assert len(committed) == 1
    assert len(handed) == 1  # the relay is handed the group's messages at once
    assert sorted(e.data["name"] for e, _ in handed[0]) == ["0", "1", "2", "3", "4"]
    assert await count(db, things) == 5
    assert await count(db, inbox_table) == 5
    assert await count(db, outbox_table) == 5
    assert sizes._sum.get() == before + 5


async def test_each_message_of_a_group_causes_its_own_messages(db: Database) -> None:
    transactions = Transactions(db, "/tests")
    handle = idempotent(transactions, "things", Recorder())
    sent = [delivery(str(n)) for n in range(3)]

    await asyncio.gather(*(handle(d) for d in sent))

    async with db.session() as session:
        bodies = (await session.scalars(select(outbox_table.c.body))).all()
    causes = {Envelope.from_json(body).data["name"]: Envelope.from_json(body) for body in bodies}
    for d in sent:
        noted = causes[d.message.name]  # type: ignore[attr-defined]
        assert noted.causationid == d.envelope.id
        assert noted.correlationid == d.envelope.correlationid


async def test_a_failing_message_rolls_back_its_group_and_the_rest_commit_alone(
    db: Database,
) -> None:
    transactions = Transactions(db, "/tests")
    record = Recorder(fail={"bad"})
    handle = idempotent(transactions, "things", record)
    names = ["a", "bad", "b", "c"]

    results = await asyncio.gather(*(handle(delivery(n)) for n in names), return_exceptions=True)

    # the one that failed fails as it would alone (so it is retried); the others commit
    assert [None if r is None else type(r) for r in results] == [None, ConnectionError, None, None]
    async with db.session() as session:
        made = sorted((await session.scalars(select(things.c.name))).all())
    assert made == ["a", "b", "c"]  # nothing of the failed one, nothing twice
    assert await count(db, inbox_table) == 3
    assert await count(db, outbox_table) == 3
    assert record.calls.count("bad") == 2  # in the group, then alone


async def test_a_message_twice_in_one_group_takes_effect_once(db: Database) -> None:
    transactions = Transactions(db, "/tests")
    record = Recorder()
    handle = idempotent(transactions, "things", record)
    first = delivery("twice")
    duplicates = DUPLICATES.labels("things")
    before = duplicates._value.get()

    await asyncio.gather(
        handle(delivery("other")), handle(first), handle(delivery("twice", 2, first.envelope))
    )

    assert sorted(record.calls) == ["other", "twice"]
    assert await count(db, things) == 2
    assert duplicates._value.get() == before + 1


async def test_a_group_claims_the_keys_of_the_units_waiting_together_in_one_call(
    db: Database,
) -> None:
    calls: list[list[str]] = []
    taken = {"seen before"}

    async def claim(session: AsyncConnection, keys: Sequence[str]) -> set[str]:
        calls.append(list(keys))
        fresh = set(keys) - taken
        taken.update(keys)
        return fresh

    async def work(unit: UnitOfWork) -> bool:
        return unit.claimed

    transactions = Transactions(db, "/tests")
    keys = ["a", "seen before", "b", "a"]
    ran = await asyncio.gather(*(transactions.together(work, once=Once(k, claim)) for k in keys))

    assert calls == [["a", "seen before", "b"]]  # one call, each key once
    assert ran == [True, False, True, False]  # the second "a" is a copy of the first
    assert await transactions.together(work, once=Once("b", claim)) is False
    assert await transactions.together(work, once=Once("c", claim)) is True


async def test_a_claim_that_fails_for_one_key_fails_its_unit_alone(db: Database) -> None:
    async def claim(session: AsyncConnection, keys: Sequence[str]) -> set[str]:
        if "poisoned" in keys:  # say, a deadlock with another instance over this key
            raise ValueError("the claim of this key failed")
        return set(keys)

    async def work(unit: UnitOfWork) -> bool:
        await unit.session.execute(things.insert().values(name="made"))
        return unit.claimed

    transactions = Transactions(db, "/tests")
    keys = ["a", "poisoned", "b"]
    results = await asyncio.gather(
        *(transactions.together(work, once=Once(k, claim)) for k in keys), return_exceptions=True
    )

    assert [type(r) for r in results] == [bool, ValueError, bool]
    assert await count(db, things) == 2  # the others committed, alone


async def test_a_copy_that_joins_a_later_wave_of_the_group_is_skipped(db: Database) -> None:
    transactions = Transactions(db, "/tests")
    claim = claims_of("things")
    started, release = asyncio.Event(), asyncio.Event()
    committed = commits(db)

    async def slow(unit: UnitOfWork) -> bool:
        started.set()
        await release.wait()
        return unit.claimed

    async def quick(unit: UnitOfWork) -> bool:
        return unit.claimed

    first = asyncio.create_task(transactions.together(slow, once=Once("m-1", claim)))
    await started.wait()
    copy = asyncio.create_task(transactions.together(quick, once=Once("m-1", claim)))
    await asyncio.sleep(0)  # it waits in the running group, for its next wave
    release.set()

    assert (await first, await copy) == (True, False)
    assert len(committed) == 1  # one group: the copy came in its second wave
    assert await count(db, inbox_table) == 1


@pytest.mark.parametrize(
    ("group_size", "messages", "transactions_committed"),
    [(3, 10, 4), (1, 3, 3)],  # three, three, three and one; a group of one is plain idempotent
)
async def test_a_group_takes_at_most_group_size_messages(
    db: Database, group_size: int, messages: int, transactions_committed: int
) -> None:
    transactions = Transactions(db, "/tests", group_size=group_size)
    handle = idempotent(transactions, "things", Recorder())
    committed = commits(db)

    await asyncio.gather(*(handle(delivery(str(n))) for n in range(messages)))

    assert await count(db, things) == messages
    assert len(committed) == transactions_committed


async def test_a_caller_that_leaves_leaves_its_unit_to_the_group(db: Database) -> None:
    transactions = Transactions(db, "/tests")
    record = Recorder()
    handle = idempotent(transactions, "things", record)
    first = asyncio.create_task(handle(delivery("left")))
    others = [asyncio.create_task(handle(delivery(str(n)))) for n in range(3)]
    await asyncio.sleep(0)
    first.cancel()  # a consumer stopping, a client gone: the group goes on

    await asyncio.gather(*others)

    assert first.cancelled()
    assert await count(db, things) == 4  # its unit committed with the others
    async with transactions.begin() as unit:  # and the connection went back clean
        await unit.session.execute(things.insert().values(name="after"))
    assert await count(db, things) == 5


async def test_when_the_database_fails_every_unit_of_the_group_gets_the_error(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(session: object, messages: object) -> None:
        raise ConnectionError("the database went away")

    monkeypatch.setattr("bus.transactions.write_outbox", broken)
    transactions = Transactions(db, "/tests")
    record = Recorder()
    handle = idempotent(transactions, "things", record)

    results = await asyncio.gather(
        *(handle(delivery(str(n))) for n in range(3)), return_exceptions=True
    )

    assert [type(r) for r in results] == [ConnectionError] * 3
    assert sorted(record.calls) == ["0", "1", "2"]  # not run again: each is retried instead
    assert await count(db, things) == 0


async def test_a_stalled_relay_leaves_what_waited_to_the_poll_and_sends_it_once(
    db: Database, broker: MemoryBroker, seen: list[str]
) -> None:
    publish_many = broker.publish_many
    stalls = [0.4]

    async def stalling(envelopes: Sequence[Envelope]) -> list[BaseException | None]:
        if stalls:
            await asyncio.sleep(stalls.pop())  # a slow confirm
        return await publish_many(envelopes)

    broker.publish_many = stalling  # type: ignore[method-assign]
    relay = OutboxRelay(db, broker, service="tests", poll_seconds=0.05, fresh_seconds=0.2)
    transactions = Transactions(db, "/tests", on_commit=relay.committed)
    relay.start()
    await asyncio.sleep(0.1)  # past its first poll
    try:
        sent = []
        for n in range(3):  # the first stalls the fast path; the others wait meanwhile
            async with transactions.begin() as unit:
                sent.append(unit.publish(ThingMade(name=str(n))).id)
            await asyncio.sleep(0.05)
        await eventually(lambda: drained(relay), within=5)
        await asyncio.sleep(0.3)  # time for a second copy to show up, if one were sent
    finally:
        await relay.stop()

    assert sorted(seen) == sorted(sent)


@pytest.mark.parametrize("group_size", [32, 1])  # in a group, and alone
async def test_callers_learn_their_units_committed_even_if_telling_the_relay_fails(
    db: Database, group_size: int
) -> None:
    def broken_relay(rows: Committed) -> None:
        raise RuntimeError("relay gone")

    transactions = Transactions(db, "/tests", on_commit=broken_relay, group_size=group_size)
    handle = idempotent(transactions, "things", Recorder())

    await asyncio.wait_for(asyncio.gather(*(handle(delivery(str(n))) for n in range(3))), 5)

    assert await count(db, things) == 3
    assert await count(db, outbox_table) == 3  # the relay's poll sends them


async def test_a_group_cancelled_before_it_began_leaves_no_caller_waiting(
    db: Database,
) -> None:
    transactions = Transactions(db, "/tests")
    handle = idempotent(transactions, "things", Recorder())
    waiting = asyncio.create_task(handle(delivery("stranded")))
    await asyncio.sleep(0)
    for group in list(transactions._running):  # the loop shutting down, say
        group.cancel()

    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(waiting, 5)
    await asyncio.wait_for(handle(delivery("next")), 5)  # the next unit starts a new group
    assert await count(db, things) == 1


async def test_settle_waits_for_groups_whose_callers_left(db: Database) -> None:
    transactions = Transactions(db, "/tests")

    async def slow(unit: UnitOfWork) -> None:
        await asyncio.sleep(0.2)
        await unit.session.execute(things.insert().values(name="slow"))

    caller = asyncio.create_task(transactions.together(slow))
    await asyncio.sleep(0.05)
    caller.cancel()  # a handler cancelled when its consumer stopped

    await transactions.settle(grace=5)

    assert await count(db, things) == 1


async def test_settle_rolls_back_groups_still_at_work_after_the_grace(db: Database) -> None:
    transactions = Transactions(db, "/tests")

    async def stuck(unit: UnitOfWork) -> None:
        await unit.session.execute(things.insert().values(name="stuck"))
        await asyncio.sleep(60)

    caller = asyncio.create_task(transactions.together(stuck))
    await asyncio.sleep(0.05)
    caller.cancel()

    await asyncio.wait_for(transactions.settle(grace=0.1), 5)

    assert await count(db, things) == 0
    assert not transactions._running


async def test_flush_goes_past_a_batch_no_one_hears(db: Database, broker: MemoryBroker) -> None:
    await broker.declare("things", ["thing.make"])  # commands are heard; events are not
    async with Transactions(db, "/tests").begin() as unit:
        for n in range(3):
            unit.publish(ThingMade(name=f"unheard {n}"))
        unit.publish(MakeThing(name="heard"))
    relay = OutboxRelay(db, broker, service="tests", batch_size=3)

    assert await relay.flush() == 4
    assert await relay.backlog() == 0
