"""Bus kit against raw aio-pika on the same broker, in one run.

Publish: persistent messages with publisher confirms, pipelined in windows of WINDOW.
Consume: a quorum queue pre-filled with the kit's messages, drained with the same
prefetch, acking each message; timed from the first delivery to the last, so that
declaring the queue (the kit declares its retry and dead-letter queues too) is left out.
The kit adds the CloudEvents envelope, validation, tracing, metrics and retry decisions;
``kit consume + inbox`` also commits an inbox row per message on PostgreSQL.

    RABBITMQ_URL=amqp://guest:guest@127.0.0.1:5672/ \
    DATABASE_URL=postgresql+asyncpg://postgres@127.0.0.1:5432/test \
    python -m benchmarks.bus [--messages 20000] [--rounds 5]

(Run it as a module: as a script, this file would shadow the ``bus`` package.)

Writes benchmarks/results/bus.json and prints a table. Compare ratios from one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, ClassVar

import aio_pika
import structlog

from benchmarks import record, stamp
from bus.amqp import AmqpBroker
from bus.broker import EXCHANGE, Delivery
from bus.db import Database
from bus.envelope import Envelope, Event, MessageRegistry
from bus.inbox import idempotent
from bus.observability import configure_tracing
from bus.service import run as run_loop
from bus.transactions import Transactions, UnitOfWork

WINDOW = 500
PREFETCH = 256
RESULTS = Path(__file__).parent / "results" / "bus.json"


class BenchPinged(Event):
    """A small event, about the size of the shop's own."""

    type: ClassVar[str] = "bench.pinged"
    order_id: str
    n: int
    note: str


REGISTRY = MessageRegistry([BenchPinged])


def sample(n: int) -> BenchPinged:
    return BenchPinged(order_id=uuid.uuid4().hex, n=n, note="x" * 64)


async def raw_publish(url: str, queue: str, count: int) -> float:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(EXCHANGE)
        body = Envelope.wrap(sample(0), source="/bench").to_json()
        started = time.perf_counter()
        for start in range(0, count, WINDOW):
            await asyncio.gather(
                *(
                    exchange.publish(
                        aio_pika.Message(
                            body,
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                            message_id=uuid.uuid4().hex,
                        ),
                        routing_key=BenchPinged.type,
                        mandatory=True,
                    )
                    for _ in range(start, min(start + WINDOW, count))
                )
            )
        return time.perf_counter() - started


async def kit_publish(broker: AmqpBroker, count: int) -> float:
    # the application's messages exist before either side's clock starts (raw publishes a
    # body made in advance); wrapping each in its envelope is the kit's work, and timed
    messages = [sample(n) for n in range(count)]
    started = time.perf_counter()
    for start in range(0, count, WINDOW):
        envelopes = [
            Envelope.wrap(message, source="/bench") for message in messages[start : start + WINDOW]
        ]
        results = await broker.publish_many(envelopes)
        if any(results):
            raise RuntimeError(f"publish failed: {next(r for r in results if r)}")
    return time.perf_counter() - started


async def purge(broker: AmqpBroker, queue: str) -> None:
    channel = await broker.connection.channel()
    await (await channel.get_queue(queue)).purge()
    await channel.close()


