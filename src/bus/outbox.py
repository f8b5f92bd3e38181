"""The transactional outbox and its relay.

A handler's state changes and the messages they cause are written in one transaction
(:class:`bus.transactions.UnitOfWork`), the messages to the outbox table here. The
:class:`OutboxRelay` publishes them with publisher confirms and marks a row published
only once the broker confirmed it. A crash between the two publishes the row again;
consumers drop the copy by message id (the inbox).

The relay has two ways to a row. Right after a commit it publishes what that transaction
wrote from memory, and marks the rows in one statement: no claim, no re-read, and on
PostgreSQL no transaction. What that misses (the broker was down, the process died,
another instance wrote it) the relay's poll finds once it is ``fresh_seconds`` old,
claims, and publishes. Either way a row may go out twice (a crash, a stall longer than
``fresh_seconds``); consumers drop the copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
    bindparam,
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from bus.broker import Broker, Unroutable, being_cancelled
from bus.db import BUS_METADATA, Database, dialect_of
from bus.envelope import MESSAGE_ID_LENGTH, Envelope
from bus.observability import (
    EVENTS_UNHEARD,
    OUTBOX_BACKLOG,
    OUTBOX_PUBLISHED,
    child,
)
from bus.prepared import Prepared, as_arrays, unnested, where_among

log = structlog.get_logger("bus.outbox")

outbox_table = Table(
    "outbox",
    BUS_METADATA,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    Column("message_id", String(MESSAGE_ID_LENGTH), nullable=False, unique=True),
    Column("type", String(200), nullable=False),
    Column("kind", String(10), nullable=False),
    Column("body", LargeBinary, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", DateTime(timezone=True)),
    Column("last_error", Text),
    Column("published_at", DateTime(timezone=True)),
    Column("failed_at", DateTime(timezone=True)),
)
_pending = outbox_table.c.published_at.is_(None) & outbox_table.c.failed_at.is_(None)
Index("outbox_pending", outbox_table.c.id, postgresql_where=_pending, sqlite_where=_pending)


# built once: building a statement costs more than sending it
_INSERT = insert(outbox_table)
# on PostgreSQL the rows go as arrays, one element a row: one statement for a group's rows,
# where a statement per row (executemany) costs the server an execution each
_INSERT_ALL = Prepared(
    insert(outbox_table).from_select(
        ["message_id", "type", "kind", "body", "created_at"],
        select(
            unnested("message_ids", String),
            unnested("types", String),
            unnested("kinds", String),
            unnested("bodies", LargeBinary),
            bindparam("created_at", type_=DateTime(timezone=True)),
        ),
    )
)
_MARK_PUBLISHED = where_among(
    update(outbox_table).values(published_at=bindparam("published_at")),
    outbox_table.c.message_id,
    "message_ids",
)


def _now() -> datetime:
    return datetime.now(UTC)


# what a transaction wrote to the outbox, handed to the relay once it has committed
Committed = Sequence[tuple[Envelope, str]]  # (envelope, kind)


async def write_outbox(session: AsyncConnection, messages: Committed) -> None:
    """Write ``messages`` to the outbox in one statement, in the caller's transaction."""
    if not messages:
        return
    now = _now()
    rows = [
        {"message_id": e.id, "type": e.type, "kind": kind, "body": e.to_json(), "created_at": now}
        for e, kind in messages
    ]
    if dialect_of(session) == "postgresql":
        arrays = as_arrays(
            rows, message_ids="message_id", types="type", kinds="kind", bodies="body"
        )
        await _INSERT_ALL.run(session, arrays | {"created_at": now})
    else:
        await session.execute(_INSERT, rows)


@dataclass(slots=True)
class _Sent:
    """What one publish round came to: rows done with, rows to try again, confirms."""

    confirmed: int
    done: list[str] = field(default_factory=list)  # message ids
    failed: list[tuple[str, int, BaseException]] = field(default_factory=list)


