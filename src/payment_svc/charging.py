"""Charging, the same for an HTTP request and a ``payment.charge`` command.

It runs inside the caller's unit of work, so the provider call, the records and the
event commit together or not at all, and the transaction stays open across the provider
call, on purpose. The charge first claims its Idempotency-Key and its order by inserting
the rows that carry those unique keys; a concurrent duplicate waits on them, then finds
the recorded outcome instead of calling the provider again, and a crash before commit
leaves nothing behind. The price is one pooled connection per in-flight provider call,
which the simulated providers answer at once. A slow real provider would call for three
steps instead (claim, call, record).

What a rollback cannot undo is the provider's side: it may have taken the money and its
answer been lost (a timeout, a crash before our commit). So the provider's idempotency
key (``reference``) is the same on every attempt at one charge (:func:`reference_for`),
and the retried command or request gets the first answer back instead of a second charge.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

import structlog

from bus.transactions import UnitOfWork
from payment_svc import store
from payment_svc.domain import (
    ChargeRefused,
    Payment,
    PaymentStatus,
    TransactionStatus,
    TransactionType,
    new_id,
    payable_provider,
)
from payment_svc.messages import PaymentFailed, PaymentSucceeded
from payment_svc.providers import PaymentGateway

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class ChargeRequest:
    """What to charge, for whom, and with which provider and method.

    ``user_id`` owns the payment; None records it with no owner, for staff's eyes only.
    """

    user_id: str | None
    amount: Decimal
    currency: str
    provider: str
    method: str
    order_id: str | None = None


@dataclass(frozen=True, slots=True)
class Charged:
    """A charge's payment; ``replayed`` when its Idempotency-Key had made it already."""

    payment: Payment
    replayed: bool = False


class AlreadyCharged(Exception):
    """The order has a payment already; it is never charged again."""

    def __init__(self, payment: Payment) -> None:
        super().__init__(f"order {payment.order_id} already has payment {payment.id}")
        self.payment = payment


class KeyReused(Exception):
    """An Idempotency-Key sent again with a different request."""


async def charge(
    unit: UnitOfWork,
    gateway: PaymentGateway,
    request: ChargeRequest,
    *,
    key: store.IdempotencyKey | None = None,
    correlation_id: str | None = None,
) -> Charged:
    """Charge once, record the payment and its transaction, and publish the outcome.

    Raises :class:`~payment_svc.domain.ChargeRefused` when the charge cannot be attempted
    (nothing is recorded), :class:`KeyReused` and :class:`AlreadyCharged` as they say.
    """
    provider = payable_provider(request.provider, request.amount, request.currency)
    if not gateway.accepts(request.provider, request.method):
        raise ChargeRefused("unsupported payment method")
    session, now = unit.session, datetime.now(UTC)
    payment_id = new_id("pay")
    if key is not None and (original := await _replay(unit, key, payment_id, now)):
        return Charged(original, replayed=True)
    fees = provider.fees(request.amount)
    claimed = await store.claim_payment(
        session,
        {
            "id": payment_id,
            "order_id": request.order_id,
            "user_id": request.user_id,
            "transaction_id": new_id("txn"),
            "amount": request.amount,
            "currency": request.currency,
            "provider": request.provider,
            "payment_method": request.method,
            "status": PaymentStatus.PROCESSING,
            "fee_processing": fees.processing,
            "fee_net": fees.net,
            "refunded_amount": Decimal(0),
            "created_at": now,
        },
    )
    if not claimed:  # the payment id is fresh: only the order can clash
        raise AlreadyCharged(await _order_payment(unit, request.order_id))
    answer = await gateway.charge(
        request.provider,
        reference=reference_for(request, key) or payment_id,
        amount=request.amount,
        currency=request.currency,
        method=request.method,
    )
    status = PaymentStatus.COMPLETED if answer.approved else PaymentStatus.FAILED
    payment = await store.settle_payment(
        session,
        payment_id,
        status=status,
        failure_reason=answer.reason,
        processed_at=datetime.now(UTC),
    )
    await store.add_transaction(
        session,
        payment,
        transaction_id=payment.transaction_id,
        kind=TransactionType.PAYMENT,
        status=TransactionStatus(status),
        amount=payment.amount,
        at=now,
    )
    unit.publish(outcome_event(payment), correlation_id=correlation_id)
    log.info("payment charged", payment_id=payment_id, order_id=request.order_id, status=status)
    return Charged(payment)


def reference_for(request: ChargeRequest, key: store.IdempotencyKey | None) -> str | None:
    """The charge's idempotency key at its provider, the same on every attempt at it.

    An order is charged once for its amount (another amount is another charge, which the
    provider must not take for this one); a client's Idempotency-Key once for the request
    it was sent with. A charge with neither is an attempt of its own (None: the payment's
    id will do).
    """
    if request.order_id is not None:
        return f"order:{request.order_id}:{request.amount:f}"
    if key is not None:  # hashed: a provider takes keys of a bounded length (Stripe: 255)
        keyed = f"{key.user_id}:{key.key}:{key.request_hash}".encode()
        return f"key:{hashlib.sha256(keyed).hexdigest()}"
    return None


def outcome_event(payment: Payment) -> PaymentSucceeded | PaymentFailed:
    """The event announcing how ``payment``'s charge ended (also to answer a duplicate)."""
    if payment.status is PaymentStatus.FAILED:
        return PaymentFailed(
            order_id=payment.order_id,
            payment_id=payment.id,
            reason=payment.failure_reason or "declined",
            provider=payment.provider,
        )
    return PaymentSucceeded(
        order_id=payment.order_id,
        payment_id=payment.id,
        amount=payment.amount,
        currency=payment.currency,
        provider=payment.provider,
        fees=payment.fees,
    )


async def _replay(
    unit: UnitOfWork, key: store.IdempotencyKey, payment_id: str, now: datetime
) -> Payment | None:
    """Bind ``key`` to ``payment_id``; if it was bound already, the payment it made."""
    seen = await store.claim_idempotency_key(unit.session, key, payment_id, now)
    if seen is None:
        return None
    request_hash, original_id = seen
    if request_hash != key.request_hash:
        raise KeyReused("this Idempotency-Key was used with a different request")
    return await _payment(unit, original_id)


# The lookups below follow a claim in the same transaction: a miss is a bug, not a 404.


async def _payment(unit: UnitOfWork, payment_id: str) -> Payment:
    payment = await store.get_payment(unit.session, payment_id)
    if payment is None:
        raise LookupError(f"payment {payment_id} is missing after its claim")
    return payment


async def _order_payment(unit: UnitOfWork, order_id: str | None) -> Payment:
    payment = None if order_id is None else await store.payment_for_order(unit.session, order_id)
    if payment is None:
        raise LookupError(f"order {order_id}'s payment is missing after a lost claim")
    return payment
