"""``microshop dlq``: look at a service's dead letters, send them back to it, or drop them.

Listing and replaying are one *pass* over ``<queue>.dlq``: each dead letter there when
the pass starts is taken once (``basic.get``), published where it belongs with publisher
confirms, and acked only then. A crash between the two leaves one copy too many (the
service's inbox drops a second replay of one id), never one too few.

Why not peek by taking messages unacked and giving them back: on quorum queues that
reorders them. Measured on RabbitMQ 3.10: a ``nack(requeue)`` puts the message at the
back, and closing the channel returns more than 32 held messages in hash order; neither
is promised across versions. Publishing each message again behind the others and then
acking it keeps their order on any version and raises no delivery count. A letter that
is dead-lettered during a pass lands among those put back; those keep their order.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import aiormq
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustChannel

from bus.amqp import AmqpBroker, dead_letter_queue
from bus.broker import ATTEMPT_HEADER, ROUTING_KEY_HEADER, DeadLetter, Unroutable, dead_letter_from
from microshop.ops import OpsError

Choose = Callable[[DeadLetter], bool]


async def list_dead_letters(broker: AmqpBroker, queue: str) -> list[DeadLetter]:
    """Every dead letter of ``queue``, oldest first, left in place and in order.

    What is put back is the kit's copy of a delivery: body, id, type, content type and
    headers, as the kit keeps them when it dead-letters (see ``AmqpBroker.send_to_queue``).
    """
    kept, _ = await _pass(broker, queue, replay=lambda _: False)
    return kept


async def replay(broker: AmqpBroker, queue: str, choose: Choose) -> list[DeadLetter]:
    """Send the chosen dead letters back to ``queue``; return those sent.

    Each goes to ``queue`` itself through the default exchange, as the kit's retries do,
    not to the topic exchange: the other services bound to its type handled it when it
    was first published, and must not get it twice. Its id, type, body and headers are
    kept, ``x-microshop-routing-key`` included, so the handler sees the message as first
    sent and a new failure is filed under the original routing key. The attempt count
    starts again, so a replayed message gets every retry a new one would.
    """
    _, replayed = await _pass(broker, queue, replay=choose)
    return replayed


async def dead_letter_count(broker: AmqpBroker, queue: str) -> int:
    """How many dead letters ``queue`` has."""
    channel = await broker.connection.channel()
    try:
        dlq = await _existing(channel, queue)
        return _count(dlq)
    finally:
        await _close(channel)


async def purge(broker: AmqpBroker, queue: str, at_most: int | None = None) -> int:
    """Delete the dead letters of ``queue``: every one, or the first ``at_most`` (those a
    person counted and agreed to; one dead-lettered since stays). Return how many."""
    channel = await broker.connection.channel()
    try:
        dlq = await _existing(channel, queue)
        if at_most is None:
            purged = await dlq.purge()
            return int(purged.message_count or 0) if purged else 0
        deleted = 0
        # taken without acks: each is gone as it is handed over (one round trip a letter)
        while deleted < at_most and await dlq.get(no_ack=True, fail=False):
            deleted += 1
        return deleted
    finally:
        await _close(channel)


async def _pass(
    broker: AmqpBroker, queue: str, *, replay: Choose
) -> tuple[list[DeadLetter], list[DeadLetter]]:
    dlq_name = dead_letter_queue(queue)
    kept: list[DeadLetter] = []
    replayed: list[DeadLetter] = []
    channel = await broker.connection.channel()
    try:
        dlq = await _existing(channel, queue)
        # bounded by the count at the start: a letter put back (or failing again after a
        # replay) is not met twice in one pass
        for _ in range(_count(dlq)):
            message = await dlq.get(no_ack=False, fail=False)
            if message is None:
                break
            letter = _letter(queue, message)
            if replay(letter):
                await _send(broker, queue, message, _replay_headers(letter))
                replayed.append(letter)
            else:
                await _send(broker, dlq_name, message, {})
                kept.append(letter)
            await message.ack()
    finally:
        # whatever was taken and not yet acked goes back: possibly out of order, never lost
        await _close(channel)
    return kept, replayed


def _letter(queue: str, message: AbstractIncomingMessage) -> DeadLetter:
    """A dead letter as the kit describes one, with its id and original routing key.

    A letter the broker dead-lettered itself (past the delivery limit) has none of the
    kit's headers: its id is read from the body and its routing key from ``x-death``.
    """
    headers: dict[str, Any] = dict(message.headers or {})
    letter = dead_letter_from(queue, message.body, headers, message.message_id or _id_in(message))
    if letter.routing_key:
        return letter
    routing_key = _first_death_routing_key(headers) or message.type or ""
    return dataclasses.replace(letter, routing_key=routing_key)


def _first_death_routing_key(headers: dict[str, Any]) -> str | None:
    deaths = headers.get("x-death")
    if not isinstance(deaths, list) or not deaths or not isinstance(deaths[0], dict):
        return None
    keys = deaths[0].get("routing-keys")
    return str(keys[0]) if isinstance(keys, list) and keys else None


def _id_in(message: AbstractIncomingMessage) -> str | None:
    try:
        body = json.loads(message.body)
    except ValueError:
        return None
    return str(body["id"]) if isinstance(body, dict) and "id" in body else None


def _replay_headers(letter: DeadLetter) -> dict[str, Any]:
    return {ATTEMPT_HEADER: 0, ROUTING_KEY_HEADER: letter.routing_key}


async def _send(
    broker: AmqpBroker, target: str, message: AbstractIncomingMessage, headers: dict[str, Any]
) -> None:
    try:
        await broker.send_to_queue(target, message, headers)
    except Unroutable:
        raise OpsError(f"queue {target!r} does not exist; nothing more was moved") from None


async def _existing(channel: AbstractRobustChannel, queue: str) -> AbstractQueue:
    name = dead_letter_queue(queue)
    try:
        return await channel.declare_queue(name, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        raise OpsError(
            f"no queue {name!r}: SERVICE is a service's queue name (MICROSHOP_QUEUE, "
            "by default the service's name), and its DLQ exists once the service has run"
        ) from None


def _count(queue: AbstractQueue) -> int:
    result = queue.declaration_result
    return int(result.message_count or 0)


async def _close(channel: AbstractRobustChannel) -> None:
    if not channel.is_closed:
        await channel.close()
