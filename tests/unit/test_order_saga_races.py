"""The saga's answers to replies that cross each other, one order on SQLite.

Each step runs as its handler would (the order locked, a unit of work of its own) and
the test reads what it sent and what the order became. The end-to-end flows are in
tests/integration/test_order_saga.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from bus.db import Database
from bus.transactions import UnitOfWork
from order_svc import saga, store
from order_svc.domain import OrderStatus, SagaStep, TransitionError

S = OrderStatus
ORDER = "o-1"
# one attempt a step: an overdue charge is given up on at once
POLICY = saga.Policy(step_timeout=10, step_attempts=1)


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(f"sqlite+aiosqlite:///{tmp_path}/order.db", metadata=[store.metadata])
    await database.create_all()
    at = store.now()
    values = {
        "id": ORDER,
        "user_id": "u-1",
        "status": S.PENDING,
        "currency": "USD",
        "total_cents": 2999,
        "provider": "stripe",
        "method": "tok_visa",
        "correlation_id": ORDER,
        "traceparent": None,
        "created_at": at,
        "updated_at": at,
        "refund_requested": False,
    }
    async with database.session() as session, session.begin():
        await saga.start(
            UnitOfWork(session, "/order", None), values, [("mouse", 1, Decimal("29.99"))], POLICY
        )
    yield database
    await database.close()


async def step(db: Database, act: Any, *args: Any) -> list[str]:
    """Run ``act(unit, order, *args)`` as a handler would; the types of what it sent."""
    async with db.session() as session, session.begin():
        unit = UnitOfWork(session, "/order", None)
        order = await store.lock_order(session, ORDER)
        assert order is not None
        await act(unit, order, *args)
    return [
        envelope.type for envelope, _ in unit.written() if envelope.type != "order.status_changed"
    ]


async def order(db: Database) -> store.Order:
    async with db.session() as session:
        found = await store.lock_order(session, ORDER)
    assert found is not None
    return found


async def reserved(db: Database) -> None:
    await step(db, saga.stock_reserved, {"mouse": Decimal("29.99")}, Decimal("29.99"), POLICY)


async def confirmed(db: Database) -> None:
    await reserved(db)
    await step(db, saga.payment_succeeded, "pay-1", POLICY)


async def charge_given_up(db: Database) -> None:
    """Reserved, then the charge went unanswered: cancelled, its money asked back."""
    await reserved(db)
    assert await step(db, saga.step_overdue, POLICY) == ["order.cancelled", "payment.refund"]


async def test_staff_cannot_move_an_order_along_while_its_refund_is_on_its_way(
    db: Database,
) -> None:
    await confirmed(db)
    assert await step(db, saga.cancel, "changed my mind", POLICY) == ["payment.refund"]

    with pytest.raises(TransitionError, match="being refunded"):
        await step(db, saga.set_status, S.PROCESSING, None)

    await step(db, saga.payment_refunded, POLICY)
    assert (await order(db)).status is S.REFUNDED


async def test_a_refused_refund_of_a_confirmed_order_is_flagged_and_a_new_cancel_asks_again(
    db: Database,
) -> None:
    await confirmed(db)
    await step(db, saga.cancel, "changed my mind", POLICY)

    assert await step(db, saga.refund_failed, "provider said no", True, POLICY) == []

    flagged = await order(db)
    assert (flagged.status, flagged.status_reason) == (
        S.CONFIRMED,
        "refund failed: provider said no",
    )
    assert (flagged.saga_step, flagged.refund_requested) == (None, False)
    assert await step(db, saga.cancel, "please try again", POLICY) == ["payment.refund"]


async def test_a_refused_refund_of_a_late_charge_is_flagged_and_the_stock_still_goes_back(
    db: Database,
) -> None:
    await reserved(db)
    await step(db, saga.cancel, "changed my mind", POLICY)
    assert await step(db, saga.payment_succeeded, "pay-1", POLICY) == ["payment.refund"]

    assert await step(db, saga.refund_failed, "provider said no", True, POLICY) == ["stock.release"]

    flagged = await order(db)
    assert (flagged.status, flagged.status_reason) == (
        S.CANCELLED,
        "refund failed: provider said no",
    )


async def test_nothing_to_refund_from_before_the_charge_landed_leaves_the_later_refund_watched(
    db: Database,
) -> None:
    await charge_given_up(db)
    # the charge lands after all: a second refund, for the payment now known
    assert await step(db, saga.payment_succeeded, "pay-1", POLICY) == ["payment.refund"]

    # the first refund's answer, from before the charge committed: stale
    assert await step(db, saga.refund_failed, "no successful payment", False, POLICY) == []
    assert (await order(db)).saga_step is SagaStep.REFUND

    assert await step(db, saga.payment_refunded, POLICY) == ["stock.release"]
    assert (await order(db)).status is S.REFUNDED


async def test_nothing_to_refund_for_a_charge_never_made_frees_the_stock(db: Database) -> None:
    await charge_given_up(db)

    assert await step(db, saga.refund_failed, "no successful payment", False, POLICY) == [
        "stock.release"
    ]
    cancelled = await order(db)
    assert (cancelled.status, cancelled.saga_step) == (S.CANCELLED, SagaStep.RELEASE)


async def test_a_late_reservation_is_released_without_taking_the_watch_off_a_refund(
    db: Database,
) -> None:
    await charge_given_up(db)

    again = await step(db, saga.stock_reserved, {}, Decimal("29.99"), POLICY)
    assert again == ["stock.release"]
    assert (await order(db)).saga_step is SagaStep.REFUND


async def test_an_expired_reservation_cancels_an_order_being_paid_for(db: Database) -> None:
    await reserved(db)

    assert await step(db, saga.reservation_expired, POLICY) == ["order.cancelled", "stock.release"]
    cancelled = await order(db)
    assert (cancelled.status, cancelled.status_reason) == (S.CANCELLED, "stock reservation expired")
    # the charge on its way is refunded when it lands, as after any cancel
    assert await step(db, saga.payment_succeeded, "pay-1", POLICY) == ["payment.refund"]


async def test_an_expired_reservation_refunds_a_paid_order_whose_sale_was_not_committed(
    db: Database,
) -> None:
    await confirmed(db)
    assert (await order(db)).saga_step is SagaStep.COMMIT

    assert await step(db, saga.reservation_expired, POLICY) == ["payment.refund"]
    refunding = await order(db)
    assert (refunding.saga_step, refunding.refund_requested) == (SagaStep.REFUND, True)
    await step(db, saga.payment_refunded, POLICY)
    assert (await order(db)).status is S.REFUNDED


async def test_news_of_an_expiry_after_the_sale_changes_nothing(db: Database) -> None:
    await confirmed(db)
    async with db.session() as session, session.begin():
        await store.end_step(session, ORDER, SagaStep.COMMIT)  # stock.committed

    assert await step(db, saga.reservation_expired, POLICY) == []
    assert (await order(db)).status is S.CONFIRMED


async def test_an_expiry_after_shipping_unrecorded_stops_the_commit_and_asks_for_a_person(
    db: Database,
) -> None:
    await confirmed(db)  # the commit unanswered: inventory is down
    await step(db, saga.set_status, S.PROCESSING, None)
    await step(db, saga.set_status, S.SHIPPED, None)

    assert await step(db, saga.reservation_expired, POLICY) == []

    shipped = await order(db)
    assert (shipped.status, shipped.saga_step) == (S.SHIPPED, None)
    assert shipped.status_reason is not None
    assert "stock to be checked" in shipped.status_reason
