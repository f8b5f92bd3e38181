"""The payment service's published language: the commands it owns and the events it emits.

Other services import these models; keep them free of this service's internals.
"""

from __future__ import annotations

from decimal import Decimal
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from bus.envelope import Command, Event


class Fees(BaseModel):
    """What the provider keeps (``processing``) and what the merchant gets (``net``)."""

    model_config = ConfigDict(frozen=True)

    processing: Decimal
    net: Decimal


class PaymentCharge(Command):
    """Charge ``amount`` for an order; an order is charged at most once."""

    type: ClassVar[str] = "payment.charge"

    order_id: str
    user_id: str | None = Field(
        default=None,
        description="the buyer, who may then see the payment; without one only staff can",
    )
    amount: Decimal
    currency: str = "USD"
    provider: str
    method: str


class PaymentRefund(Command):
    """Refund an order's payment: ``amount``, or everything not yet refunded when None."""

    type: ClassVar[str] = "payment.refund"

    order_id: str
    amount: Decimal | None = None
    reason: str


class PaymentSucceeded(Event):
    """A charge went through; ``order_id`` is None for payments not tied to an order."""

    type: ClassVar[str] = "payment.succeeded"

    order_id: str | None
    payment_id: str
    amount: Decimal
    currency: str
    provider: str
    fees: Fees


class PaymentFailed(Event):
    """A charge did not go through; ``payment_id`` is None when no payment was attempted."""

    type: ClassVar[str] = "payment.failed"

    order_id: str | None
    payment_id: str | None
    reason: str
    provider: str


class PaymentRefunded(Event):
    """Money went back to the payer; ``payment_status`` is the payment's status after it."""

    type: ClassVar[str] = "payment.refunded"

    order_id: str | None
    payment_id: str
    refund_id: str
    amount: Decimal
    reason: str
    payment_status: str


class PaymentRefundFailed(Event):
    """A ``payment.refund`` command could not be carried out, and why.

    ``charged`` when the order has a successful payment that was not refunded (the
    provider refused, or nothing was left): money a person must settle. Otherwise the
    order had no successful payment when the command was handled: nothing to return.
    """

    type: ClassVar[str] = "payment.refund_failed"

    order_id: str
    reason: str
    charged: bool = False


COMMANDS: tuple[type[Command], ...] = (PaymentCharge, PaymentRefund)
EVENTS: tuple[type[Event], ...] = (
    PaymentSucceeded,
    PaymentFailed,
    PaymentRefunded,
    PaymentRefundFailed,
)
