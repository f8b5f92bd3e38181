"""How the AMQP consumer settles its deliveries, against a channel that records them: acks
coalesced, and what could not be passed on handed back."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest
import sqlalchemy.exc
from aio_pika.exceptions import ChannelInvalidStateError

import bus.amqp
from bus.amqp import _Acks, _AmqpConsumer
from bus.broker import (
    ATTEMPT_HEADER,
    CAUSE_HEADER,
    OUTAGE_RETRIES,
    BrokerUnavailable,
    Delivery,
    Outcome,
    process,
)
from bus.envelope import Envelope, Event, MessageRegistry


@dataclass(eq=False)
class Channel:
    is_closed: bool = False
    acks: list[tuple[int, bool]] = field(default_factory=list)
    nacks: list[int] = field(default_factory=list)

    async def basic_ack(self, tag: int, multiple: bool = False) -> None:
        self.acks.append((tag, multiple))

    async def basic_nack(self, tag: int, requeue: bool = True) -> None:
        assert requeue
        self.nacks.append(tag)


@dataclass
class Message:
    """A delivery as aio-pika hands it: asked for its channel once that closed, it raises."""

    on: Channel
    delivery_tag: int
    body: bytes = b""
    headers: dict[str, Any] = field(default_factory=dict)
    routing_key: str = "thing.made"

    @property
    def channel(self) -> Channel:
        if self.on.is_closed:
            raise ChannelInvalidStateError
        return self.on


def deliver(acks: _Acks, channel: Channel, tags: range) -> dict[int, Any]:
    messages = {tag: Message(channel, tag) for tag in tags}
    for message in messages.values():
        acks.delivered(message)  # type: ignore[arg-type]
    return messages


async def settle(acks: _Acks, *messages: Any) -> None:
    for message in messages:
        acks.settled(message)
    await acks.sent()


async def test_what_settles_in_one_turn_is_acked_in_one_frame() -> None:
    acks, channel = _Acks(), Channel()
    messages = deliver(acks, channel, range(1, 6))

    await settle(acks, *(messages[tag] for tag in (3, 1, 2, 5, 4)))

    assert channel.acks == [(5, True)]


async def test_tags_above_one_still_handled_are_acked_one_by_one() -> None:
    acks, channel = _Acks(), Channel()
    messages = deliver(acks, channel, range(1, 6))

    await settle(acks, messages[1], messages[3], messages[4])  # 2 is still being handled
    assert channel.acks == [(1, True), (3, False), (4, False)]

    await settle(acks, messages[2])
    assert channel.acks[-1] == (2, True)


async def test_a_closed_channel_gets_no_acks_and_a_new_one_starts_afresh() -> None:
    acks, old, new = _Acks(), Channel(), Channel()
    stale = deliver(acks, old, range(1, 3))
    old.is_closed = True  # the connection dropped: the broker delivers these again
    fresh = deliver(acks, new, range(1, 3))

    await settle(acks, stale[1], fresh[1], fresh[2])
    await acks.handed_back(stale[2])  # type: ignore[arg-type]

    assert (old.acks, old.nacks) == ([], [])
    assert new.acks == [(2, True)]


async def test_acks_settled_while_a_batch_is_written_follow_in_the_next() -> None:
    acks, channel = _Acks(), Channel()
    messages = deliver(acks, channel, range(1, 4))
    acks.settled(messages[1])  # type: ignore[arg-type]
    await asyncio.sleep(0)  # the first batch is being written
    acks.settled(messages[2])  # type: ignore[arg-type]
    acks.settled(messages[3])  # type: ignore[arg-type]

    await acks.sent()

    assert channel.acks == [(1, True), (3, True)]


async def test_a_delivery_handed_back_is_nacked_and_no_longer_holds_back_the_acks() -> None:
    acks, channel = _Acks(), Channel()
    messages = deliver(acks, channel, range(1, 4))

    await acks.handed_back(messages[1])  # type: ignore[arg-type]
    await settle(acks, messages[2], messages[3])

    assert channel.nacks == [1]
    assert channel.acks == [(3, True)]


class ThingMade(Event):
    type: ClassVar[str] = "thing.made"
    name: str


class RetryQueueDown:
    """A broker whose retry and dead-letter queues take nothing (no leader, say)."""

    retry_delays_ms = (10,)

    async def send_to_queue(self, queue: str, message: Any, headers: Any) -> None:
        raise BrokerUnavailable(f"{queue} did not confirm")


@dataclass
class Queue:
    name: str = "things"


def consumer(broker: Any, handler: Any) -> _AmqpConsumer:
    made = _AmqpConsumer(broker, Channel(), Queue(), handler, MessageRegistry([ThingMade]))  # type: ignore[arg-type]
    made.HAND_BACK_AFTER = 0
    return made


async def test_a_failure_that_cannot_go_to_its_retry_queue_is_handed_back_to_the_broker() -> None:
    async def failing(delivery: Delivery) -> None:
        raise RuntimeError("the database went away")

    channel = Channel()
    body = Envelope.wrap(ThingMade(name="x"), source="/tests").to_json()

    await consumer(RetryQueueDown(), failing)._on_message(Message(channel, 1, body))  # type: ignore[arg-type]

    assert (channel.nacks, channel.acks) == ([1], [])


async def test_an_attempt_header_another_client_wrote_badly_counts_as_none() -> None:
    handled: list[int] = []

    async def record(delivery: Delivery) -> None:
        handled.append(delivery.attempt)

    channel = Channel()
    body = Envelope.wrap(ThingMade(name="x"), source="/tests").to_json()
    message = Message(channel, 1, body, headers={ATTEMPT_HEADER: "second"})

    made = consumer(RetryQueueDown(), record)
    await made._on_message(message)  # type: ignore[arg-type]
    await made._acks.sent()  # the ack goes out in the next turn of the loop

    assert handled == [1]
    assert (channel.acks, channel.nacks) == ([(1, True)], [])


async def test_an_outage_is_retried_at_the_last_delay_but_not_for_ever() -> None:
    async def database_down(delivery: Delivery) -> None:
        raise ConnectionRefusedError("the database is down")

    body = Envelope.wrap(ThingMade(name="x"), source="/tests").to_json()

    async def after(attempts: int) -> Outcome:
        return await process(
            body,
            {ATTEMPT_HEADER: attempts},
            queue="things",
            routing_key="thing.made",
            handler=database_down,
            registry=MessageRegistry([ThingMade]),
            retry_delays_ms=(10, 20),
        )

    early, late = await after(0), await after(2)
    final, beyond = await after(1 + OUTAGE_RETRIES), await after(2 + OUTAGE_RETRIES)

    assert (early.action, early.delay_ms) == ("retry", 10)
    assert (late.action, late.delay_ms) == ("retry", 20)  # past the delays: the last again
    assert final.action == "retry"
    assert beyond.action == "dead_letter"


async def test_a_value_the_database_refuses_is_dead_lettered_at_once() -> None:
    class NulInText(Exception):
        sqlstate = "22021"

    async def store_it(delivery: Delivery) -> None:
        raise sqlalchemy.exc.DBAPIError("INSERT ...", {}, NulInText("invalid byte sequence"))

    body = Envelope.wrap(ThingMade(name="x"), source="/tests").to_json()
    outcome = await process(
        body,
        {},
        queue="things",
        routing_key="thing.made",
        handler=store_it,
        registry=MessageRegistry([ThingMade]),
        retry_delays_ms=(10, 20),
    )

    assert outcome.action == "dead_letter"
    assert outcome.headers[CAUSE_HEADER] == "invalid"


async def test_a_cancelled_error_the_handler_was_handed_is_handed_back_too() -> None:
    async def awaited_something_cancelled(delivery: Delivery) -> None:
        raise asyncio.CancelledError  # a future it awaited was cancelled, not this task

    channel = Channel()
    body = Envelope.wrap(ThingMade(name="x"), source="/tests").to_json()
    message = Message(channel, 1, body)

    await consumer(RetryQueueDown(), awaited_something_cancelled)._on_message(message)  # type: ignore[arg-type]

    assert (channel.nacks, channel.acks) == ([1], [])


async def test_a_message_handed_back_before_waits_longer_each_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def failing(delivery: Delivery) -> None:
        raise RuntimeError("the database went away")

    pauses: list[float] = []

    async def sleep(seconds: float) -> None:
        pauses.append(seconds)

    made = consumer(RetryQueueDown(), failing)
    made.HAND_BACK_AFTER = 1.0
    body = Envelope.wrap(ThingMade(name="x"), source="/tests").to_json()
    monkeypatch.setattr(bus.amqp.asyncio, "sleep", sleep)
    for returned in (0, 3, 9):
        message = Message(Channel(), 1, body, headers={"x-delivery-count": returned})
        await made._on_message(message)  # type: ignore[arg-type]
    monkeypatch.undo()

    assert pauses == [1.0, 8.0, 30.0]
