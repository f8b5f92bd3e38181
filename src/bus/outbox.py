"""The transactional outbox and its relay.

A handler's state changes and the messages they cause are written in one transaction
(:class:`UnitOfWork`). The :class:`OutboxRelay` publishes pending rows with publisher
confirms and marks a row published only once the broker confirmed it. A crash between
the two publishes the row again; consumers drop the copy by message id (the inbox).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
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
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from bus.broker import Broker, Unroutable
from bus.db import BUS_METADATA, Database
from bus.envelope import Envelope, Message
from bus.observability import (
    EVENTS_UNHEARD,
    OUTBOX_BACKLOG,
    OUTBOX_PUBLISHED,
    child,
    current_traceparent,
)

log = structlog.get_logger("bus.outbox")

outbox_table = Table(
    "outbox",
    BUS_METADATA,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    Column("message_id", String(64), nullable=False, unique=True),
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


_INSERT = insert(outbox_table)  # built once: building a statement costs more than sending it


def _now() -> datetime:
    return datetime.now(UTC)


class UnitOfWork:
    """One transaction: a handler's changes plus the messages they cause.

    ``publish`` only records a message; it is written to the outbox when the transaction
    commits, and the relay publishes it afterwards.
    """

    def __init__(self, session: AsyncConnection, source: str, causation: Envelope | None) -> None:
        self.session = session
        self.source = source
        self.causation = causation
        self.outgoing: list[Envelope] = []
        self._kinds: list[str] = []

    def publish(self, message: Message, *, correlation_id: str | None = None) -> Envelope:
        """Queue ``message`` for publishing if, and only if, this transaction commits.

        It inherits the correlation id of the message being handled (unless one is
        given) and names it as its cause; the current trace context rides along.
        """
        traceparent, tracestate = current_traceparent()
        envelope = Envelope.wrap(
            message,
            source=self.source,
            causation=self.causation,
            correlation_id=correlation_id,
            traceparent=traceparent,
            tracestate=tracestate,
        )
        self.outgoing.append(envelope)
        self._kinds.append(message.kind)
        return envelope

    async def _write_outbox(self) -> None:
        if not self.outgoing:
            return
        now = _now()
        await self.session.execute(
            _INSERT,
            [
                {
                    "message_id": e.id,
                    "type": e.type,
                    "kind": kind,
                    "body": e.to_json(),
                    "created_at": now,
                }
                for e, kind in zip(self.outgoing, self._kinds, strict=True)
            ],
        )


class Transactions:
    """Opens units of work on one database and wakes the relay when they commit."""

    def __init__(self, db: Database, source: str, on_commit: Callable[[], None] | None = None):
        self.db = db
        self.source = source
        self.on_commit = on_commit

    @contextlib.asynccontextmanager
    async def begin(self, causation: Envelope | None = None) -> AsyncIterator[UnitOfWork]:
        """Run the block in one transaction; commit on success, roll back on error."""
        async with self.db.session() as session, session.begin():
            unit = UnitOfWork(session, self.source, causation)
            yield unit
            await unit._write_outbox()
        if unit.outgoing and self.on_commit is not None:
            self.on_commit()


class OutboxRelay:
    """Publishes outbox rows in order of writing, with confirms, and marks them sent.

    On PostgreSQL, rows are claimed with ``FOR UPDATE SKIP LOCKED`` so several instances
    of one service can relay side by side without publishing a row twice at once.
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
        linger: float = 0.0,
    ) -> None:
        self.db = db
        self.broker = broker
        self.service = service
        self.batch_size = batch_size
        self.poll_seconds = poll_seconds
        self.max_attempts = max_attempts
        self.retention = retention
        self.linger = linger
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def wake(self) -> None:
        """Tell the relay new rows were committed (it also polls, in case it missed this)."""
        self._wake.set()

    def start(self) -> None:
        """Run the relay loop in the background."""
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name=f"outbox relay {self.service}")

    async def stop(self, grace: float = 10.0) -> None:
        """Stop after the batch in hand; cancel it only if it takes longer than ``grace`` s.

        Cancelling mid-batch would publish rows that the next relay publishes again.
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

    async def flush(self, grace: float = 10.0) -> int:
        """Publish until nothing is pending or ``grace`` s have passed; return the count."""
        sent = 0
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                while (batch := await self.publish_pending()) > 0:
                    sent += batch
        return sent

    async def _run(self) -> None:
        failures = 0
        loop = asyncio.get_running_loop()
        measured = 0.0
        while not self._stopping:
            self._wake.clear()
            try:
                published = await self.publish_pending()
                failures = 0
                if loop.time() - measured >= self.poll_seconds:
                    measured = loop.time()
                    OUTBOX_BACKLOG.labels(self.service).set(await self.backlog())
            except Exception:
                failures += 1
                log.exception("outbox relay failed; backing off", failures=failures)
                await asyncio.sleep(min(0.1 * 2**failures, 5.0))
                continue
            if published >= self.batch_size:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_seconds)
            if self.linger and not self._stopping:
                # commits that land meanwhile go out in the same batch: one claim and one
                # mark for several transactions, at the price of this much latency
                await asyncio.sleep(self.linger)

    async def publish_pending(self) -> int:
        """Publish one batch of due rows; return how many the broker confirmed."""
        table = outbox_table
        now = _now()
        due = _pending & (table.c.next_attempt_at.is_(None) | (table.c.next_attempt_at <= now))
        query = select(table.c.id, table.c.kind, table.c.body, table.c.attempts).where(due)
        query = query.order_by(table.c.id).limit(self.batch_size)
        if self.db.is_postgres:
            query = query.with_for_update(skip_locked=True)
        async with self.db.session() as session, session.begin():
            rows = (await session.execute(query)).all()
            if not rows:
                return 0
            envelopes = [Envelope.from_json(row.body) for row in rows]
            results = await self.broker.publish_many(envelopes)
            sent, unheard, failed = [], [], []
            for row, envelope, error in zip(rows, envelopes, results, strict=True):
                if error is None:
                    sent.append(row.id)
                elif isinstance(error, Unroutable) and row.kind == "event":
                    # an event nobody subscribes to is done, not failed; a command is not
                    unheard.append(row.id)
                    child(EVENTS_UNHEARD, self.service, envelope.type).inc()
                else:
                    failed.append((row, error))
            if sent or unheard:
                await session.execute(
                    update(table).where(table.c.id.in_(sent + unheard)).values(published_at=now)
                )
            for row, error in failed:
                await session.execute(self._postpone(row, error, now))
        child(OUTBOX_PUBLISHED, self.service).inc(len(sent))
        return len(sent)

    def _postpone(self, row: Any, error: BaseException, now: datetime) -> Any:
        attempts = row.attempts + 1
        values: dict[str, Any] = {"attempts": attempts, "last_error": f"{error}"[:1000]}
        # a broker outage is waited out; a command whose owner never binds is given up on
        if isinstance(error, Unroutable) and attempts >= self.max_attempts:
            values["failed_at"] = now
            log.error("outbox command unroutable; giving up", row=row.id, error=str(error))
        else:
            values["next_attempt_at"] = now + timedelta(seconds=min(0.5 * 2**attempts, 60.0))
            log.warning("outbox publish failed; will retry", row=row.id, error=str(error))
        return update(outbox_table).where(outbox_table.c.id == row.id).values(**values)

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
