"""The commands the payment service consumes, one handler each; the registry is at the bottom.

Each handler runs in the unit of work that also records the message in the inbox, so an
exact redelivery is dropped before it gets here. Business-level duplicates (a second
``payment.charge`` for an order, a refund of a refunded order) are answered with the
event already recorded, and never reach the provider again.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

import structlog

from bus.broker import Delivery
from bus.inbox import UnitHandler
from bus.transactions import UnitOfWork
from payment_svc import charging, refunding, store
from payment_svc.domain import ChargeRefused, Payment, PaymentStatus, RefundRefused
from payment_svc.messages import (
    PaymentCharge,
    PaymentFailed,
    PaymentRefund,
    PaymentRefundFailed,
    PaymentSucceeded,
)
from payment_svc.providers import PaymentGateway

log = structlog.get_logger(__name__)

PaymentHandler = Callable[[Delivery, UnitOfWork, PaymentGateway], Awaitable[None]]


async def charge_payment(delivery: Delivery, unit: UnitOfWork, gateway: PaymentGateway) -> None:
    """Charge an order once; answer ``payment.succeeded`` or ``payment.failed``."""
    command = delivery.expect(PaymentCharge)
    request = charging.ChargeRequest(
        user_id=command.user_id,
        amount=command.amount,
        currency=command.currency,
        provider=command.provider,
        method=command.method,
        order_id=command.order_id,
    )
    try:
        await charging.charge(unit, gateway, request)  # publishes the outcome
    except ChargeRefused as refused:
        # a copy of a charge made before answers with it, whatever would refuse it now
        existing = await store.payment_for_order(unit.session, command.order_id)
        if existing is not None:
            unit.publish(_answer_again(command, existing))
            return
        log.info("charge refused", order_id=command.order_id, reason=str(refused))
        unit.publish(_failed(command, str(refused)))
    except charging.AlreadyCharged as duplicate:  # the order's payment claimed it first
        unit.publish(_answer_again(command, duplicate.payment))


def _answer_again(command: PaymentCharge, existing: Payment) -> PaymentSucceeded | PaymentFailed:
    # the owner counts too: a charge naming no user matches only a payment with no owner
    charged = (existing.user_id, existing.amount, existing.currency)
    if charged != (command.user_id, command.amount, command.currency):
        # a payment made for another charge (say, over HTTP naming this order) pays nothing here
        log.warning("order already has a different payment", order_id=command.order_id)
        return _failed(command, f"order {command.order_id} already has a different payment")
    log.info("order already charged; answering again", order_id=command.order_id)
    return charging.outcome_event(existing)


def _failed(command: PaymentCharge, reason: str) -> PaymentFailed:
    return PaymentFailed(
        order_id=command.order_id, payment_id=None, reason=reason, provider=command.provider
    )


async def refund_payment(delivery: Delivery, unit: UnitOfWork, gateway: PaymentGateway) -> None:
    """Refund an order's payment; answer ``payment.refunded`` or ``payment.refund_failed``."""
    command = delivery.expect(PaymentRefund)
    payment = await store.payment_for_order(unit.session, command.order_id, for_update=True)
    if payment is None or payment.status in (PaymentStatus.FAILED, PaymentStatus.PROCESSING):
        reason = f"order {command.order_id} has no successful payment"
        unit.publish(PaymentRefundFailed(order_id=command.order_id, reason=reason))
        return
    if payment.status is PaymentStatus.REFUNDED:
        last = await store.latest_refund(unit.session, payment.id)
        if last is not None:
            log.info("order already refunded; answering again", order_id=command.order_id)
            unit.publish(refunding.refunded_event(last))
            return
    try:
        await refunding.refund(
            unit,
            gateway,
            payment,
            amount=command.amount,
            reason=command.reason,
            requested_by=delivery.envelope.source,
        )
    except RefundRefused as refused:
        failed = PaymentRefundFailed(order_id=command.order_id, reason=str(refused), charged=True)
        unit.publish(failed)


HANDLERS: dict[str, PaymentHandler] = {
    PaymentCharge.type: charge_payment,
    PaymentRefund.type: refund_payment,
}


def bind(handlers: Mapping[str, PaymentHandler], gateway: PaymentGateway) -> dict[str, UnitHandler]:
    """The handlers with their provider gateway filled in, as the service's consumer calls them."""

    def with_gateway(handler: PaymentHandler) -> UnitHandler:
        async def handle(delivery: Delivery, unit: UnitOfWork) -> None:
            await handler(delivery, unit, gateway)

        return handle

    return {kind: with_gateway(handler) for kind, handler in handlers.items()}
