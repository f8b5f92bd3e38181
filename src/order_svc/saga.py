"""The order saga: what each reply, cancel or timeout does to an order.

Each function runs inside the unit of work of the message or request that caused it,
with the order row locked, so a status change and the commands it sends commit together.
A reply that comes late (after a timeout or a cancel) is compensated, never dropped: a
reservation for a cancelled order is released, a charge for it refunded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from decimal import Decimal
from typing import Any

import structlog

from bus.envelope import Message
from bus.transactions import UnitOfWork
from inventory_svc.messages import LineItem, StockCommit, StockRelease, StockReserve
from order_svc import store
from order_svc.domain import (
    CANCEL_REFUNDS,
    CANCEL_RELEASES,
    COMPENSATED_ON_TIMEOUT,
    OrderStatus,
    SagaStep,
    TransitionError,
    cancel_plan,
    check_transition,
    estimated_delivery,
    step_backoff,
)
from order_svc.messages import OrderCancelled, OrderConfirmed, OrderStatusChanged
from order_svc.store import Line, Order
from payment_svc.messages import PaymentCharge, PaymentRefund

log = structlog.get_logger(__name__)
S = OrderStatus


@dataclass(frozen=True, slots=True)
class Policy:
    """How long a step may wait for its reply, and how often it is sent before giving up."""

    step_timeout: float = 10.0
    step_attempts: int = 3


async def start(
    unit: UnitOfWork, values: dict[str, Any], lines: Sequence[Line], policy: Policy
) -> None:
    """Write a new order (``values`` of its row), already waiting for its stock, and ask
    inventory to hold that stock: the first step, in the transaction that places it."""
    await store.insert_order(unit.session, values | awaiting(SagaStep.RESERVE, policy), lines)
    items = [LineItem(product_id=product, quantity=quantity) for product, quantity, _ in lines]
    unit.publish(
        StockReserve(order_id=values["id"], items=items), correlation_id=values["correlation_id"]
    )


async def send(
    unit: UnitOfWork, order: Order, step: SagaStep, policy: Policy, attempt: int = 1
) -> None:
    """Send ``step``'s command for ``order`` and start watching for its reply."""
    await publish_command(unit, order, step)
    await store.update_order(unit.session, order.id, **awaiting(step, policy, attempt))


async def publish_command(unit: UnitOfWork, order: Order, step: SagaStep) -> None:
    """Send ``step``'s command; the caller writes :func:`awaiting` with its own change."""
    unit.publish(await command_for(unit, order, step), correlation_id=order.correlation_id)


def awaiting(step: SagaStep, policy: Policy, attempt: int = 1) -> dict[str, Any]:
    """The columns that make the sweep wait for ``step``'s reply, and resend it when late.

    Written over the previous step's, they also mark that step answered.
    """
    deadline = store.now() + timedelta(seconds=step_backoff(policy.step_timeout, attempt))
    return {"saga_step": step, "step_deadline": deadline, "step_attempts": attempt}


async def command_for(unit: UnitOfWork, order: Order, step: SagaStep) -> Message:
    """The command that carries out ``step`` (sent again, it has the same effect)."""
    match step:
        case SagaStep.RESERVE:
            lines = await store.order_lines(unit.session, order.id)
            items = [LineItem(product_id=p, quantity=q) for p, q in lines]
            return StockReserve(order_id=order.id, items=items)
        case SagaStep.CHARGE:
            return PaymentCharge(
                order_id=order.id,
                user_id=order.user_id,
                amount=order.total,
                currency=order.currency,
                provider=order.provider,
                method=order.method,
            )
        case SagaStep.COMMIT:
            return StockCommit(order_id=order.id)
        case SagaStep.REFUND:
            return PaymentRefund(order_id=order.id, reason=order.status_reason or "order cancelled")
        case SagaStep.RELEASE:
            return StockRelease(order_id=order.id, reason=order.status_reason)


async def step_answered(unit: UnitOfWork, order: Order, step: SagaStep) -> None:
    """Stop watching ``step`` if it is the one the order waits on."""
    if order.saga_step == step:
        await store.end_step(unit.session, order.id, step)


