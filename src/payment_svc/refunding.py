"""Refunding, the same for an HTTP request and a ``payment.refund`` command."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import structlog

from bus.transactions import UnitOfWork
from payment_svc import store
from payment_svc.domain import (
    Payment,
    Refund,
    RefundRefused,
    TransactionStatus,
    TransactionType,
    new_id,
    plan_refund,
)
from payment_svc.messages import PaymentRefunded
from payment_svc.providers import PaymentGateway

log = structlog.get_logger(__name__)


async def refund(
    unit: UnitOfWork,
    gateway: PaymentGateway,
    payment: Payment,
    *,
    amount: Decimal | None,
    reason: str,
    requested_by: str,
    correlation_id: str | None = None,
) -> Refund:
    """Refund ``amount`` (None: all that is left) of ``payment``, and publish the refund.

    The caller reads ``payment`` ``for_update`` in this unit of work, so two refunds of
    one payment take turns and cannot both spend what is left. Raises
    :class:`~payment_svc.domain.RefundRefused` when the payment's state forbids it.
    """
    plan = plan_refund(
        charged=payment.amount,
        refunded=payment.refunded_amount,
        status=payment.status,
        requested=amount,
    )
    refund_id, transaction_id, now = new_id("ref"), new_id("txn"), datetime.now(UTC)
    # the provider's idempotency key: the same when this refund is tried again after a
    # rollback (a lost answer), new once a refund of the payment has been recorded, or
    # for another amount
    reference = f"refund:{payment.id}:after:{payment.refunded_amount:f}:of:{plan.amount:f}"
    answer = await gateway.refund(
        payment.provider, reference=reference, amount=plan.amount, currency=payment.currency
    )
    if not answer.approved:
        raise RefundRefused(f"provider {payment.provider} refused the refund: {answer.reason}")
    await store.add_transaction(
        unit.session,
        payment,
        transaction_id=transaction_id,
        kind=TransactionType.REFUND,
        status=TransactionStatus.COMPLETED,
        amount=plan.amount,
        at=now,
    )
    await store.add_refund(
        unit.session,
        id=refund_id,
        payment_id=payment.id,
        transaction_id=transaction_id,
        amount=plan.amount,
        reason=reason,
        requested_by=requested_by,
        created_at=now,
    )
    await store.update_payment(
        unit.session, payment.id, refunded_amount=plan.refunded_total, status=plan.status
    )
    made = await store.get_refund(unit.session, refund_id)
    if made is None:
        raise LookupError(f"refund {refund_id} is missing right after it was written")
    unit.publish(refunded_event(made), correlation_id=correlation_id)
    log.info("payment refunded", payment_id=payment.id, refund_id=refund_id, status=plan.status)
    return made


def refunded_event(made: Refund) -> PaymentRefunded:
    """The event announcing ``made`` (also to answer a repeated refund command)."""
    return PaymentRefunded(
        order_id=made.order_id,
        payment_id=made.payment_id,
        refund_id=made.id,
        amount=made.amount,
        reason=made.reason,
        payment_status=made.payment_status,
    )
