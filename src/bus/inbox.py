"""The idempotent consumer: a handler's effects and "message seen" commit together.

The inbox records ``(consumer, message id)`` in the same transaction as the handler's
changes and outgoing messages. A redelivered message (the broker never saw our ack, or
the relay published a row twice) finds its id already there and changes nothing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta

import structlog
from prometheus_client import Counter
from sqlalchemy import Column, DateTime, String, Table, bindparam, delete, select
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection

from bus.broker import Delivery, Handler
from bus.db import BUS_METADATA, dialect_of
from bus.envelope import MESSAGE_ID_LENGTH
from bus.prepared import Prepared, insert_or_skip, unnested
from bus.transactions import Claim, Once, Transactions, UnitOfWork

log = structlog.get_logger("bus.inbox")

DUPLICATES = Counter(
    "microshop_messages_duplicate_total", "Redelivered messages the inbox skipped", ["consumer"]
)

inbox_table = Table(
    "inbox",
    BUS_METADATA,
    Column("consumer", String(100), primary_key=True),
    Column("message_id", String(MESSAGE_ID_LENGTH), primary_key=True),
    Column("processed_at", DateTime(timezone=True), nullable=False, index=True),
)

_CLAIM_ONE = insert_or_skip(inbox_table)
# PostgreSQL takes every id of a group's wave in one statement
_CLAIM_ALL = Prepared(
    postgresql.insert(inbox_table)
    .from_select(
        ["consumer", "message_id", "processed_at"],
        select(
            bindparam("consumer", type_=String),
            unnested("message_ids", String),
            bindparam("processed_at", type_=DateTime(timezone=True)),
        ),
    )
    .on_conflict_do_nothing()
    .returning(inbox_table.c.message_id)
)

UnitHandler = Callable[[Delivery, UnitOfWork], Awaitable[None]]


def claims_of(consumer: str) -> Claim:
    """Record that ``consumer`` handles these message ids; the ones it had not before.

    ``ON CONFLICT DO NOTHING`` keeps the transaction usable on a duplicate, and on
    PostgreSQL a concurrent copy waits on the key until the first commits. There the ids
    go in one statement; elsewhere (SQLite) one statement each.
    """

    async def claim_all(session: AsyncConnection, message_ids: Sequence[str]) -> set[str]:
        now = datetime.now(UTC)
        if dialect_of(session) == "postgresql":
            claims = {"consumer": consumer, "message_ids": list(message_ids), "processed_at": now}
            return {row["message_id"] for row in await _CLAIM_ALL.rows(session, claims)}
        fresh = set()
        for message_id in message_ids:
            row = {"consumer": consumer, "message_id": message_id, "processed_at": now}
            if await _CLAIM_ONE.run(session, row):
                fresh.add(message_id)
        return fresh

    return claim_all


def idempotent(transactions: Transactions, consumer: str, handler: UnitHandler) -> Handler:
    """Wrap ``handler`` so each message id takes effect once for ``consumer``.

    The handler gets a :class:`UnitOfWork` whose changes, outgoing messages and inbox mark
    commit together, in a transaction shared with the messages that arrive at the same
    moment (see :meth:`Transactions.together`), which claims their ids together; the
    broker acks only after that commit. A handler whose group fails runs again alone,
    so it gets its own retry or dead letter and the others commit.
    """
    claim_all = claims_of(consumer)

    async def handle(delivery: Delivery) -> None:
        async def work(unit: UnitOfWork) -> bool:
            if not unit.claimed:
                return False
            await handler(delivery, unit)
            return True

        # counted once it is settled: a group that rolls back runs ``work`` again
        once = Once(delivery.envelope.id, claim_all)
        if not await transactions.together(work, causation=delivery.envelope, once=once):
            DUPLICATES.labels(consumer).inc()
            log.info("duplicate message skipped", consumer=consumer)

    return handle


async def prune(session: AsyncConnection, older_than: timedelta) -> None:
    """Forget inbox entries older than ``older_than`` (duplicates arrive within minutes)."""
    cutoff = datetime.now(UTC) - older_than
    await session.execute(delete(inbox_table).where(inbox_table.c.processed_at < cutoff))
