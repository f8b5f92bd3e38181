"""An in-process broker with RabbitMQ's semantics, for unit tests and ``microshop demo``.

It routes by topic pattern exactly as a topic exchange does, refuses unroutable
publishes, serialises every message (so handlers see what they would see on the wire),
retries after the same delays, dead-letters with the same headers, and puts back a
message whose handler was cancelled, as a broker does when a consumer dies before acking.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bus.broker import (
    Consumer,
    DeadLetter,
    Handler,
    Unroutable,
    dead_letter_from,
    process,
    publish_span,
    topic_matches,
)
from bus.envelope import Envelope, MessageRegistry
from bus.observability import MESSAGES_PUBLISHED, child
from bus.resilience import finish_or_cancel


@dataclass(slots=True)
class _Item:
    body: bytes
    routing_key: str
    message_id: str | None
    headers: dict[str, Any] = field(default_factory=dict)


class _Queue:
    def __init__(self, name: str) -> None:
        self.name = name
        self.patterns: set[str] = set()
        self.ready: asyncio.Queue[_Item] = asyncio.Queue()
        self.dead: list[_Item] = []


class MemoryBroker:
    """The :class:`~bus.broker.Broker` interface in one process."""

    def __init__(self, *, prefetch: int = 64, retry_delays_ms: Sequence[int] = (200, 1000, 5000)):
        self.prefetch = prefetch
        self.retry_delays_ms = tuple(retry_delays_ms)
        self._queues: dict[str, _Queue] = {}
        self._consumers: list[_MemoryConsumer] = []
        self._timers: set[asyncio.TimerHandle] = set()
        self._users = 0

    @property
    def is_connected(self) -> bool:
        """True while some user has connected and not closed."""
        return self._users > 0

    async def connect(self) -> None:
        """Nothing to reach: count one more user (services in one process share it)."""
        self._users += 1

    async def close(self) -> None:
        """Count one user less; the last one stops consumers and pending retries."""
        self._users = max(self._users - 1, 0)
        if self._users:
            return
        for consumer in list(self._consumers):
            await consumer.stop(grace=0)
        for timer in self._timers:
            timer.cancel()

    async def publish(self, envelope: Envelope) -> None:
        """Route ``envelope`` by its type to every bound queue; :class:`Unroutable` if none."""
        with publish_span(envelope) as headers:
            self._route(_Item(envelope.to_json(), envelope.type, envelope.id, headers))
        child(MESSAGES_PUBLISHED, envelope.source, envelope.type).inc()

    async def publish_many(self, envelopes: Sequence[Envelope]) -> list[BaseException | None]:
        """Publish each envelope; one result per envelope."""
        results: list[BaseException | None] = []
        for envelope in envelopes:
            try:
                await self.publish(envelope)
                results.append(None)
            except Unroutable as error:
                results.append(error)
        return results

    async def publish_raw(self, body: bytes, routing_key: str, headers: dict[str, Any]) -> None:
        """Route a body as it would arrive from any AMQP client (no validation here)."""
        self._route(_Item(body, routing_key, None, dict(headers)))

    def _route(self, item: _Item) -> None:
        targets = [
            queue
            for queue in self._queues.values()
            if any(topic_matches(pattern, item.routing_key) for pattern in queue.patterns)
        ]
        if not targets:
            raise Unroutable(f"no queue is bound to routing key {item.routing_key!r}")
        for queue in targets:
            queue.ready.put_nowait(
                _Item(item.body, item.routing_key, item.message_id, item.headers)
            )

    async def declare(self, queue: str, patterns: Sequence[str]) -> None:
        """Create ``queue`` (if new) and bind it to ``patterns``."""
        self._queue(queue).patterns.update(patterns)

    def _queue(self, name: str) -> _Queue:
        return self._queues.setdefault(name, _Queue(name))

    async def consume(
        self, queue: str, patterns: Sequence[str], handler: Handler, registry: MessageRegistry
    ) -> Consumer:
        """Start handling ``queue`` with up to ``prefetch`` messages in flight."""
        await self.declare(queue, patterns)
        consumer = _MemoryConsumer(self, self._queue(queue), handler, registry)
        self._consumers.append(consumer)
        consumer.start()
        return consumer

    async def subscribe(
        self, patterns: Sequence[str], handler: Handler, registry: MessageRegistry
    ) -> Consumer:
        """Watch ``patterns`` on a private queue that goes away with the subscription."""
        name = f"subscription.{uuid.uuid4().hex}"
        await self.declare(name, patterns)
        consumer = _MemoryConsumer(self, self._queue(name), handler, registry, transient=True)
        self._consumers.append(consumer)
        consumer.start()
        return consumer

    async def dead_letters(self, queue: str, limit: int = 100) -> list[DeadLetter]:
        """The dead letters of ``queue``, oldest first."""
        return [
            dead_letter_from(queue, item.body, item.headers, item.message_id)
            for item in self._queue(queue).dead[:limit]
        ]

    def queue_depth(self, queue: str) -> int:
        """Messages ready in ``queue`` (for tests and the demo's status page)."""
        return self._queue(queue).ready.qsize()

    def _later(self, delay_ms: int, queue: _Queue, item: _Item) -> None:
        loop = asyncio.get_running_loop()

        def fire() -> None:
            self._timers.discard(timer)
            queue.ready.put_nowait(item)

        timer = loop.call_later(delay_ms / 1000, fire)
        self._timers.add(timer)


class _MemoryConsumer:
    def __init__(
        self,
        broker: MemoryBroker,
        queue: _Queue,
        handler: Handler,
        registry: MessageRegistry,
        transient: bool = False,
    ) -> None:
        self._broker = broker
        self._transient = transient
        self._queue = queue
        self._handler = handler
        self._registry = registry
        self._slots = asyncio.Semaphore(broker.prefetch)
        self._inflight: set[asyncio.Task[None]] = set()
        self._pump: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._pump = asyncio.create_task(self._run(), name=f"consume {self._queue.name}")

    async def _run(self) -> None:
        while True:
            await self._slots.acquire()
            item = await self._queue.ready.get()
            task = asyncio.create_task(self._handle(item))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _handle(self, item: _Item) -> None:
        try:
            outcome = await process(
                item.body,
                item.headers,
                queue=self._queue.name,
                routing_key=item.routing_key,
                handler=self._handler,
                registry=self._registry,
                retry_delays_ms=self._broker.retry_delays_ms,
                observer=self._transient,
            )
        except asyncio.CancelledError:
            # the consumer died before acking: the broker keeps the message for redelivery
            self._queue.ready.put_nowait(item)
            raise
        finally:
            self._slots.release()
        # an observer's failures come back as "ack": process() logged them, nothing to keep
        headers = {**item.headers, **outcome.headers}
        moved = _Item(item.body, item.routing_key, item.message_id, headers)
        if outcome.action == "retry":
            self._broker._later(outcome.delay_ms, self._queue, moved)
        elif outcome.action == "dead_letter":
            self._queue.dead.append(moved)

    async def stop(self, grace: float = 10.0) -> None:
        """Stop taking messages, give in-flight handlers ``grace`` s, then cancel them."""
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
        await finish_or_cancel(self._inflight, grace)
        if self in self._broker._consumers:
            self._broker._consumers.remove(self)
        if self._transient:
            self._broker._queues.pop(self._queue.name, None)
