"""How the AMQP broker reports a publish its connection lost, against a channel that fails it."""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

import pytest

from bus.amqp import AmqpBroker
from bus.broker import BrokerUnavailable
from bus.envelope import Envelope, Event


class ThingMade(Event):
    type: ClassVar[str] = "thing.made"
    name: str


class GivenUp:
    """aiormq's channel once it gave its connection up (heartbeats missed): every
    confirm waiting on it fails with CancelledError, though no one cancelled the caller."""

    async def basic_publish(self, *args: Any, **kwargs: Any) -> None:
        raise asyncio.CancelledError


class Unanswered:
    """A channel whose confirms never come."""

    async def basic_publish(self, *args: Any, **kwargs: Any) -> None:
        await asyncio.Event().wait()


class Robust:
    def __init__(self, channel: object) -> None:
        self.channel = channel

    async def get_underlay_channel(self) -> object:
        return self.channel


def broker_on(channel: object) -> AmqpBroker:
    broker = AmqpBroker("amqp://guest:guest@127.0.0.1:5672/")
    broker._channel = Robust(channel)  # type: ignore[assignment]
    return broker


def thing(name: str) -> Envelope:
    return Envelope.wrap(ThingMade(name=name), source="/tests")


async def test_a_publish_lost_with_the_connection_is_the_broker_unavailable() -> None:
    broker = broker_on(GivenUp())

    with pytest.raises(BrokerUnavailable, match="lost with the connection"):
        await broker.publish(thing("one"))
    results = await broker.publish_many([thing("two"), thing("three")])

    assert [type(result) for result in results] == [BrokerUnavailable, BrokerUnavailable]


async def test_a_caller_cancelled_while_its_publishes_wait_is_cancelled() -> None:
    broker = broker_on(Unanswered())
    one = asyncio.create_task(broker.publish(thing("one")))
    many = asyncio.create_task(broker.publish_many([thing("two"), thing("three")]))
    await asyncio.sleep(0.01)

    one.cancel()
    many.cancel()

    for task in (one, many):
        with pytest.raises(asyncio.CancelledError):
            await task
