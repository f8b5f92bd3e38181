"""How the AMQP consumer coalesces its acks, against a channel that records them."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from bus.amqp import _Acks


@dataclass(eq=False)
class Channel:
    is_closed: bool = False
    acks: list[tuple[int, bool]] = field(default_factory=list)

    async def basic_ack(self, tag: int, multiple: bool = False) -> None:
        self.acks.append((tag, multiple))


@dataclass
class Message:
    channel: Channel
    delivery_tag: int


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

    assert old.acks == []
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