class OutboxRelay:
    """Publishes outbox rows with confirms and marks them sent.

    What a transaction of this process wrote goes out as soon as it commits (see
    :meth:`committed`). The poll, every ``poll_seconds``, publishes the rest in order of
    writing: rows older than ``fresh_seconds`` that no relay marked, and rows whose retry
    is due. On PostgreSQL the poll claims rows with ``FOR UPDATE SKIP LOCKED``, so several
    instances of one service can relay side by side without publishing a row twice at once.
    """

    def __init__(
        self,
        db: Database,
        broker: Broker,
        *,
        service: str,
        batch_size: int = 200,
        poll_seconds: float = 1.0,
        max_attempts: int = 12,
        retention: timedelta = timedelta(days=1),
        fresh_seconds: float = 2.0,
    ) -> None:
        self.db = db
        self.broker = broker
        self.service = service
        self.batch_size = batch_size
        self.poll_seconds = poll_seconds
        self.max_attempts = max_attempts
        self.retention = retention
        self.fresh_seconds = fresh_seconds
        self._fresh: list[tuple[Envelope, str, float]] = []  # (envelope, kind, committed at)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._marking: asyncio.Task[None] | None = None  # the fast path's last mark
        self._stopping = False

    def committed(self, messages: Committed) -> None:
        """A transaction committed these outbox rows: publish them now, from memory."""
        at = time.monotonic()
        self._fresh.extend((envelope, kind, at) for envelope, kind in messages)
        self._wake.set()

    def start(self) -> None:
        """Run the relay loop in the background."""
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name=f"outbox relay {self.service}")

    async def stop(self, grace: float = 10.0) -> None:
        """Stop after the batch in hand; cancel it only if it takes longer than ``grace`` s.

        Cancelling mid-batch would publish rows that the next relay publishes again. Rows
        committed but not yet published stay in the outbox for :meth:`flush`.
        """
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping = True
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), grace)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            marking, self._marking = self._marking, None
            if marking is not None:  # left running by the cancelled relay
                marking.cancel()  # its rows stay unmarked: the next relay sends them
                with contextlib.suppress(asyncio.CancelledError):
                    await marking
        self._fresh.clear()  # they are in the outbox: flush(), or the next relay, sends them

    async def flush(self, grace: float = 10.0) -> int:
        """Publish until nothing is due or ``grace`` s have passed; return how many rows
        are done with."""
        sent = 0
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                while (batch := await self.publish_pending()) > 0:
                    sent += batch
        return sent

    async def _run(self) -> None:
        failures = 0
        loop = asyncio.get_running_loop()
        # the first poll takes every row written before the relay started, however young:
        # an earlier run of this service may have left some behind
        started: datetime | None = _now()
        polled = loop.time() - self.poll_seconds
        while not self._stopping:
            self._wake.clear()
            try:
                if self._fresh:
                    await self._publish_fresh()
                if loop.time() - polled >= self.poll_seconds:
                    await self._marked()
                    polled = loop.time()
                    fresh = self.fresh_seconds
                    while await self.publish_pending(fresh, started) >= self.batch_size:
                        pass
                    started = None
                    OUTBOX_BACKLOG.labels(self.service).set(await self.backlog())
                failures = 0
            except (Exception, asyncio.CancelledError) as error:
                if isinstance(error, asyncio.CancelledError) and being_cancelled():
                    raise  # stopped
                # anything else, a CancelledError some library passed on included, must not
                # end the relay: rows would wait in the outbox until the next restart
                failures += 1
                log.exception("outbox relay failed; backing off", failures=failures)
                await asyncio.sleep(min(0.1 * 2**failures, 5.0))
                continue
            if self._fresh:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), polled + self.poll_seconds - loop.time())
        await self._marked()

    async def _publish_fresh(self) -> None:
        """Publish rows just committed, straight from memory; mark them in one statement,
        while the next batch goes out.

        Rows the broker did not take are postponed like the poll's; the poll retries them.
        """
        taken, self._fresh = self._fresh[: self.batch_size], self._fresh[self.batch_size :]
        # a row that waited here half as long as the poll leaves rows alone may be the
        # poll's by the time it goes out: leave it to the poll rather than send it twice
        young = time.monotonic() - self.fresh_seconds / 2
        batch = [(envelope, kind, 0) for envelope, kind, at in taken if at >= young]
        if batch:
            sent = await self._publish(batch)
            # the next batch goes out while this one is marked: a mark waits for its commit
            # (a disk flush), and commits landing meanwhile would wait for it too
            await self._marked()
            self._marking = asyncio.create_task(self._mark(sent))

    async def _mark(self, sent: _Sent) -> None:
        async with self.db.one_statement_each() as session:
            await self._record(session, sent)

    async def _marked(self) -> None:
        """Wait for the fast path's last mark. One that failed leaves its rows unmarked:
        the poll sends them again (the inbox drops the copies), and the relay goes on."""
        marking, self._marking = self._marking, None
        if marking is None:
            return
        try:
            await marking
        except Exception:
            log.exception("marking published outbox rows failed; the poll sends them again")

    async def publish_pending(
        self, fresh_seconds: float = 0.0, written_before: datetime | None = None
    ) -> int:
        """Publish one batch of due rows; return how many are done with (confirmed by the
        broker, or events no one subscribes to).

        A row is due when it is at least ``fresh_seconds`` old (younger ones are the fast
        path's to publish), or written before ``written_before`` when that is given, or
        when its retry is due.
        """
        table = outbox_table
        now = _now()
        cutoff = written_before or now - timedelta(seconds=fresh_seconds)
        waited = table.c.next_attempt_at.is_(None) & (table.c.created_at <= cutoff)
        due = _pending & (waited | (table.c.next_attempt_at <= now))
        query = select(table.c.kind, table.c.body, table.c.attempts).where(due)
        query = query.order_by(table.c.id).limit(self.batch_size)
        if self.db.is_postgres:
            query = query.with_for_update(skip_locked=True)
        async with self.db.session() as session, session.begin():
            rows = (await session.execute(query)).all()
            if not rows:
                return 0
            batch = [(Envelope.from_json(row.body), row.kind, row.attempts) for row in rows]
            sent = await self._publish(batch)
            return await self._record(session, sent)

    async def _publish(self, batch: list[tuple[Envelope, str, int]]) -> _Sent:
        """Publish ``(envelope, kind, attempts so far)``; sort out which rows are done."""
        results = await self.broker.publish_many([envelope for envelope, _, _ in batch])
        sent = _Sent(confirmed=sum(error is None for error in results))
        for (envelope, kind, attempts), error in zip(batch, results, strict=True):
            if error is None:
                sent.done.append(envelope.id)
            elif isinstance(error, Unroutable) and kind == "event":
                # an event nobody subscribes to is done, not failed; a command is not
                child(EVENTS_UNHEARD, self.service, envelope.type).inc()
                sent.done.append(envelope.id)
            else:
                sent.failed.append((envelope.id, attempts, error))
        return sent

    async def _record(self, session: AsyncConnection, sent: _Sent) -> int:
        """Mark the rows that are done, postpone the others; how many are done."""
        now = _now()
        if sent.done:
            await _MARK_PUBLISHED.run(session, {"published_at": now, "message_ids": sent.done})
        for message_id, attempts, error in sent.failed:
            await session.execute(self._postpone(message_id, attempts, error, now))
        child(OUTBOX_PUBLISHED, self.service).inc(sent.confirmed)
        return len(sent.done)

    def _postpone(self, message_id: str, attempts: int, error: BaseException, now: datetime) -> Any:
        attempts += 1
        values: dict[str, Any] = {"attempts": attempts, "last_error": f"{error}"[:1000]}
        # a broker outage is waited out; a command whose owner never binds is given up on
        if isinstance(error, Unroutable) and attempts >= self.max_attempts:
            values["failed_at"] = now
            log.error(
                "outbox command unroutable; giving up", message_id=message_id, error=str(error)
            )
        else:
            values["next_attempt_at"] = now + timedelta(seconds=min(0.5 * 2**attempts, 60.0))
            log.warning(
                "outbox publish failed; will retry", message_id=message_id, error=str(error)
            )
        where = outbox_table.c.message_id == message_id
        return update(outbox_table).where(where).values(**values)

    async def backlog(self) -> int:
        """How many rows wait to be published."""
        async with self.db.reading() as session:
            query = select(func.count()).select_from(outbox_table).where(_pending)
            count = await session.scalar(query)
        return int(count or 0)

    async def prune(self) -> None:
        """Delete rows published longer ago than the retention period."""
        async with self.db.session() as session, session.begin():
            cutoff = _now() - self.retention
            await session.execute(delete(outbox_table).where(outbox_table.c.published_at < cutoff))
