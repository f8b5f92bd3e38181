"""``microshop dlq list|replay|purge``: the operations of :mod:`.dead_letters`, reported."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from typing import Any

from bus.amqp import dead_letter_queue
from bus.broker import DeadLetter
from bus.settings import Settings
from microshop.catalogue import SERVICES
from microshop.ops import OpsError, connected
from microshop.ops.dead_letters import (
    dead_letter_count,
    list_dead_letters,
    purge,
    replay,
)


def counted(count: int) -> str:
    """``1 dead letter``, ``2 dead letters``."""
    return f"{count} dead letter{'' if count == 1 else 's'}"


def describe(letter: DeadLetter) -> str:
    """One line: id, type, attempts, why and when it failed (the reason's first line)."""
    reason = letter.reason.splitlines()[0] if letter.reason else "-"
    return (
        f"  {letter.message_id or '-'}  {letter.routing_key or '-'}  attempts={letter.attempts}"
        f"  cause={letter.cause}  failed_at={letter.failed_at or '-'}  {reason}"
    )


def as_json(letter: DeadLetter) -> dict[str, Any]:
    """Everything known of a dead letter, its body as text."""
    return {
        "queue": letter.queue,
        "id": letter.message_id,
        "routing_key": letter.routing_key,
        "attempts": letter.attempts,
        "cause": letter.cause,
        "reason": letter.reason,
        "failed_at": letter.failed_at,
        "body": letter.body.decode("utf-8", errors="replace"),
    }


async def list_letters(
    settings: Settings, queues: Sequence[str] | None, *, json_lines: bool
) -> int:
    """Print the dead letters of ``queues``; by default of every service that has a DLQ."""
    named = queues is not None
    found = 0
    async with connected(settings) as broker:
        for queue in queues if queues is not None else SERVICES:
            try:
                letters = await list_dead_letters(broker, queue)
            except OpsError:
                if named:
                    raise
                continue  # this service has no dead-letter queue (yet)
            found += 1
            if json_lines:
                for letter in letters:
                    print(json.dumps(as_json(letter)))
                continue
            print(f"{dead_letter_queue(queue)}: {counted(len(letters))}")
            for letter in letters:
                print(describe(letter))
    if not named and not found:
        print(f"no dead-letter queues ({', '.join(map(dead_letter_queue, SERVICES))})")
    return 0


async def replay_letters(settings: Settings, queue: str, *, message_id: str | None) -> int:
    """Replay the dead letter with ``message_id``, or every one when it is None."""
    async with connected(settings) as broker:
        sent = await replay(
            broker, queue, lambda letter: message_id is None or letter.message_id == message_id
        )
    if message_id is not None and not sent:
        raise OpsError(f"no dead letter with id {message_id!r} in {dead_letter_queue(queue)}")
    print(f"replayed {counted(len(sent))} from {dead_letter_queue(queue)} to {queue}")
    return 0


async def purge_letters(
    settings: Settings, queue: str, *, ask: Callable[[str], bool] | None
) -> int:
    """Delete every dead letter of ``queue``, after ``ask`` says yes (None: do not ask);
    asked, only the letters counted in the question go."""
    dlq = dead_letter_queue(queue)
    async with connected(settings) as broker:
        count = None
        if ask is not None:
            count = await dead_letter_count(broker, queue)
            if count == 0:
                print(f"{dlq} has no dead letters")
                return 0
            # asked in a thread: the connection keeps its heartbeats while a person thinks
            if not await asyncio.to_thread(ask, f"delete {counted(count)} from {dlq} for good?"):
                raise OpsError("nothing was purged")
        purged = await purge(broker, queue, at_most=count)
    print(f"purged {counted(purged)} from {dlq}")
    return 0
