"""Units of work, and group commit.

A handler's state changes and the messages they cause are written in one transaction
(:class:`UnitOfWork`); the messages go to the outbox table (:mod:`bus.outbox`), whose
relay publishes them once the transaction has committed. :class:`Transactions` opens
units of work, alone or several in one transaction (group commit).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import structlog
from sqlalchemy.ext.asyncio import AsyncConnection

from bus.db import Database
from bus.envelope import Envelope, Message
from bus.observability import UNITS_PER_TRANSACTION, child, current_traceparent
from bus.outbox import Committed, write_outbox
from bus.resilience import finish_or_cancel

log = structlog.get_logger("bus.transactions")


class UnitOfWork:
    """One transaction: a handler's changes plus the messages they cause.

    ``publish`` only records a message; it is written to the outbox when the transaction
    commits, and the relay publishes it afterwards.
    """

    def __init__(self, session: AsyncConnection, source: str, causation: Envelope | None) -> None:
        self.session = session
        self.source = source
        self.causation = causation
        # False when the unit's ``Once`` key was claimed before: its work must change nothing
        self.claimed = True
        self._written: list[tuple[Envelope, str]] = []  # (envelope, kind)

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
        self._written.append((envelope, message.kind))
        return envelope

    def written(self) -> Committed:
        """The messages this unit writes to the outbox, each with its kind."""
        return self._written


# records keys in the caller's transaction; returns those that were not recorded before
Claim = Callable[[AsyncConnection, Sequence[str]], Coroutine[Any, Any, set[str]]]


@dataclass(frozen=True, slots=True)
class Once:
    """What makes a unit of work take effect once: a key its transaction claims before the
    work runs (the inbox's message id). Units waiting together in a group (a wave) that
    name the same ``claim`` have their keys claimed in one call."""

    key: str
    claim: Claim


class Transactions:
    """Opens units of work on one database and hands the relay what they wrote.

    :meth:`begin` gives a block a transaction of its own. :meth:`together` runs work that
    is safe to run again (a message's handler behind the inbox, an insert-only request)
    in a transaction it may share with work that arrives at the same moment: group
    commit, up to ``group_size`` units a transaction (1: each has its own).
    """

    def __init__(
        self,
        db: Database,
        source: str,
        on_commit: Callable[[Committed], None] | None = None,
        *,
        group_size: int = 32,
    ):
        self.db = db
        self.source = source
        self.on_commit = on_commit
        self.group_size = group_size
        self._forming: _Group | None = None  # the group new units join
        self._running: set[asyncio.Task[None]] = set()

    @contextlib.asynccontextmanager
    async def begin(self, causation: Envelope | None = None) -> AsyncIterator[UnitOfWork]:
        """Run the block in one transaction; commit on success, roll back on error."""
        async with self.db.session() as session, session.begin():
            unit = UnitOfWork(session, self.source, causation)
            yield unit
            written = unit.written()
            await write_outbox(session, written)
        child(UNITS_PER_TRANSACTION, self.source).observe(1)
        self._committed(written)

    def _committed(self, written: Committed) -> None:
        """Outbox rows committed: hand them to the relay. The work is done whatever the
        relay makes of them: should it fail, its poll finds the rows in the outbox."""
        if written and self.on_commit is not None:
            try:
                self.on_commit(written)
            except Exception:
                log.exception("handing committed rows to the relay failed; its poll sends them")

    async def settle(self, grace: float = 10.0) -> None:
        """Wait up to ``grace`` s for the groups at work to commit or roll back, then roll
        back the rest: their callers have left, and their messages, never acked, come back."""
        await finish_or_cancel(self._running, grace)

    async def together(
        self, work: Work[T], causation: Envelope | None = None, *, once: Once | None = None
    ) -> T:
        """Run ``work`` in a unit of work that commits with others: group commit.

        Units that arrive while a group works join it, up to ``group_size``. A task of the
        group's own opens the transaction and runs each unit's ``work`` in turn on its
        connection, each in the context of the caller that brought it (its trace and log
        context), with a :class:`UnitOfWork` of its own (its messages name their own
        cause). When no unit is left waiting, it writes every unit's outbox rows in one
        statement and commits; only then does ``together`` return. What arrives meanwhile
        starts the next group, as does what arrives when a group is full. With ``once``,
        the unit's key is claimed in the transaction before its work runs, together with
        the keys of the units waiting beside it; the work finds ``unit.claimed`` False
        when the key was claimed before.

        When a unit's ``work`` fails, or a claim of keys does, the group is rolled back and
        every unit's ``work`` runs again in a transaction of its own (:meth:`begin`): the
        one that failed fails alone, the others commit. So ``work`` must be safe to run
        twice, and it holds its row locks until its group commits: work that calls
        something slow or that must not run twice (a payment provider) must not be grouped.
        When no connection can be had, or the outbox write or COMMIT fails, every unit of
        the group gets that error. A caller that is cancelled leaves its unit to the group: it
        commits if the group does, and is dropped if the group rolls back (a message then
        comes back, as it was not acked).
        """
        if self.group_size > 1:
            member = _Member(work, causation, once, contextvars.copy_context())
            self._group_with_room().add(member)
            outcome = await asyncio.shield(member.outcome)
            if outcome is not _ALONE:
                return cast(T, outcome)
        async with self.begin(causation) as unit:  # alone, with an outcome of its own
            if once is not None:
                unit.claimed = once.key in await once.claim(unit.session, [once.key])
            return await work(unit)

    def _group_with_room(self) -> _Group:
        group = self._forming
        if group is None or group.closed or len(group.everyone) >= self.group_size:
            group = self._forming = _Group()
            # in a context of its own: the group's logs and spans are no one caller's
            task = asyncio.create_task(
                self._run(group), name=f"group commit {self.source}", context=contextvars.Context()
            )
            self._running.add(task)
            task.add_done_callback(functools.partial(self._ended, group))
        return group

    async def _run(self, group: _Group) -> None:
        """Run the group's units in one transaction, then tell each how it went."""
        done: list[tuple[_Member, UnitOfWork, object]] = []
        try:
            async with self.db.session() as session, session.begin():
                while group.waiting:
                    wave, group.waiting = group.waiting, []  # more may join meanwhile
                    try:
                        seen = await _claimed_before(session, wave)
                    except Exception:  # a deadlock, a lost connection, a key refused
                        log.info("claiming a group's keys failed", exc_info=True)
                        group.closed = True
                        raise _RollBack from None  # each unit claims again, alone
                    for member in wave:
                        unit = UnitOfWork(session, self.source, member.causation)
                        unit.claimed = member not in seen
                        running: asyncio.Task[object] = asyncio.create_task(
                            member.work(unit), context=member.context
                        )
                        try:
                            result = await running
                        except Exception:
                            group.closed = True
                            raise _RollBack from None  # this unit and every other: again, alone
                        done.append((member, unit, result))
                group.closed = True  # what arrives from now on starts the next group
                written = [message for _, unit, _ in done for message in unit.written()]
                await write_outbox(session, written)
        except _RollBack:
            log.info("group commit rolled back; each unit runs alone", size=len(group.everyone))
            for member in group.everyone:
                member.outcome.set_result(_ALONE)
            return
        except Exception as error:  # no connection, or the outbox write or COMMIT failed
            group.closed = True
            log.warning("group commit failed", size=len(group.everyone), exc_info=True)
            for member in group.everyone:
                member.outcome.set_exception(error)
                member.outcome.exception()  # retrieved: a caller that left must not warn
            return
        for member, _, result in done:
            member.outcome.set_result(result)
        child(UNITS_PER_TRANSACTION, self.source).observe(len(done))
        self._committed(written)

    def _ended(self, group: _Group, task: asyncio.Task[None]) -> None:
        """However the group's task ended (cancelled, even before it began), no caller is
        left waiting and no unit joins it any more."""
        self._running.discard(task)
        group.closed = True
        if self._forming is group:
            self._forming = None
        for member in group.everyone:
            if not member.outcome.done():
                member.outcome.cancel()
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("group commit task failed", exc_info=error)


T = TypeVar("T")
Work = Callable[[UnitOfWork], Coroutine[Any, Any, T]]
_ALONE = object()  # a unit's outcome when its group rolled back: it runs again by itself


class _RollBack(Exception):
    """A unit of the group failed: undo the group's work."""


async def _claimed_before(session: AsyncConnection, wave: list[_Member]) -> set[_Member]:
    """Claim the keys of a wave of units, one call per ``Claim``; the units whose key was
    claimed before. Of two with one key (a message delivered twice at once), the second.
    """
    by_claim: dict[Claim, list[tuple[str, _Member]]] = {}
    for member in wave:
        if member.once is not None:
            by_claim.setdefault(member.once.claim, []).append((member.once.key, member))
    seen = set()
    for claim, keyed in by_claim.items():
        fresh = await claim(session, list(dict.fromkeys(key for key, _ in keyed)))
        for key, member in keyed:
            if key in fresh:
                fresh.discard(key)
            else:
                seen.add(member)
    return seen


@dataclass(eq=False)
class _Member:
    """One unit of work waiting in a group, and where its outcome goes."""

    work: Work[Any]
    causation: Envelope | None
    once: Once | None
    context: contextvars.Context  # its caller's, so its logs and spans are its caller's
    outcome: asyncio.Future[Any] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


@dataclass(eq=False)
class _Group:
    """Units of work sharing one transaction, run one after another by the group's task."""

    everyone: list[_Member] = field(default_factory=list)
    waiting: list[_Member] = field(default_factory=list)
    closed: bool = False  # takes no more units

    def add(self, member: _Member) -> None:
        self.everyone.append(member)
        self.waiting.append(member)
