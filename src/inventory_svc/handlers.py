"""One handler per command inventory owns, and the expiry of reservations never committed.

Each runs in the unit of work the kit's inbox opened: stock changes, the reservation's new
status, the answer event and the inbox mark commit together, or not at all.
"""

from __future__ import annotations

import contextlib
from datetime import datetime, timedelta
from decimal import Decimal

import structlog
from sqlalchemy.ext.asyncio import AsyncConnection

from bus.broker import Delivery, Reject
from bus.envelope import Event
from bus.inbox import UnitHandler
from bus.resilience import out_of_reach
from bus.transactions import Transactions, UnitOfWork
from inventory_svc import domain, store
from inventory_svc.domain import CommitDecision, ReservationStatus
from inventory_svc.messages import (
    LineItem,
    ReservedItem,
    ShortItem,
    StockCommit,
    StockCommitted,
    StockExpired,
    StockRejected,
    StockRelease,
    StockReleased,
    StockReserve,
    StockReserved,
)

log = structlog.get_logger(__name__)


async def _existing(session: AsyncConnection, order_id: str, *, lock: bool) -> store.Reservation:
    reservation = await store.get_reservation(session, order_id, lock=lock)
    if reservation is None:  # the claim just found it, and reservations are never deleted
        raise RuntimeError(f"reservation of order {order_id} vanished")
    return reservation


class _Shortage(Exception):
    def __init__(self, failed: list[LineItem]) -> None:
        super().__init__(f"{len(failed)} lines short")
        self.failed = failed


async def reserve_stock(delivery: Delivery, unit: UnitOfWork) -> None:
    """Hold every line of the order or none; a repeated request gets its first answer again."""
    command = delivery.expect(StockReserve)
    session, now, order_id = unit.session, store.utc_now(), command.order_id
    correlation_id = delivery.envelope.correlationid
    if not await store.claim_reservation(
        session, order_id, ReservationStatus.RESERVED, now, correlation_id=correlation_id
    ):
        existing = await _existing(session, order_id, lock=False)
        log.info("repeated stock.reserve answered again", order_id=order_id, status=existing.status)
        unit.publish(_answer_again(existing))
        return
    lines = domain.merge_lines(command.items)
    # With several lines, a savepoint: a shortfall undoes the lines already held, yet the
    # rejection and the inbox mark still commit. One line holds all or nothing by itself,
    # and skipping the savepoint's two round trips shortens the hold on a busy product.
    savepoint = session.begin_nested() if len(lines) > 1 else contextlib.nullcontext()
    try:
        async with savepoint:
            held = await _hold_all(session, lines)
    except _Shortage as shortage:
        unit.publish(await _reject(session, order_id, shortage.failed, now))
        return
    total = domain.reservation_total(held)
    held_lines = [store.Line(item.product_id, item.quantity, item.unit_price) for item in held]
    await store.update_reservation(
        session, order_id, ReservationStatus.RESERVED, now, lines=held_lines, total=total
    )
    log.info("stock reserved", order_id=order_id, total=str(total))
    unit.publish(StockReserved(order_id=order_id, items=held, total=total))


async def _hold_all(session: AsyncConnection, lines: list[LineItem]) -> list[ReservedItem]:
    if not lines:
        raise _Shortage([])
    held, failed = [], []
    # sorted by product id: every reservation locks its rows in one order. Reservations
    # grouped in one transaction lock in the order they came, but one group runs at a time
    # (a second only while the first is full); PostgreSQL breaks a deadlock between two,
    # and their reservations run again one by one.
    for line in lines:
        price = None
        if line.quantity <= domain.MAX_UNITS:
            price = await store.hold_units(session, line.product_id, line.quantity)
        if price is None:
            failed.append(line)  # go on: the rejection names every short line, not the first
        else:
            held.append(ReservedItem(**line.model_dump(), unit_price=price))
    if failed:
        raise _Shortage(failed)
    return held


async def _reject(
    session: AsyncConnection, order_id: str, failed: list[LineItem], now: datetime
) -> StockRejected:
    available = await store.available_units(session, (line.product_id for line in failed))
    short = domain.shortfalls(failed, available)
    unknown = {line.product_id for line in failed} - available.keys()
    reason = domain.rejection_reason(short, unknown)
    short_lines = [store.Line(s.product_id, s.requested, available=s.available) for s in short]
    await store.update_reservation(
        session, order_id, ReservationStatus.REJECTED, now, lines=short_lines, reason=reason
    )
    log.info("stock rejected", order_id=order_id, reason=reason)
    return StockRejected(order_id=order_id, reason=reason, items=short)


def _answer_again(reservation: store.Reservation) -> Event:
    order_id, status = reservation.order_id, reservation.status
    if status is ReservationStatus.REJECTED:
        short = [
            ShortItem(
                product_id=line.product_id, requested=line.quantity, available=line.available or 0
            )
            for line in reservation.lines
        ]
        return StockRejected(order_id=order_id, reason=reservation.reason or "", items=short)
    if domain.holds_units(status):
        items = [
            ReservedItem(
                product_id=line.product_id,
                quantity=line.quantity,
                unit_price=line.unit_price or Decimal(0),
            )
            for line in reservation.lines
        ]
        return StockReserved(order_id=order_id, items=items, total=reservation.total or Decimal(0))
    # released or expired: answering "reserved" would let the order be paid for units it
    # no longer holds
    return StockRejected(order_id=order_id, reason=f"reservation already {status}", items=[])


