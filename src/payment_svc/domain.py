"""Pure payment rules: the providers and their fees, payment statuses, refund arithmetic.

No I/O here. The records (:class:`Payment`, :class:`Transaction`, :class:`Refund`) are
what the store returns and what the HTTP routes answer with.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict

from payment_svc.messages import Fees

CENT = Decimal("0.01")
MAX_AMOUNT = Decimal("999999999.99")
_CURRENCY = re.compile(r"[A-Z]{3}")

ProviderName = Literal["stripe", "paypal", "square", "crypto"]


def new_id(prefix: str) -> str:
    """A fresh id such as ``pay_3f2a…``; the prefix tells payments, transactions, refunds apart."""
    return f"{prefix}_{uuid.uuid4().hex}"


def money(value: Decimal) -> Decimal:
    """``value`` rounded half-up to cents."""
    return value.quantize(CENT, rounding=ROUND_HALF_UP)


class ProviderStatus(StrEnum):
    """Whether a provider takes payments."""

    ACTIVE = "active"
    MAINTENANCE = "maintenance"


@dataclass(frozen=True, slots=True)
class Provider:
    """A payment provider's terms: fee = amount x percent + fixed, rounded half-up to cents."""

    name: ProviderName
    fee_percent: Decimal
    fee_fixed: Decimal
    status: ProviderStatus = ProviderStatus.ACTIVE

    def fees(self, amount: Decimal) -> Fees:
        """What the provider keeps of ``amount`` and what is left for the merchant."""
        processing = money(amount * self.fee_percent / 100 + self.fee_fixed)
        return Fees(processing=processing, net=money(amount) - processing)


PROVIDERS: Mapping[str, Provider] = {
    provider.name: provider
    for provider in (
        Provider("stripe", Decimal("2.9"), Decimal("0.30")),
        Provider("paypal", Decimal("3.4"), Decimal("0.00")),
        Provider("square", Decimal("2.6"), Decimal("0.10")),
        Provider("crypto", Decimal("1.5"), Decimal("0.00"), ProviderStatus.MAINTENANCE),
    )
}


class ChargeRefused(Exception):
    """A charge that cannot be attempted at all; the message says why (no payment is made)."""


class ProviderUnavailable(ChargeRefused):
    """The provider exists but takes no payments now (maintenance)."""


def payable_provider(name: str, amount: Decimal, currency: str) -> Provider:
    """The provider to charge ``amount`` with, or :class:`ChargeRefused` saying why not."""
    provider = PROVIDERS.get(name)
    if provider is None:
        raise ChargeRefused(f"unknown provider {name!r}")
    if not amount.is_finite() or amount <= 0 or amount > MAX_AMOUNT or amount != money(amount):
        raise ChargeRefused("amount must be positive, in whole cents, at most 999999999.99")
    if not _CURRENCY.fullmatch(currency):
        raise ChargeRefused("currency must be a 3-letter ISO 4217 code such as USD")
    if provider.status is ProviderStatus.MAINTENANCE:
        raise ProviderUnavailable(f"provider {name} is in maintenance")
    return provider


class PaymentStatus(StrEnum):
    """Where a payment is. A row is PROCESSING only inside the transaction charging it."""

    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    REFUNDED = "refunded"
    PARTIALLY_REFUNDED = "partially_refunded"


REFUNDABLE = frozenset({PaymentStatus.COMPLETED, PaymentStatus.PARTIALLY_REFUNDED})


class RefundRefused(Exception):
    """A refund the payment's state does not allow (HTTP 409)."""


class InvalidRefundAmount(RefundRefused):
    """A refund amount that is not a positive number of cents (HTTP 422)."""


@dataclass(frozen=True, slots=True)
class RefundPlan:
    """A refund that may go ahead: how much, and the payment's state after it."""

    amount: Decimal
    refunded_total: Decimal
    status: PaymentStatus


def plan_refund(
    *, charged: Decimal, refunded: Decimal, status: PaymentStatus, requested: Decimal | None
) -> RefundPlan:
    """Check a refund of ``requested`` (None: all that is left) against the payment."""
    if status is PaymentStatus.REFUNDED:
        raise RefundRefused("the payment is already fully refunded")
    if status not in REFUNDABLE:
        raise RefundRefused(f"a {status} payment cannot be refunded")
    remaining = charged - refunded
    amount = remaining if requested is None else requested
    if not amount.is_finite() or amount <= 0 or amount != money(amount):
        raise InvalidRefundAmount("refund amount must be positive, in whole cents")
    if amount > remaining:
        raise RefundRefused(f"refund of {amount} exceeds the {remaining} still refundable")
    total = refunded + amount
    after = PaymentStatus.REFUNDED if total == charged else PaymentStatus.PARTIALLY_REFUNDED
    return RefundPlan(amount=amount, refunded_total=total, status=after)


class TransactionType(StrEnum):
    """A charge attempt or a refund."""

    PAYMENT = "payment"
    REFUND = "refund"


class TransactionStatus(StrEnum):
    """How a provider call ended."""

    COMPLETED = "completed"
    FAILED = "failed"


class Record(BaseModel):
    """Base of the stored records: frozen, read from rows by attribute."""

    model_config = ConfigDict(frozen=True, from_attributes=True)


class Payment(Record):
    """One charge attempt and where it stands."""

    id: str
    order_id: str | None
    user_id: str | None  # None: charged by a command that named no user
    transaction_id: str
    amount: Decimal
    currency: str
    provider: str
    payment_method: str
    status: PaymentStatus
    fees: Fees
    refunded_amount: Decimal
    failure_reason: str | None
    created_at: datetime
    processed_at: datetime | None


class Transaction(Record):
    """One call to a provider: a charge attempt or a refund."""

    id: str
    payment_id: str
    type: TransactionType
    status: TransactionStatus
    amount: Decimal
    currency: str
    provider: str
    created_at: datetime


class Refund(Record):
    """Money given back on a payment; ``payment_status`` is the payment's status now."""

    id: str
    payment_id: str
    order_id: str | None
    transaction_id: str
    amount: Decimal
    currency: str
    reason: str
    payment_status: PaymentStatus
    created_at: datetime