async def change_status(
    unit: UnitOfWork,
    order: Order,
    new: OrderStatus,
    reason: str | None = None,
    *,
    prices: Mapping[str, Decimal] | None = None,
    **values: object,
) -> Order:
    """Move ``order`` to ``new`` (if the rules allow) and announce it; ``prices``, by
    product, replace its lines' unit prices."""
    check_transition(order.status, new)
    await store.record_status(unit.session, order.id, new, reason, prices=prices, **values)
    unit.publish(
        OrderStatusChanged(
            order_id=order.id,
            user_id=order.user_id,
            previous_status=order.status,
            new_status=new,
            reason=reason,
        ),
        correlation_id=order.correlation_id,
    )
    log.info("order status changed", order_id=order.id, status=new, reason=reason)
    return replace(order, status=new, status_reason=reason)


async def stock_reserved(
    unit: UnitOfWork, order: Order, prices: dict[str, Decimal], total: Decimal, policy: Policy
) -> None:
    """Stock is held: take payment, at the prices stock was reserved at."""
    if order.status in (S.CANCELLED, S.REFUNDED):
        # cancelled (or timed out) before the reservation arrived: give the stock back
        if order.saga_step is SagaStep.REFUND:
            # unwatched, so the refund stays watched; its answer releases again, watched
            await publish_command(unit, order, SagaStep.RELEASE)
        else:
            await send(unit, order, SagaStep.RELEASE, policy)
        return
    if order.status is not S.PENDING:
        await step_answered(unit, order, SagaStep.RESERVE)
        return  # a repeated reply
    order = await change_status(
        unit,
        replace(order, total=total),
        S.PAYMENT_PROCESSING,
        prices=prices,
        total_cents=store.cents(total),
        **awaiting(SagaStep.CHARGE, policy),
    )
    await publish_command(unit, order, SagaStep.CHARGE)


async def stock_rejected(unit: UnitOfWork, order: Order, reason: str) -> None:
    """Not enough stock: the order ends here, nothing to undo."""
    await step_answered(unit, order, SagaStep.RESERVE)
    if order.status is S.PENDING:
        await _cancelled(unit, order, f"out of stock: {reason}")


async def payment_succeeded(
    unit: UnitOfWork, order: Order, payment_id: str, policy: Policy
) -> None:
    """Paid: confirm, and turn the reservation into a sale."""
    if order.status in (S.CANCELLED, S.REFUNDED):
        # the charge landed after the order was given up on: return the money
        await store.update_order(
            unit.session,
            order.id,
            payment_id=payment_id,
            refund_requested=True,
            **awaiting(SagaStep.REFUND, policy),
        )
        await publish_command(unit, order, SagaStep.REFUND)
        return
    if order.status is not S.PAYMENT_PROCESSING:
        await step_answered(unit, order, SagaStep.CHARGE)
        return
    order = await change_status(
        unit, order, S.CONFIRMED, None, payment_id=payment_id, **awaiting(SagaStep.COMMIT, policy)
    )
    unit.publish(
        OrderConfirmed(
            order_id=order.id, user_id=order.user_id, total=order.total, payment_id=payment_id
        ),
        correlation_id=order.correlation_id,
    )
    await publish_command(unit, order, SagaStep.COMMIT)


async def payment_failed(unit: UnitOfWork, order: Order, reason: str, policy: Policy) -> None:
    """Declined: release the stock and cancel."""
    await step_answered(unit, order, SagaStep.CHARGE)
    if order.status is S.PAYMENT_PROCESSING:
        order = await _cancelled(unit, order, f"payment declined: {reason}")
        await send(unit, order, SagaStep.RELEASE, policy)


async def payment_refunded(unit: UnitOfWork, order: Order, policy: Policy) -> None:
    """Money is back: return the units to stock and mark the order refunded."""
    await step_answered(unit, order, SagaStep.REFUND)
    if order.status is S.REFUNDED or not order.refund_requested:
        return
    was_cancelled = order.status is S.CANCELLED
    order = await change_status(unit, order, S.REFUNDED, order.status_reason or "refunded")
    if not was_cancelled:
        unit.publish(
            OrderCancelled(
                order_id=order.id,
                user_id=order.user_id,
                reason=order.status_reason or "cancelled",
                refunded=True,
            ),
            correlation_id=order.correlation_id,
        )
    await send(unit, order, SagaStep.RELEASE, policy)


