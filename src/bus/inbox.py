"""The idempotent consumer: a handler's effects and "message seen" commit together.

The inbox records ``(consumer, message id)`` in the same transaction as the handler's
changes and outgoing messages. A redelivered message (the broker never saw our ack, or
the relay published a row twice) finds its id already there and changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import structlog
from prometheus_client import Counter, Histogram
from sqlalchemy import Column, DateTime, String, Table, delete
from sqlalchemy.ext.asyncio import AsyncConnection

from bus.broker import Delivery, Handler
from bus.db import BUS_METADATA, insert_or_skip
from bus.outbox import Transactions, UnitOfWork, write_outbox

log = structlog.get_logger("bus.inbox")

DUPLICATES = Counter(
    "microshop_messages_duplicate_total", "Redelivered messages the inbox skipped", ["consumer"]
)
GROUP_SIZES = Histogram(
    "microshop_messages_per_transaction",
    "Messages committed together by one transaction (group commit)",
    ["consumer"],
    buckets=(1, 2, 4, 8, 16, 32, 64),
)

inbox_table = Table(
    "inbox",
    BUS_METADATA,
    Column("consumer", String(100), primary_key=True),
    Column("message_id", String(64), primary_key=True),
    Column("processed_at", DateTime(timezone=True), nullable=False, index=True),
)

UnitHandler = Callable[[Delivery, UnitOfWork], Awaitable[None]]


async def claim(session: AsyncConnection, consumer: str, message_id: str) -> bool:
    """Record that ``consumer`` handles ``message_id``; False if it already did.

    ``ON CONFLICT DO NOTHING`` keeps the transaction usable on a duplicate, and on
    PostgreSQL a concurrent copy waits on the key until the first commits.
    """
    row = {"consumer": consumer, "message_id": message_id, "processed_at": datetime.now(UTC)}
    result = await session.execute(insert_or_skip(session, inbox_table), row)
    return bool(result.rowcount)


def idempotent(transactions: Transactions, consumer: str, handler: UnitHandler) -> Handler:
    """Wrap ``handler`` so each message id takes effect once for ``consumer``.

    The handler gets a :class:`UnitOfWork` whose changes, outgoing messages and inbox
    mark commit together; the broker acks only after that commit.
    """

    async def handle(delivery: Delivery) -> None:
        async with transactions.begin(causation=delivery.envelope) as unit:
            if not await claim(unit.session, consumer, delivery.envelope.id):
                DUPLICATES.labels(consumer).inc()
                log.info("duplicate message skipped", consumer=consumer)
                return
            await handler(delivery, unit)

    return handle


def grouped(
    transactions: Transactions,
    consumer: str,
    handler: UnitHandler,
    *,
    max_size: int = 32,
    lanes: int = 2,
) -> Handler:
    """Like :func:`idempotent`, but messages that arrive together share one transaction.

    Group commit. The first message of a group opens the transaction; messages that
    arrive while it works join the group (up to ``max_size``) and take their turns on the
    same connection. Up to ``lanes`` groups take messages side by side, so a message that
    arrives while one group works starts another rather than waiting for it. Each member
    runs in its own task, so it keeps its trace and log context, with a
    :class:`UnitOfWork` of its own (its messages name it as their cause). When no one
    waits for a turn, the first writes every unit's outbox rows in one statement and
    commits; only then are the messages acked. One BEGIN, COMMIT and outbox write serve the whole
    group, and the relay gets its messages as one batch.

    When any handler of a group fails, the group is rolled back and each of its messages
    runs again alone, as :func:`idempotent` runs it: the one that failed gets its retry or
    dead letter, the others commit by themselves. Handlers of one group run one after
    another and hold their row locks until the group commits, so a handler that waits on
    something slow (a remote call) should not be grouped: ``max_size=1`` turns it off.
    Two groups side by side may deadlock on rows they lock in opposite orders; PostgreSQL
    fails one of them, and its messages run again alone.
    """
    alone = idempotent(transactions, consumer, handler)
    if max_size <= 1:
        return alone
    forming: list[_Group] = []  # groups still taking turns, at most ``lanes``

    async def take_turn(group: _Group, delivery: Delivery) -> None:
        if group.session is None or group.failed:
            return  # the group is over, or going to be rolled back: this runs alone later
        unit = UnitOfWork(group.session, transactions.source, delivery.envelope)
        try:
            if not await claim(group.session, consumer, delivery.envelope.id):
                DUPLICATES.labels(consumer).inc()
                log.info("duplicate message skipped", consumer=consumer)
                return
            await handler(delivery, unit)
        except BaseException:  # cancelled mid-statement too: the transaction is spoilt
            group.failed = True
            raise
        group.units.append(unit)

    async def lead(group: _Group, delivery: Delivery) -> bool:
        committed = False
        await group.turn.acquire()  # a new group's: free
        held = True
        try:
            async with transactions.db.session() as session, session.begin():
                group.session = session
                with contextlib.suppress(Exception):  # failed: runs alone below
                    await take_turn(group, delivery)
                while group.waiting:  # the messages that joined meanwhile take their turns
                    group.turn.release()
                    held = False
                    await group.turn.acquire()
                    held = True
                if group in forming:
                    forming.remove(group)  # what arrives from now on goes elsewhere
                if group.failed:
                    raise _RollBack
                await write_outbox(session, [m for u in group.units for m in u.written()])
            committed = True
        except _RollBack:
            log.info("group of messages rolled back; each runs alone", size=group.size)
        except Exception:
            log.warning("group of messages failed; each runs alone", exc_info=True)
        finally:
            group.session = None  # no one takes a turn on it any more
            if held:
                group.turn.release()
            if group in forming:
                forming.remove(group)
            group.done.set_result(committed)
        if committed:
            GROUP_SIZES.labels(consumer).observe(group.size)
            transactions.committed(*group.units)
        return committed

    async def join(group: _Group, delivery: Delivery) -> bool:
        group.waiting += 1
        try:
            await group.turn.acquire()
        finally:
            group.waiting -= 1
        try:
            with contextlib.suppress(Exception):  # failed: runs alone once the group is over
                await take_turn(group, delivery)
        finally:
            group.turn.release()
        # shielded: a cancelled member must not cancel the answer the others wait for
        return await asyncio.shield(group.done)

    async def handle(delivery: Delivery) -> None:
        open_groups = [group for group in forming if group.size < max_size]
        if len(forming) < lanes or not open_groups:
            group = _Group(asyncio.get_running_loop().create_future())
            forming.append(group)
            committed = await lead(group, delivery)
        else:
            group = min(open_groups, key=lambda g: g.waiting)
            group.size += 1
            committed = await join(group, delivery)
        if not committed:
            await alone(delivery)  # in a transaction of its own, with an outcome of its own

    return handle


class _RollBack(Exception):
    """A handler of the group failed: undo the group's work."""


@dataclass(eq=False)
class _Group:
    """Messages sharing one transaction; one holds ``turn`` and the connection at a time."""

    done: asyncio.Future[bool]  # True once committed; False: each message runs alone
    turn: asyncio.Lock = field(default_factory=asyncio.Lock)
    session: AsyncConnection | None = None
    units: list[UnitOfWork] = field(default_factory=list)
    size: int = 1
    waiting: int = 0  # members queued for their turn
    failed: bool = False


async def prune(session: AsyncConnection, older_than: timedelta) -> None:
    """Forget inbox entries older than ``older_than`` (duplicates arrive within minutes)."""
    cutoff = datetime.now(UTC) - older_than
    await session.execute(delete(inbox_table).where(inbox_table.c.processed_at < cutoff))
