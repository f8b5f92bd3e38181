"""The RabbitMQ broker, on aio-pika.

Topology (declared idempotently by whoever needs it):

- ``microshop.events``: durable topic exchange; the routing key is the message type.
- ``<service>``: durable quorum queue bound to what the service consumes. Its own
  dead-letter target is ``microshop.dlx`` so a message that crashes consumers past the
  delivery limit lands in the DLQ too.
- ``<service>.retry.<ms>``: one quorum queue per retry delay; its TTL dead-letters the
  message back into ``<service>`` through the default exchange, so a retry reaches only
  the service that failed, never the other subscribers.
- ``microshop.dlx`` (direct) -> ``<service>.dlq`` with the reason in the headers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

import aio_pika
import aiormq
import structlog
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from aiormq.abc import AbstractChannel
from pamqp.commands import Basic

from bus.broker import (
    DEAD_LETTER_EXCHANGE,
    EXCHANGE,
    BrokerUnavailable,
    Consumer,
    DeadLetter,
    Handler,
    Nacked,
    Unroutable,
    being_cancelled,
    counted,
    dead_letter_from,
    process,
    publish_span,
)
from bus.envelope import CONTENT_TYPE, Envelope, MessageRegistry
from bus.observability import MESSAGES_PUBLISHED, child
from bus.resilience import finish_or_cancel

log = structlog.get_logger("bus.amqp")

OBSERVER_BACKLOG = 10_000  # messages an observer's queue keeps before dropping the oldest
PERSISTENT = int(aio_pika.DeliveryMode.PERSISTENT)

_QUORUM = {
    "x-queue-type": "quorum",
    # at-least-once dead-lettering: the broker keeps the message until the DLQ confirms it
    "x-dead-letter-strategy": "at-least-once",
    "x-overflow": "reject-publish",
}


class AmqpBroker:
    """The :class:`~bus.broker.Broker` interface on RabbitMQ.

    Publishes are persistent, ``mandatory`` and confirmed; consumers ack only after their
    handler returns, and come back with their queues and bindings after a reconnect.
    """

    def __init__(
        self,
        url: str,
        *,
        name: str = "microshop",
        prefetch: int = 64,
        retry_delays_ms: Sequence[int] = (200, 1000, 5000),
        delivery_limit: int = 20,
        confirm_timeout: float = 10.0,
        reconnect_interval: float = 1.0,
        exchange: str = EXCHANGE,
    ) -> None:
        self.url = url
        self.name = name
        self.prefetch = prefetch
        self.retry_delays_ms = tuple(retry_delays_ms)
        self.delivery_limit = delivery_limit
        self.confirm_timeout = confirm_timeout
        self.reconnect_interval = reconnect_interval
        # another exchange pair isolates a whole system on a shared broker (tests, tenants)
        self.exchange_name = exchange
        self.dlx_name = DEAD_LETTER_EXCHANGE if exchange == EXCHANGE else f"{exchange}.dlx"
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self._consumers: list[_AmqpConsumer] = []

    @property
    def is_connected(self) -> bool:
        """True while the connection is up (false during a reconnect)."""
        connection = self._connection
        return connection is not None and connection.connected.is_set()

    @property
    def connection(self) -> AbstractRobustConnection:
        """The robust connection (after :meth:`connect`)."""
        if self._connection is None:
            raise BrokerUnavailable("the broker is not connected; call connect() first")
        return self._connection

    async def connect(self) -> None:
        """Connect (reconnecting by itself from then on) and declare the exchanges."""
        try:
            self._connection = await aio_pika.connect_robust(
                self.url,
                client_properties={"connection_name": self.name},
                reconnect_interval=self.reconnect_interval,
            )
        except (OSError, aiormq.exceptions.AMQPError) as error:
            raise BrokerUnavailable(f"cannot reach RabbitMQ: {error}") from error
        self._channel = await self._connection.channel(
            publisher_confirms=True, on_return_raises=True
        )
        await self._channel.declare_exchange(
            self.exchange_name, aio_pika.ExchangeType.TOPIC, durable=True
        )
        await self._channel.declare_exchange(
            self.dlx_name, aio_pika.ExchangeType.DIRECT, durable=True
        )

    async def close(self) -> None:
        """Stop every consumer (letting in-flight handlers finish) and disconnect."""
        for consumer in list(self._consumers):
            await consumer.stop()
        if self._connection is not None:
            await self._connection.close()
        self._connection = self._channel = None

    async def publish(self, envelope: Envelope) -> None:
        """Publish persistently with ``mandatory`` and wait for the confirm."""
        with publish_span(envelope) as headers:
            # the body carries source, time and correlation id; AMQP gets only what
            # brokers and plain clients route or dedupe by (every property costs encoding)
            properties = Basic.Properties(
                content_type=CONTENT_TYPE,
                delivery_mode=PERSISTENT,
                message_id=envelope.id,
                message_type=envelope.type,
                headers=headers,
            )
            await self._publish(self.exchange_name, envelope.to_json(), properties, envelope.type)
        child(MESSAGES_PUBLISHED, envelope.source, envelope.type).inc()

    async def publish_many(self, envelopes: Sequence[Envelope]) -> list[BaseException | None]:
        """Publish all at once so their confirms overlap; one result per envelope.

        Cancelling the caller cancels them all (``gather`` raises it).
        """
        results = await asyncio.gather(
            *(self.publish(envelope) for envelope in envelopes), return_exceptions=True
        )
        return [result if isinstance(result, BaseException) else None for result in results]

    async def _publish(
        self, exchange: str, body: bytes, properties: Basic.Properties, routing_key: str
    ) -> None:
        # straight to the channel under aio-pika's Exchange.publish, which does no more
        # than this once it has built an aio_pika.Message: building one costs more
        publishing = self._publish_channel()
        try:
            channel = await publishing.get_underlay_channel()
            await channel.basic_publish(
                body,
                exchange=exchange,
                routing_key=routing_key,
                properties=properties,
                mandatory=True,
                timeout=self.confirm_timeout,
            )
        except aiormq.exceptions.DeliveryError as error:
            if isinstance(error.frame, Basic.Return):
                raise Unroutable(f"no queue is bound to routing key {routing_key!r}") from None
            raise Nacked(f"the broker refused {routing_key!r} (nack)") from None
        except (TimeoutError, OSError, aiormq.exceptions.AMQPError, RuntimeError) as error:
            raise BrokerUnavailable(f"publish of {routing_key!r} not confirmed: {error}") from error
        except asyncio.CancelledError as error:
            if being_cancelled():
                raise
            # aiormq fails the confirms of a connection it gave up on (heartbeats missed)
            # with CancelledError: to the caller that is a lost publish, not its own end
            raise BrokerUnavailable(
                f"publish of {routing_key!r} lost with the connection"
            ) from error

    def _publish_channel(self) -> AbstractRobustChannel:
        if self._channel is None:
            raise BrokerUnavailable("the broker is not connected; call connect() first")
        return self._channel

    async def declare(self, queue: str, patterns: Sequence[str]) -> None:
        """Declare ``queue`` with its retry queues and DLQ, bound to ``patterns``."""
        await self._declare(self._publish_channel(), queue, patterns)

    async def _declare(
        self, channel: AbstractRobustChannel, queue: str, patterns: Sequence[str]
    ) -> AbstractQueue:
        dlq = await channel.declare_queue(dead_letter_queue(queue), durable=True, arguments=_QUORUM)
        await dlq.bind(self.dlx_name, routing_key=queue)
        for delay in sorted(set(self.retry_delays_ms)):
            await channel.declare_queue(
                retry_queue(queue, delay),
                durable=True,
                arguments={
                    **_QUORUM,
                    "x-message-ttl": delay,
                    "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": queue,
                },
            )
        main = await channel.declare_queue(
            queue,
            durable=True,
            arguments={
                **_QUORUM,
                "x-dead-letter-exchange": self.dlx_name,
                "x-dead-letter-routing-key": queue,
                "x-delivery-limit": self.delivery_limit,
            },
        )
        for pattern in patterns:
            await main.bind(self.exchange_name, routing_key=pattern)
        return main

    async def consume(
        self, queue: str, patterns: Sequence[str], handler: Handler, registry: MessageRegistry
    ) -> Consumer:
        """Consume ``queue`` on a channel of its own with ``prefetch`` messages in flight."""
        channel = await self.connection.channel()
        await channel.set_qos(prefetch_count=self.prefetch)
        declared = await self._declare(channel, queue, patterns)
        consumer = _AmqpConsumer(self, channel, declared, handler, registry)
        await consumer.start()
        self._consumers.append(consumer)
        return consumer

    async def subscribe(
        self, patterns: Sequence[str], handler: Handler, registry: MessageRegistry
    ) -> Consumer:
        """Watch ``patterns`` on a server-named exclusive queue, deleted when we go.

        An observer that falls behind (a ``tail`` piped into a pager) loses its oldest
        messages past ``OBSERVER_BACKLOG``, rather than filling the broker's memory until
        its alarm stops every publisher.
        """
        channel = await self.connection.channel()
        await channel.set_qos(prefetch_count=self.prefetch)
        queue = await channel.declare_queue(
            exclusive=True,
            auto_delete=True,
            arguments={"x-max-length": OBSERVER_BACKLOG, "x-overflow": "drop-head"},
        )
        for pattern in patterns:
            await queue.bind(self.exchange_name, routing_key=pattern)
        consumer = _AmqpConsumer(self, channel, queue, handler, registry, transient=True)
        await consumer.start()
        self._consumers.append(consumer)
        return consumer

    async def dead_letters(self, queue: str, limit: int = 100) -> list[DeadLetter]:
        """Read up to ``limit`` dead letters and leave them in the queue.

        Messages are fetched unacked on a throwaway channel; closing it returns them all,
        but not necessarily in their order (RabbitMQ 3.10 gives back more than 32 in hash
        order). For an inspection that keeps the order, see ``microshop dlq list``.
        """
        channel = await self.connection.channel()
        letters: list[DeadLetter] = []
        try:
            dlq = await channel.get_queue(dead_letter_queue(queue), ensure=True)
            while len(letters) < limit:
                message = await dlq.get(no_ack=False, fail=False)
                if message is None:
                    break
                letters.append(
                    dead_letter_from(queue, message.body, message.headers, message.message_id)
                )
        finally:
            await channel.close()
        return letters

    async def send_to_queue(
        self, queue: str, message: AbstractIncomingMessage, headers: dict[str, Any]
    ) -> None:
        """Copy a delivery straight to ``queue`` (default exchange) with extra headers."""
        properties = Basic.Properties(
            headers={**(message.headers or {}), **headers},
            content_type=message.content_type,
            delivery_mode=PERSISTENT,
            message_id=message.message_id,
            message_type=message.type,
        )
        await self._publish("", message.body, properties, queue)  # "": the default exchange


def dead_letter_queue(queue: str) -> str:
    """Where ``queue``'s dead letters are kept."""
    return f"{queue}.dlq"