async def drain(url: str, queue: str, count: int) -> float:
    """Raw consumer: ack every message, stop when ``count`` have been acked."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=PREFETCH)
        source = await channel.get_queue(queue)
        done = asyncio.Event()
        seen = 0

        started = 0.0

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal seen, started
            started = started or time.perf_counter()
            await message.ack()
            seen += 1
            if seen == count:
                done.set()

        await source.consume(on_message)
        await done.wait()
        return time.perf_counter() - started


async def kit_drain(
    broker: AmqpBroker,
    queue: str,
    count: int,
    wrap: Callable[[Callable[[Delivery], Awaitable[None]]], Any] | None = None,
) -> float:
    done = asyncio.Event()
    seen = 0
    started = 0.0

    async def handle(delivery: Delivery) -> None:
        nonlocal seen, started
        started = started or time.perf_counter()
        seen += 1
        if seen == count:
            done.set()

    handler = wrap(handle) if wrap else handle
    consumer = await broker.consume(queue, [BenchPinged.type], handler, REGISTRY)
    await done.wait()
    elapsed = time.perf_counter() - started
    await consumer.stop(grace=5)
    return elapsed


def inbox_on(db: Database) -> Callable[[Callable[[Delivery], Awaitable[None]]], Any]:
    """Wrap a plain handler in the inbox: one PostgreSQL transaction per message (the
    services group the messages that arrive together; this measures the worst case)."""
    transactions = Transactions(db, "/bench", group_size=1)

    def wrap(handle: Callable[[Delivery], Awaitable[None]]) -> Any:
        async def inner(delivery: Delivery, unit: UnitOfWork) -> None:
            await handle(delivery)

        return idempotent(transactions, "bench", inner)

    return wrap


async def run(url: str, database_url: str | None, count: int, rounds: int) -> dict[str, Any]:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    configure_tracing("bench")  # as a service runs it: ids propagated, spans not exported
    queue = f"bench-{uuid.uuid4().hex[:6]}"
    broker = AmqpBroker(url, name="bench", prefetch=PREFETCH)
    await broker.connect()
    await broker.declare(queue, [BenchPinged.type])
    db = None
    if database_url:
        db = Database(database_url, schema=f"bench_{uuid.uuid4().hex[:6]}")
        await db.create_all()
    times: dict[str, list[float]] = {}

    def note(name: str, seconds: float) -> None:
        times.setdefault(name, []).append(count / seconds)
        print(f"  {name:<24} {count / seconds:>9.0f} msg/s", flush=True)

    try:
        for round_number in range(1, rounds + 1):
            print(f"round {round_number}/{rounds}", flush=True)
            # alternate which goes first so neither always meets a warmer broker
            order = ["raw", "kit"] if round_number % 2 else ["kit", "raw"]
            for side in order:
                if side == "raw":
                    note("raw publish", await raw_publish(url, queue, count))
                    await purge(broker, queue)
                    # both consumers drain the same kind of message: the kit's
                    await kit_publish(broker, count)
                    note("raw consume", await drain(url, queue, count))
                else:
                    note("kit publish", await kit_publish(broker, count))
                    note("kit consume", await kit_drain(broker, queue, count))
            if db is not None:
                await kit_publish(broker, count)
                note("kit consume + inbox", await kit_drain(broker, queue, count, inbox_on(db)))
    finally:
        channel = await broker.connection.channel()
        for name in (queue, f"{queue}.dlq", *(f"{queue}.retry.{d}ms" for d in (200, 1000, 5000))):
            await channel.queue_delete(name)
        await broker.close()
        if db is not None:
            await db.drop_schema()
            await db.close()

    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        **stamp(),
        "messages_per_round": count,
        "rounds": rounds,
        "window": WINDOW,
        "prefetch": PREFETCH,
        "median_msgs_per_second": {k: round(v) for k, v in medians.items()},
        "all_msgs_per_second": {k: [round(v) for v in vs] for k, vs in times.items()},
        "ratio_kit_to_raw": {
            "publish": round(medians["kit publish"] / medians["raw publish"], 3),
            "consume": round(medians["kit consume"] / medians["raw consume"], 3),
        },
        "target_ratio": 0.8,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    url = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
    result = run_loop(run(url, os.environ.get("DATABASE_URL"), args.messages, args.rounds))
    record(RESULTS, result)
    print(json.dumps(result["median_msgs_per_second"], indent=2))
    print("kit/raw:", result["ratio_kit_to_raw"], "(target >= 0.8)")


if __name__ == "__main__":
    main()