async def refund_failed(
    unit: UnitOfWork, order: Order, reason: str, charged: bool, policy: Policy
) -> None:
    """No money to return (the charge never happened), or the refund was refused.

    A refused refund leaves money with us that a person must settle: the order says so.
    A confirmed order takes a cancel again (the refund is asked anew); a cancelled one is
    left to a person, and its stock goes back.
    """
    if not charged and order.payment_id is not None:
        # asked before the charge was seen (a timeout); the refund asked since is on its way
        return
    await step_answered(unit, order, SagaStep.REFUND)
    if charged or order.status is not S.CANCELLED:
        log.error("refund failed; the order needs a person", order_id=order.id, reason=reason)
        await store.update_order(
            unit.session, order.id, refund_requested=False, status_reason=f"refund failed: {reason}"
        )
    if order.status is S.CANCELLED:
        await send(unit, order, SagaStep.RELEASE, policy)


async def cancel(unit: UnitOfWork, order: Order, reason: str, policy: Policy) -> Order:
    """Cancel at a person's request; raises TransitionError when it is too late."""
    plan = cancel_plan(order.status)
    if plan == "release":
        order = await _cancelled(unit, order, reason)
        await send(unit, order, SagaStep.RELEASE, policy)
        return order
    if order.refund_requested:
        return order  # a second cancel while the refund is on its way
    await store.update_order(unit.session, order.id, refund_requested=True, status_reason=reason)
    order = replace(order, refund_requested=True, status_reason=reason)
    await send(unit, order, SagaStep.REFUND, policy)
    return order


async def set_status(unit: UnitOfWork, order: Order, new: OrderStatus, reason: str | None) -> Order:
    """A person moves a confirmed order along: processing, shipped, delivered; not while
    its refund is on its way (it would end refunded, and shipped)."""
    if order.refund_requested:
        raise TransitionError("the order is being refunded: it cannot move along")
    if new is S.SHIPPED:
        shipped_at = store.now()
        return await change_status(
            unit,
            order,
            new,
            reason,
            shipped_at=shipped_at,
            estimated_delivery=estimated_delivery(shipped_at),
        )
    return await change_status(unit, order, new, reason)


async def reservation_expired(unit: UnitOfWork, order: Order, policy: Policy) -> None:
    """Inventory gave the order's stock back unasked: it was held past its time to live
    (the saga stalled, say by a long outage). An order not yet sold cannot be: it is
    cancelled as a person would cancel it, refunded if it was paid. One shipped before
    its sale was recorded has gone out with units now back on sale: that is for a
    person, and the commit is no longer asked for. For any other order this is a late
    copy of the news, or the answer to its own release."""
    sale_unrecorded = order.saga_step is SagaStep.COMMIT
    if order.status in CANCEL_RELEASES or (sale_unrecorded and order.status in CANCEL_REFUNDS):
        log.warning("stock reservation expired; cancelling the order", order_id=order.id)
        await cancel(unit, order, "stock reservation expired", policy)
    elif sale_unrecorded:  # shipped, or delivered
        log.error("stock reservation expired after shipping; needs a person", order_id=order.id)
        reason = "stock reservation expired before the sale was recorded: stock to be checked"
        await step_answered(unit, order, SagaStep.COMMIT)
        await store.update_order(unit.session, order.id, status_reason=reason)
    else:
        await step_answered(unit, order, SagaStep.RELEASE)


async def step_overdue(unit: UnitOfWork, order: Order, policy: Policy) -> None:
    """No reply in time: send the step again, or give the order up when that is safe."""
    step = order.saga_step
    if step is None:
        return
    if order.step_attempts < policy.step_attempts or step not in COMPENSATED_ON_TIMEOUT:
        log.warning("saga step overdue; sending again", order_id=order.id, step=step)
        await send(unit, order, step, policy, attempt=order.step_attempts + 1)
        return
    log.error("saga step unanswered; compensating", order_id=order.id, step=step)
    who = "inventory" if step is SagaStep.RESERVE else "payment"
    order = await _cancelled(unit, order, f"{who} did not answer in time")
    if step is SagaStep.CHARGE:
        # the charge may have gone through unseen: ask for the money back, then the stock
        await store.update_order(unit.session, order.id, refund_requested=True)
        await send(unit, replace(order, refund_requested=True), SagaStep.REFUND, policy)
    else:
        await send(unit, order, SagaStep.RELEASE, policy)


async def _cancelled(unit: UnitOfWork, order: Order, reason: str) -> Order:
    order = await change_status(unit, order, S.CANCELLED, reason)
    unit.publish(
        OrderCancelled(order_id=order.id, user_id=order.user_id, reason=reason),
        correlation_id=order.correlation_id,
    )
    return order