def retry_queue(queue: str, delay_ms: int) -> str:
    """The name of ``queue``'s retry queue for one delay."""
    return f"{queue}.retry.{delay_ms}ms"


class _AmqpConsumer:
    HAND_BACK_AFTER = 1.0  # seconds before a message that could not be settled goes back

    def __init__(
        self,
        broker: AmqpBroker,
        channel: AbstractRobustChannel,
        queue: AbstractQueue,
        handler: Handler,
        registry: MessageRegistry,
        transient: bool = False,
    ) -> None:
        self._broker = broker
        self._transient = transient
        self._channel = channel
        self._queue = queue
        self._handler = handler
        self._registry = registry
        self._tag: str | None = None
        self._inflight: set[asyncio.Task[Any]] = set()
        self._acks = _Acks()

    async def start(self) -> None:
        self._tag = await self._queue.consume(self._on_message)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._inflight.add(task)
        self._acks.delivered(message)
        try:
            await self._settle(message)
        finally:
            if task is not None:
                self._inflight.discard(task)

    async def _settle(self, message: AbstractIncomingMessage) -> None:
        queue = self._queue.name
        try:
            outcome = await process(
                message.body,
                message.headers or {},
                queue=queue,
                routing_key=message.routing_key or "",
                handler=self._handler,
                registry=self._registry,
                retry_delays_ms=self._broker.retry_delays_ms,
                observer=self._transient,
            )
            # an observer's failures come back as "ack": process() logged them, nothing to keep
            if outcome.action == "retry":
                target = retry_queue(queue, outcome.delay_ms)
                await self._broker.send_to_queue(target, message, headers=outcome.headers)
            elif outcome.action == "dead_letter":
                target = dead_letter_queue(queue)
                await self._broker.send_to_queue(target, message, headers=outcome.headers)
        except (Exception, asyncio.CancelledError) as error:
            if isinstance(error, asyncio.CancelledError) and being_cancelled():
                raise  # stopping: unacked, it comes back when the channel closes
            # Not passed on (a retry or dead-letter queue the broker would not take, a
            # CancelledError from something awaited): hand it back, so the broker delivers
            # it again now rather than when the channel closes. After a pause that grows
            # with each time it came back, or it would come straight back to the same
            # failure and spend the queue's delivery limit in seconds. The inbox makes a
            # second run of work that was done a no-op.
            log.warning("could not settle message; handing it back", error=repr(error))
            # (RabbitMQ 3.13 counts a nack as a delivery; from 4.3 it does not, and the
            # pause would stay at its first step)
            returned = min(counted(message.headers or {}, "x-delivery-count"), 5)
            await asyncio.sleep(min(self.HAND_BACK_AFTER * 2**returned, 30.0))
            await self._acks.handed_back(message)
            return
        self._acks.settled(message)

    async def stop(self, grace: float = 10.0) -> None:
        """Cancel the subscription; give in-flight handlers ``grace`` s, then cancel them."""
        if self._tag is not None and not self._channel.is_closed:
            with contextlib.suppress(aiormq.exceptions.AMQPError, RuntimeError):
                await self._queue.cancel(self._tag)
        self._tag = None
        # past the grace period: roll back; the unacked message returns to the queue
        await finish_or_cancel(self._inflight, grace)
        await self._acks.sent()
        with contextlib.suppress(aiormq.exceptions.AMQPError, RuntimeError):
            await self._channel.close()
        if self in self._broker._consumers:
            self._broker._consumers.remove(self)


