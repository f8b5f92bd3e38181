"""One function per message the order service consumes; the registry is at the bottom."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from bus.broker import Delivery, Reject
from bus.envelope import Message
from bus.inbox import UnitHandler
from bus.transactions import UnitOfWork
from inventory_svc.messages import (
    ProductCreated,
    ProductUpdated,
    StockCommitted,
    StockExpired,
    StockRejected,
    StockReleased,
    StockReserved,
)
from order_svc import replicas, saga, store
from order_svc.domain import SagaStep
from order_svc.saga import Policy
from payment_svc.messages import (
    PaymentFailed,
    PaymentRefunded,
    PaymentRefundFailed,
    PaymentSucceeded,
)
from user_svc.messages import (
    UserActivated,
    UserCreated,
    UserDeactivated,
    UserDeleted,
    UserUpdated,
)

log = structlog.get_logger(__name__)

SagaStepHandler = Callable[[UnitOfWork, store.Order, Any, Policy], Awaitable[None]]


def for_order(step: SagaStepHandler, policy: Policy) -> UnitHandler:
    """Lock the order a reply is about, then let the saga act on it."""

    async def handle(delivery: Delivery, unit: UnitOfWork) -> None:
        order_id = getattr(delivery.message, "order_id", None)
        if order_id is None:
            return  # a payment made over HTTP, not for an order
        order = await store.lock_order(unit.session, order_id)
        if order is None:
            log.warning("reply for an unknown order ignored", order_id=order_id)
            return
        await step(unit, order, delivery.message, policy)

    return handle


def ends(step: SagaStep) -> UnitHandler:
    """A reply that only ends ``step``: stop watching it, in one statement and no lock."""

    async def handle(delivery: Delivery, unit: UnitOfWork) -> None:
        reply = delivery.message
        if not isinstance(reply, StockCommitted | StockReleased):
            raise Reject(f"not a stock reply: {delivery.envelope.type}")
        await store.end_step(unit.session, reply.order_id, step)

    return handle


async def reservation_expired(
    unit: UnitOfWork, order: store.Order, event: StockExpired, policy: Policy
) -> None:
    await saga.reservation_expired(unit, order, policy)


async def stock_reserved(
    unit: UnitOfWork, order: store.Order, event: StockReserved, policy: Policy
) -> None:
    prices = {item.product_id: item.unit_price for item in event.items}
    await saga.stock_reserved(unit, order, prices, event.total, policy)


async def stock_rejected(
    unit: UnitOfWork, order: store.Order, event: StockRejected, policy: Policy
) -> None:
    short = ", ".join(
        f"{item.product_id} (requested {item.requested}, available {item.available})"
        for item in event.items
    )
    await saga.stock_rejected(unit, order, short or event.reason)


async def payment_succeeded(
    unit: UnitOfWork, order: store.Order, event: PaymentSucceeded, policy: Policy
) -> None:
    await saga.payment_succeeded(unit, order, event.payment_id, policy)


async def payment_failed(
    unit: UnitOfWork, order: store.Order, event: PaymentFailed, policy: Policy
) -> None:
    await saga.payment_failed(unit, order, event.reason, policy)


async def payment_refunded(
    unit: UnitOfWork, order: store.Order, event: PaymentRefunded, policy: Policy
) -> None:
    await saga.payment_refunded(unit, order, policy)


async def refund_failed(
    unit: UnitOfWork, order: store.Order, event: PaymentRefundFailed, policy: Policy
) -> None:
    await saga.refund_failed(unit, order, event.reason, event.charged, policy)


async def user_changed(delivery: Delivery, unit: UnitOfWork) -> None:
    """Keep the replica of users current (who exists, who may order)."""
    envelope = delivery.envelope
    await replicas.save_user(unit.session, delivery.message, envelope.type, envelope.time)


async def product_changed(delivery: Delivery, unit: UnitOfWork) -> None:
    """Keep the replica of the catalogue current (what can be ordered, at what price)."""
    event = delivery.message
    if not isinstance(event, ProductCreated | ProductUpdated):
        raise Reject(f"not a product event: {delivery.envelope.type}")
    product = replicas.KnownProduct(event.product_id, event.name, event.price)
    await replicas.save_product(unit.session, product, delivery.envelope.time)


SAGA_REPLIES: dict[type[Message], SagaStepHandler] = {
    StockReserved: stock_reserved,
    StockRejected: stock_rejected,
    PaymentSucceeded: payment_succeeded,
    PaymentFailed: payment_failed,
    PaymentRefunded: payment_refunded,
    PaymentRefundFailed: refund_failed,
    StockExpired: reservation_expired,
}
USER_EVENTS: tuple[type[Message], ...] = (
    UserCreated,
    UserUpdated,
    UserDeleted,
    UserActivated,
    UserDeactivated,
)
# replies that only end a step: the saga has nothing more to do for them
STEP_ENDINGS: dict[type[Message], SagaStep] = {
    StockCommitted: SagaStep.COMMIT,
    StockReleased: SagaStep.RELEASE,
}
PRODUCT_EVENTS: tuple[type[Message], ...] = (ProductCreated, ProductUpdated)
CONSUMED: tuple[type[Message], ...] = (
    *SAGA_REPLIES,
    *STEP_ENDINGS,
    *USER_EVENTS,
    *PRODUCT_EVENTS,
)


def handlers(policy: Policy) -> dict[str, UnitHandler]:
    """Every handler of the order service, by message type."""
    registry: dict[str, UnitHandler] = {
        model.type: for_order(step, policy) for model, step in SAGA_REPLIES.items()
    }
    registry.update({model.type: ends(step) for model, step in STEP_ENDINGS.items()})
    registry.update({model.type: user_changed for model in USER_EVENTS})
    registry.update({model.type: product_changed for model in PRODUCT_EVENTS})
    return registry
