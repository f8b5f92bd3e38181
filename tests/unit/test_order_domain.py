"""The order's rules: transitions, cancelling, money, timeouts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from order_svc.domain import (
    TRANSITIONS,
    OrderStatus,
    TransitionError,
    cancel_plan,
    check_transition,
    estimated_delivery,
    line_total,
    money,
    step_backoff,
)

S = OrderStatus


@pytest.mark.parametrize(
    ("current", "new"),
    [
        (S.PENDING, S.PAYMENT_PROCESSING),
        (S.PENDING, S.CANCELLED),
        (S.PAYMENT_PROCESSING, S.CONFIRMED),
        (S.PAYMENT_PROCESSING, S.CANCELLED),
        (S.CONFIRMED, S.PROCESSING),
        (S.CONFIRMED, S.REFUNDED),
        (S.PROCESSING, S.SHIPPED),
        (S.SHIPPED, S.DELIVERED),
        (S.CANCELLED, S.REFUNDED),
    ],
)
def test_saga_and_manual_transitions_are_allowed(current: OrderStatus, new: OrderStatus) -> None:
    check_transition(current, new)


@pytest.mark.parametrize(
    ("current", "new"),
    [
        (S.PENDING, S.CONFIRMED),  # never confirmed without payment
        (S.PENDING, S.SHIPPED),
        (S.CONFIRMED, S.CANCELLED),  # a paid order is refunded, not just cancelled
        (S.SHIPPED, S.REFUNDED),
        (S.DELIVERED, S.PROCESSING),
        (S.REFUNDED, S.CONFIRMED),
        (S.CANCELLED, S.CONFIRMED),
    ],
)
def test_other_transitions_are_refused(current: OrderStatus, new: OrderStatus) -> None:
    with pytest.raises(TransitionError, match=f"from {current} to {new}"):
        check_transition(current, new)


def test_terminal_statuses_lead_nowhere_but_a_late_refund() -> None:
    assert TRANSITIONS[S.DELIVERED] == frozenset()
    assert TRANSITIONS[S.REFUNDED] == frozenset()
    assert TRANSITIONS[S.CANCELLED] == frozenset({S.REFUNDED})


@pytest.mark.parametrize(
    ("status", "plan"),
    [
        (S.PENDING, "release"),
        (S.PAYMENT_PROCESSING, "release"),
        (S.CONFIRMED, "refund"),
        (S.PROCESSING, "refund"),
    ],
)
def test_cancel_releases_before_payment_and_refunds_after(status: OrderStatus, plan: str) -> None:
    assert cancel_plan(status) == plan


@pytest.mark.parametrize("status", [S.SHIPPED, S.DELIVERED, S.CANCELLED, S.REFUNDED])
def test_shipped_delivered_and_finished_orders_cannot_be_cancelled(status: OrderStatus) -> None:
    with pytest.raises(TransitionError):
        cancel_plan(status)


def test_money_is_exact_and_rounds_half_up() -> None:
    laptop, mouse = Decimal("1299.99"), Decimal("79.99")
    assert line_total(laptop, 1) + line_total(mouse, 2) == Decimal("1459.97")
    assert money(Decimal("0.005")) == Decimal("0.01")
    assert money(Decimal("2.675")) == Decimal("2.68")  # a float would give 2.67


def test_shipped_orders_are_expected_three_days_later() -> None:
    shipped = datetime(2026, 11, 26, 12, tzinfo=UTC)
    assert estimated_delivery(shipped) == shipped + timedelta(days=3)


def test_step_waits_double_with_each_send_up_to_a_cap() -> None:
    assert [step_backoff(10, n) for n in (1, 2, 3, 4)] == [10, 20, 40, 80]
    assert step_backoff(10, 30) == 300