class _Acks:
    """The acks of one consumer, coalesced: what settles in one turn of the loop goes out
    together, as one ``multiple`` ack where the delivery tags allow it.

    An ack covering tags up to N is only sent when no tag below N on that channel is still
    being handled, so a message never counts as done before it is. No ack waits longer than
    the current turn of the loop, so a slow handler never holds back the others' acks: the
    ones it would be covered with go one by one. A channel that closed meanwhile gets no
    acks; the broker delivers its unacked messages again, and the inbox skips them.
    """

    def __init__(self) -> None:
        self._open: dict[AbstractChannel, set[int]] = {}  # delivered, not yet settled
        self._settled: list[AbstractIncomingMessage] = []
        self._flush: asyncio.Task[None] | None = None

    def delivered(self, message: AbstractIncomingMessage) -> None:
        """A delivery arrived: its tag is outstanding until it is settled."""
        channel = _channel_of(message)
        if channel is None:
            return  # closed already: it will get no ack, and comes again
        if channel not in self._open:  # a new channel: forget the ones that closed
            for closed in [known for known in self._open if known.is_closed]:
                del self._open[closed]
        self._open.setdefault(channel, set()).add(message.delivery_tag or 0)

    def settled(self, message: AbstractIncomingMessage) -> None:
        """The delivery is done with: ack it in this turn of the loop's batch."""
        self._settled.append(message)
        if self._flush is None:
            self._flush = asyncio.get_running_loop().create_task(self._send())

    async def handed_back(self, message: AbstractIncomingMessage) -> None:
        """The delivery was not dealt with: nack it (requeued), so the broker delivers it
        again. Its tag stays outstanding until the nack is written, so no ``multiple``
        ack covers it first."""
        channel, tag = _channel_of(message), message.delivery_tag or 0
        if channel is None:
            return  # closed: the broker delivers it again anyway
        try:
            await channel.basic_nack(tag, requeue=True)
        except (aiormq.exceptions.AMQPError, RuntimeError, ConnectionError) as error:
            log.warning("nack not sent; the broker will deliver it again", error=str(error))
        finally:
            self._open.get(channel, set()).discard(tag)

    async def sent(self) -> None:
        """Wait for the acks in hand to be written (before the channel closes)."""
        while self._flush is not None:
            await asyncio.shield(self._flush)

    async def _send(self) -> None:
        try:
            batch, self._settled = self._settled, []
            by_channel: dict[AbstractChannel, list[AbstractIncomingMessage]] = {}
            for message in batch:
                # one whose channel closed gets no ack: the broker delivers it again
                if (channel := _channel_of(message)) is not None:
                    by_channel.setdefault(channel, []).append(message)
            for channel, messages in by_channel.items():
                await self._ack(channel, messages)
        finally:
            self._flush = None
            if self._settled:  # settled while this batch was being written
                self._flush = asyncio.get_running_loop().create_task(self._send())

    async def _ack(self, channel: AbstractChannel, messages: list[AbstractIncomingMessage]) -> None:
        outstanding = self._open.get(channel, set())
        tags = sorted(message.delivery_tag or 0 for message in messages)
        outstanding.difference_update(tags)
        if channel.is_closed:
            self._open.pop(channel, None)
            return
        floor = min(outstanding, default=None)
        covered = [tag for tag in tags if floor is None or tag < floor]
        try:
            if covered:
                await channel.basic_ack(covered[-1], multiple=True)
            for tag in tags[len(covered) :]:
                await channel.basic_ack(tag)
        except (aiormq.exceptions.AMQPError, RuntimeError, ConnectionError) as error:
            log.warning("acks not sent; the broker will deliver those again", error=str(error))


def _channel_of(message: AbstractIncomingMessage) -> AbstractChannel | None:
    """The channel ``message`` came on, or None once that closed (aio-pika raises then)."""
    try:
        return message.channel
    except aio_pika.exceptions.ChannelInvalidStateError:
        return None
