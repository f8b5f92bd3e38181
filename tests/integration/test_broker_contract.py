"""One contract, two brokers: the in-process broker must behave as RabbitMQ does."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import aio_pika
import pytest
import structlog
from opentelemetry import trace

from bus import observability
from bus.amqp import AmqpBroker, dead_letter_queue, retry_queue
from bus.broker import Broker, Delivery, Reject, Unroutable
from bus.envelope import Envelope, Event, MessageRegistry
from bus.memory import MemoryBroker
from tests.support import ROUTING_TABLE, eventually

pytestmark = pytest.mark.integration


class Pinged(Event):
    type: ClassVar[str] = "test.pinged"
    n: int


REGISTRY = MessageRegistry([Pinged])
RETRY_DELAYS_MS = (20, 40)


def ping(n: int, type_: str = Pinged.type) -> Envelope:
    envelope = Envelope.wrap(Pinged(n=n), source="/tests")
    return envelope.model_copy(update={"type": type_})


@dataclass
class Rig:
    """A broker under test, with what the contract needs to poke at it from outside."""

    broker: Broker
    raw_publish: Callable[[bytes, str], Awaitable[None]]
    prefix: str
    queues: list[str] = field(default_factory=list)

    def queue(self, name: str = "q") -> str:
        full = f"{self.prefix}.{name}"
        self.queues.append(full)
        return full


@pytest.fixture(params=["memory", "rabbitmq"])
async def rig(request: pytest.FixtureRequest, unique: str) -> AsyncIterator[Rig]:
    if request.param == "memory":
        memory = MemoryBroker(prefetch=8, retry_delays_ms=RETRY_DELAYS_MS)
        await memory.connect()

        async def memory_raw(body: bytes, routing_key: str) -> None:
            await memory.publish_raw(body, routing_key, {})

        yield Rig(memory, memory_raw, unique)
        await memory.close()
        return

    url = request.getfixturevalue("rabbit").url
    amqp = AmqpBroker(url, name=unique, prefetch=8, retry_delays_ms=RETRY_DELAYS_MS)
    await amqp.connect()
    other = await aio_pika.connect(url)  # "any AMQP client"
    channel = await other.channel()
    exchange = await channel.get_exchange("microshop.events")

    async def amqp_raw(body: bytes, routing_key: str) -> None:
        await exchange.publish(aio_pika.Message(body), routing_key=routing_key)

    rig = Rig(amqp, amqp_raw, unique)
    yield rig
    await amqp.close()
    for queue in rig.queues:
        for name in (
            queue,
            dead_letter_queue(queue),
            *(retry_queue(queue, d) for d in RETRY_DELAYS_MS),
        ):
            with contextlib.suppress(Exception):
                await channel.queue_delete(name)
    await other.close()


class Recorder:
    def __init__(self, behaviour: Callable[[Delivery], Awaitable[None]] | None = None) -> None:
        self.deliveries: list[Delivery] = []
        self.behaviour = behaviour

    async def __call__(self, delivery: Delivery) -> None:
        self.deliveries.append(delivery)
        if self.behaviour is not None:
            await self.behaviour(delivery)

    @property
    def numbers(self) -> list[int]:
        return [d.message.n for d in self.deliveries]  # type: ignore[attr-defined]


async def test_published_message_reaches_consumer_intact(rig: Rig) -> None:
    seen = Recorder()
    await rig.broker.consume(rig.queue(), [Pinged.type], seen, REGISTRY)
    sent = ping(7)

    await rig.broker.publish(sent)

    await eventually(lambda: len(seen.deliveries) == 1)
    got = seen.deliveries[0]
    assert got.envelope.id == sent.id
    assert got.envelope.correlationid == sent.correlationid
    assert got.message == Pinged(n=7)
    assert got.attempt == 1


async def test_publish_nobody_listens_to_is_unroutable(rig: Rig) -> None:
    with pytest.raises(Unroutable):
        await rig.broker.publish(ping(1, type_=f"{rig.prefix}.nobody.home"))


async def test_publish_many_reports_each_result(rig: Rig) -> None:
    seen = Recorder()
    await rig.broker.consume(rig.queue(), [Pinged.type], seen, REGISTRY)

    results = await rig.broker.publish_many([ping(1), ping(2, type_=f"{rig.prefix}.lost"), ping(3)])

    assert results[0] is None
    assert isinstance(results[1], Unroutable)
    assert results[2] is None
    await eventually(lambda: sorted(seen.numbers) == [1, 3])


async def test_topic_routing_matches_rabbitmq_table(rig: Rig) -> None:
    # each row gets its own word after the prefix, so rows cannot route into each other
    registry = MessageRegistry()
    routed: set[int] = set()

    def recorder_for(row: int) -> Callable[[Delivery], Awaitable[None]]:
        async def record(delivery: Delivery) -> None:
            routed.add(row)

        return record

    for row, (pattern, key, _) in enumerate(ROUTING_TABLE):
        model: Any = type(f"Probe{row}", (Event,), {"type": f"{rig.prefix}.r{row}.{key}"})
        registry.register(model)
        pattern_here = f"{rig.prefix}.r{row}.{pattern}"
        # a private queue per row: routing is the exchange's work, whatever the queue
        await rig.broker.subscribe([pattern_here], recorder_for(row), registry)

    for row, (_, key, _) in enumerate(ROUTING_TABLE):
        with contextlib.suppress(Unroutable):
            await rig.broker.publish(ping(0, type_=f"{rig.prefix}.r{row}.{key}"))

    expected = {row for row, (_, _, hit) in enumerate(ROUTING_TABLE) if hit}
    with contextlib.suppress(AssertionError):
        await eventually(lambda: routed == expected, within=5)
    await asyncio.sleep(0.2)  # and nothing else arrives
    assert routed == expected


async def test_poison_messages_are_dead_lettered_with_reason_and_consumer_goes_on(rig: Rig) -> None:
    seen = Recorder()
    queue = rig.queue()
    await rig.broker.consume(queue, [Pinged.type, f"{rig.prefix}.#"], seen, REGISTRY)

    await rig.raw_publish(b"{not json", Pinged.type)
    await rig.raw_publish(b'{"specversion": "1.0", "type": "test.pinged"}', Pinged.type)
    await rig.raw_publish(ping(1).model_copy(update={"data": {"n": "many"}}).to_json(), Pinged.type)
    await rig.raw_publish(ping(2, type_=f"{rig.prefix}.unknown").to_json(), f"{rig.prefix}.unknown")
    await rig.broker.publish(ping(3))

    await eventually(lambda: seen.numbers == [3])

    async def four_dead() -> bool:
        return len(await rig.broker.dead_letters(queue)) == 4

    await eventually(four_dead)
    letters = await rig.broker.dead_letters(queue)
    reasons = [letter.reason for letter in letters]
    assert all(letter.cause == "invalid" and letter.attempts == 1 for letter in letters)
    assert "not a CloudEvent" in reasons[0]
    assert "id" in reasons[1] or "source" in reasons[1]
    assert "invalid test.pinged data: n:" in reasons[2]
    assert "unknown message type" in reasons[3]
    assert len(seen.deliveries) == 1  # none of the four reached the handler


async def test_failing_handler_is_retried_with_backoff_then_dead_lettered(rig: Rig) -> None:
    async def always_fail(delivery: Delivery) -> None:
        raise RuntimeError(f"boom on attempt {delivery.attempt}")

    seen = Recorder(always_fail)
    queue = rig.queue()
    await rig.broker.consume(queue, [Pinged.type], seen, REGISTRY)

    await rig.broker.publish(ping(5))

    async def dead() -> bool:
        return len(await rig.broker.dead_letters(queue)) == 1

    await eventually(dead)
    assert [d.attempt for d in seen.deliveries] == [1, 2, 3]
    (letter,) = await rig.broker.dead_letters(queue)
    assert letter.cause == "exhausted"
    assert letter.attempts == 3
    assert "RuntimeError: boom on attempt 3" in letter.reason
    assert letter.routing_key == Pinged.type
    assert Envelope.from_json(letter.body).data == {"n": 5}


@pytest.mark.parametrize(
    ("error", "failures"),
    [
        (RuntimeError("upstream hiccup"), 2),  # within the retries a failure gets
        (ConnectionRefusedError("the database is restarting"), 5),  # an outage: past them
    ],
)
async def test_handler_that_recovers_is_acked_on_a_later_attempt(
    rig: Rig, error: Exception, failures: int
) -> None:
    async def fail_for_a_while(delivery: Delivery) -> None:
        if delivery.attempt <= failures:
            raise error

    seen = Recorder(fail_for_a_while)
    queue = rig.queue()
    await rig.broker.consume(queue, [Pinged.type], seen, REGISTRY)

    await rig.broker.publish(ping(9))

    await eventually(lambda: len(seen.deliveries) == failures + 1)
    await asyncio.sleep(0.2)
    assert [d.attempt for d in seen.deliveries] == list(range(1, failures + 2))
    assert await rig.broker.dead_letters(queue) == []


async def test_reject_dead_letters_at_once(rig: Rig) -> None:
    async def refuse(delivery: Delivery) -> None:
        raise Reject("order 42 does not exist")

    seen = Recorder(refuse)
    queue = rig.queue()
    await rig.broker.consume(queue, [Pinged.type], seen, REGISTRY)

    await rig.broker.publish(ping(1))

    async def dead() -> bool:
        return len(await rig.broker.dead_letters(queue)) == 1

    await eventually(dead)
    (letter,) = await rig.broker.dead_letters(queue)
    assert (letter.cause, letter.attempts, letter.reason) == (
        "rejected",
        1,
        "order 42 does not exist",
    )
    assert len(seen.deliveries) == 1


async def trace_ids_in_handler(rig: Rig) -> list[int]:
    """Consume on the rig; return the trace ids the handler runs in, as they come."""
    trace_ids: list[int] = []

    async def record_trace(delivery: Delivery) -> None:
        trace_ids.append(trace.get_current_span().get_span_context().trace_id)

    await rig.broker.consume(rig.queue(), [Pinged.type], Recorder(record_trace), REGISTRY)
    return trace_ids


async def test_trace_context_survives_publish_consume_hop(rig: Rig, spans: Any) -> None:
    trace_ids = await trace_ids_in_handler(rig)

    with trace.get_tracer("test").start_as_current_span("http request") as span:
        await rig.broker.publish(ping(1))
        expected = span.get_span_context().trace_id

    await eventually(lambda: trace_ids == [expected])
    names = {s.name for s in spans.get_finished_spans() if s.context.trace_id == expected}
    assert {"http request", "test.pinged publish", "test.pinged process"} <= names


async def test_without_recorded_spans_the_trace_id_still_crosses_the_hop(
    rig: Rig, spans: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(observability, "_spans_recorded", False)  # a service with no exporter
    trace_ids = await trace_ids_in_handler(rig)

    with trace.get_tracer("test").start_as_current_span("http request") as span:
        await rig.broker.publish(ping(1))
        expected = span.get_span_context().trace_id

    await eventually(lambda: trace_ids == [expected])
    assert [s.name for s in spans.get_finished_spans()] == ["http request"]


async def test_stop_lets_in_flight_handler_finish(rig: Rig) -> None:
    started, finished = asyncio.Event(), asyncio.Event()

    async def slow(delivery: Delivery) -> None:
        started.set()
        await asyncio.sleep(0.3)
        finished.set()

    seen = Recorder(slow)
    consumer = await rig.broker.consume(rig.queue(), [Pinged.type], seen, REGISTRY)
    await rig.broker.publish(ping(1))
    await asyncio.wait_for(started.wait(), 5)

    await consumer.stop(grace=5)

    assert finished.is_set()


async def test_every_subscription_sees_every_message_and_leaves_no_queue(rig: Rig) -> None:
    first, second = Recorder(), Recorder()
    one = await rig.broker.subscribe([Pinged.type], first, REGISTRY)
    two = await rig.broker.subscribe([Pinged.type], second, REGISTRY)

    for n in range(3):
        await rig.broker.publish(ping(n))

    await eventually(lambda: sorted(first.numbers) == sorted(second.numbers) == [0, 1, 2])
    await one.stop()
    await two.stop()

    async def gone() -> bool:  # the broker deletes an exclusive queue when its channel closes
        try:
            await rig.broker.publish(ping(9))
        except Unroutable:
            return True
        return False

    await eventually(gone)


async def test_a_failing_observer_drops_the_message_without_retrying(rig: Rig) -> None:
    async def broken(delivery: Delivery) -> None:
        raise RuntimeError("observer bug")

    seen = Recorder(broken)
    await rig.broker.subscribe([Pinged.type], seen, REGISTRY)
    with structlog.testing.capture_logs() as logs:
        await rig.broker.publish(ping(1))
        await rig.broker.publish(ping(2))

        await eventually(lambda: len(seen.deliveries) == 2)
        await asyncio.sleep(0.2)
    assert [d.attempt for d in seen.deliveries] == [1, 1]
    events = [entry["event"] for entry in logs]
    assert events.count("observer failed on a message; dropped") == 2
    assert not [event for event in events if "dead-letter" in event or "giving up" in event]


async def test_without_recorded_spans_a_message_with_no_trace_starts_one(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(observability, "_spans_recorded", False)
    trace_ids = await trace_ids_in_handler(rig)
    await rig.broker.publish(ping(1))  # outside any trace, as a plain AMQP client would
    await rig.broker.publish(ping(2))

    await eventually(lambda: len(trace_ids) == 2)
    assert all(trace_ids), "each handler ran in a trace"
    assert trace_ids[0] != trace_ids[1]
