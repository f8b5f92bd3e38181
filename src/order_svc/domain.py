"""The rules of an order, with no I/O: statuses, allowed transitions, saga steps, money."""

from __future__ import annotations

import enum
from datetime import datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal


class OrderStatus(enum.StrEnum):
    """The seed's eight statuses."""

    PENDING = "pending"
    PAYMENT_PROCESSING = "payment_processing"
    CONFIRMED = "confirmed"
    PROCESSING = "processing"
    SHIPPED = "shipped"
    DELIVERED = "delivered"
    CANCELLED = "cancelled"
    REFUNDED = "refunded"


S = OrderStatus

# Every transition the saga or a person may make; anything else is refused.
TRANSITIONS: dict[OrderStatus, frozenset[OrderStatus]] = {
    S.PENDING: frozenset({S.PAYMENT_PROCESSING, S.CANCELLED}),
    S.PAYMENT_PROCESSING: frozenset({S.CONFIRMED, S.CANCELLED}),
    S.CONFIRMED: frozenset({S.PROCESSING, S.REFUNDED}),
    S.PROCESSING: frozenset({S.SHIPPED, S.REFUNDED}),
    S.SHIPPED: frozenset({S.DELIVERED}),
    S.DELIVERED: frozenset(),
    # a charge that lands after the order was cancelled is refunded
    S.CANCELLED: frozenset({S.REFUNDED}),
    S.REFUNDED: frozenset(),
}

# What staff may set by hand with PUT /orders/{id}/status (TRANSITIONS says from where).
MANUAL = frozenset({S.PROCESSING, S.SHIPPED, S.DELIVERED})

# Cancelling before payment only releases stock; after it, the payment is refunded first.
CANCEL_RELEASES = frozenset({S.PENDING, S.PAYMENT_PROCESSING})
CANCEL_REFUNDS = frozenset({S.CONFIRMED, S.PROCESSING})

DELIVERY_DAYS = 3


class SagaStep(enum.StrEnum):
    """The command an order waits on a reply to (its timeout is watched)."""

    RESERVE = "reserve"
    CHARGE = "charge"
    COMMIT = "commit"
    REFUND = "refund"
    RELEASE = "release"


# Steps whose failure to answer cancels the order; the others owe stock or money to
# someone and are retried until they are answered.
COMPENSATED_ON_TIMEOUT = frozenset({SagaStep.RESERVE, SagaStep.CHARGE})


class TransitionError(ValueError):
    """A status change the rules do not allow."""


def check_transition(current: OrderStatus, new: OrderStatus) -> None:
    """Raise :class:`TransitionError` unless ``current`` may become ``new``."""
    if new not in TRANSITIONS[current]:
        raise TransitionError(f"an order cannot go from {current} to {new}")


def cancel_plan(status: OrderStatus) -> str:
    """How to cancel an order in ``status``: ``release``, ``refund``, or why not."""
    if status in CANCEL_RELEASES:
        return "release"
    if status in CANCEL_REFUNDS:
        return "refund"
    if status in (S.SHIPPED, S.DELIVERED):
        raise TransitionError(f"a {status} order cannot be cancelled")
    raise TransitionError(f"the order is already {status}")


def money(value: Decimal | int | str) -> Decimal:
    """Two decimal places, rounded half-up."""
    return Decimal(value).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


def line_total(unit_price: Decimal, quantity: int) -> Decimal:
    """The price of one order line."""
    return money(unit_price * quantity)


def estimated_delivery(shipped_at: datetime) -> datetime:
    """When a shipped order should arrive."""
    return shipped_at + timedelta(days=DELIVERY_DAYS)


def step_backoff(timeout: float, attempts: int, cap: float = 300.0) -> float:
    """Seconds to wait for a reply after ``attempts`` sends: doubling, capped."""
    return min(timeout * 2.0 ** max(attempts - 1, 0), cap)