async def commit_stock(delivery: Delivery, unit: UnitOfWork) -> None:
    """Sell the order's held units; committing twice answers twice but sells once.

    Committing an order with no reservation, or one released, is refused (dead-lettered
    with the reason): the order was paid for units it does not hold, and an operator must
    see that rather than have it pass as a warning in a log. One whose hold expired is
    answered with the expiry again, which the order service acts on (it refunds).
    """
    command = delivery.expect(StockCommit)
    session, now, order_id = unit.session, store.utc_now(), command.order_id
    reservation = await store.get_reservation(session, order_id, lock=True)
    if reservation is None:
        raise Reject(f"cannot commit order {order_id}: it has no reservation")
    decision = domain.decide_commit(reservation.status)
    if decision is CommitDecision.REFUSE:
        raise Reject(f"cannot commit order {order_id}: its reservation is {reservation.status}")
    if decision is CommitDecision.TOO_LATE:
        log.warning("commit of an expired reservation; told again", order_id=order_id)
        unit.publish(_expired(reservation))
        return
    if decision is CommitDecision.COMMIT:
        for line in reservation.lines:
            await store.move_stock(
                session, line.product_id, domain.commit_units(line.quantity), now
            )
        await store.update_reservation(session, order_id, ReservationStatus.COMMITTED, now)
        log.info("stock committed", order_id=order_id)
    unit.publish(StockCommitted(order_id=order_id))


async def release_stock(delivery: Delivery, unit: UnitOfWork) -> None:
    """Give the order's units back; a repeat, or an order that held nothing, is still answered."""
    command = delivery.expect(StockRelease)
    session, now, order_id = unit.session, store.utc_now(), command.order_id
    if await store.claim_reservation(
        session,
        order_id,
        ReservationStatus.RELEASED,
        now,
        correlation_id=delivery.envelope.correlationid,
        reason=command.reason,
    ):
        # Nothing was reserved yet. The marker makes a stock.reserve that arrives late
        # (redelivered, retried) answer "rejected" instead of holding units for a dead order.
        unit.publish(StockReleased(order_id=order_id, items=[], reason=command.reason))
        return
    reservation = await _existing(session, order_id, lock=True)
    released = await _release(session, reservation, ReservationStatus.RELEASED, command.reason, now)
    unit.publish(released)


async def _release(
    session: AsyncConnection,
    reservation: store.Reservation,
    status: ReservationStatus,
    reason: str | None,
    now: datetime,
) -> StockReleased:
    order_id, was = reservation.order_id, reservation.status
    items = [LineItem(product_id=x.product_id, quantity=x.quantity) for x in reservation.lines]
    if was is ReservationStatus.REJECTED:
        return StockReleased(order_id=order_id, items=[], reason=reason)
    if not domain.holds_units(was):  # released or expired before: the same answer again
        return StockReleased(order_id=order_id, items=items, reason=reservation.reason)
    for item in items:
        delta = domain.release_delta(was, item.quantity)
        await store.move_stock(session, item.product_id, delta, now)
    await store.update_reservation(session, order_id, status, now, reason=reason)
    log.info("stock released", order_id=order_id, was=was, reason=reason)
    return StockReleased(order_id=order_id, items=items, reason=reason)


def _expired(reservation: store.Reservation) -> StockExpired:
    """The news that ``reservation`` ran out, for the order that counted on it."""
    items = [LineItem(product_id=x.product_id, quantity=x.quantity) for x in reservation.lines]
    return StockExpired(order_id=reservation.order_id, items=items)


async def expire_reservations(transactions: Transactions, ttl: float, batch: int = 100) -> int:
    """Release reservations held longer than ``ttl`` seconds; return how many.

    Each in its own transaction, so one order's locks are held briefly, and one that
    fails (logged) neither undoes the others nor keeps the ones behind it held: being
    the oldest, it would come first in every round.
    """
    now = store.utc_now()
    cutoff = now - timedelta(seconds=ttl)
    async with transactions.db.session() as session:
        due = await store.due_for_expiry(session, cutoff, batch)
    expired = 0
    for order_id in due:
        try:
            async with transactions.begin() as unit:
                reservation = await store.lock_if_due(unit.session, order_id, cutoff)
                if reservation is None:  # committed or released meanwhile, or swept already
                    continue
                await _release(
                    unit.session, reservation, ReservationStatus.EXPIRED, domain.EXPIRY_REASON, now
                )
                unit.publish(_expired(reservation), correlation_id=reservation.correlation_id)
            expired += 1
        except Exception as error:
            if out_of_reach(error):
                raise  # the database is down: every other one would wait and fail the same
            log.exception(
                "expiring a reservation failed; the next round tries it again", order_id=order_id
            )
    return expired


HANDLERS: dict[str, UnitHandler] = {
    StockReserve.type: reserve_stock,
    StockCommit.type: commit_stock,
    StockRelease.type: release_stock,
}
