"""HTTP for orders: place, read, move along by hand, cancel. Thin: the saga decides."""

from __future__ import annotations

import hashlib
import uuid
from decimal import Decimal
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from bus.transactions import UnitOfWork
from bus.web import (
    CORRELATION_ID,
    TRANSACTIONS,
    Api,
    Conflict,
    Forbidden,
    HttpProblem,
    NotFound,
    Page,
    Unprocessable,
    idempotency_key,
    json_response,
    page_params,
    principal,
)
from order_svc import replicas, saga, store
from order_svc.admission import Admission
from order_svc.domain import MANUAL, OrderStatus, TransitionError, line_total, money
from order_svc.messages import MOST_OF_ONE_PRODUCT, OrderCreated, OrderLine
from order_svc.replicas import Directory, KnownProduct, Refused, UpstreamUnavailable
from order_svc.saga import Policy
from order_svc.views import OrderView, new_order_view, order_view, order_views

api = Api()
DIRECTORY = web.AppKey("DIRECTORY", Directory)
POLICY = web.AppKey("POLICY", Policy)
ADMISSION = web.AppKey("ADMISSION", Admission)
CURRENCY = web.AppKey("CURRENCY", str)
ANYONE = ("admin", "manager", "user")
STAFF = ("admin", "manager")


class PaymentChoice(BaseModel):
    """How the order is to be paid."""

    model_config = ConfigDict(extra="forbid")

    provider: str = Field(min_length=1, max_length=20)
    method: str = Field(min_length=1, max_length=64)


class PlaceOrder(BaseModel):
    """``POST /orders``: what to buy and how to pay."""

    model_config = ConfigDict(extra="forbid")

    items: list[OrderLine] = Field(min_length=1, max_length=50)
    payment: PaymentChoice


class StatusChange(BaseModel):
    """``PUT /orders/{id}/status``."""

    status: OrderStatus
    reason: str | None = Field(default=None, max_length=500)


class CancelRequest(BaseModel):
    """``POST /orders/{id}/cancel``."""

    reason: str | None = Field(default=None, max_length=500)


@api.post(
    "/orders",
    body=PlaceOrder,
    response=OrderView,
    status=202,
    roles=ANYONE,
    summary="Place an order; its saga reserves stock, then takes payment",
)
async def place_order(request: web.Request, body: PlaceOrder) -> web.StreamResponse:
    caller = principal(request)
    key = idempotency_key(request, longest=store.IDEMPOTENCY_KEY_LENGTH)
    # only a keyed request needs its fingerprint (same key, different body: refused)
    fingerprint = hashlib.sha256(body.model_dump_json().encode()).hexdigest() if key else ""
    transactions = request.app[TRANSACTIONS]
    if key and (existing := await _order_for_key(request, caller.user_id, key, fingerprint)):
        return _accepted(existing)
    admission = request.app[ADMISSION]
    if not admission.has_room():
        raise HttpProblem(
            f"the shop is busy: {admission.in_flight} orders are being processed; "
            "try again in a second",
            status=503,
            headers={"Retry-After": "1"},
        )
    lines = _merged(body.items)
    try:
        new_user, catalogue, fetched = await _what_is_known(
            request, caller.user_id, {line.product_id for line in lines}
        )
    except UpstreamUnavailable as error:
        raise HttpProblem(f"cannot place orders right now: {error}", status=503) from None
    priced = [(line.product_id, line.quantity, catalogue[line.product_id].price) for line in lines]
    total = money(sum((line_total(price, qty) for _, qty, price in priced), Decimal(0)))
    order_id = uuid.uuid4().hex
    currency = request.app[CURRENCY]
    at = store.now()
    values: dict[str, Any] = {
        "id": order_id,
        "user_id": caller.user_id,
        "status": OrderStatus.PENDING,
        "currency": currency,
        "total_cents": store.cents(total),
        "provider": body.payment.provider,
        "method": body.payment.method,
        "correlation_id": request[CORRELATION_ID],
        "created_at": at,
        "updated_at": at,
        "refund_requested": False,
    }

    async def write(unit: UnitOfWork) -> None:  # inserts only: safe to run again alone
        if new_user is not None:  # learnt over HTTP: keep it for the next order
            await replicas.remember_user(unit.session, new_user)
        for product in fetched:
            await replicas.remember_product(unit.session, product)
        if key:
            await unit.session.execute(
                insert(store.idempotency_keys).values(
                    user_id=caller.user_id,
                    key=key,
                    request_hash=fingerprint,
                    order_id=order_id,
                    created_at=at,
                )
            )
        values["traceparent"] = unit.publish(
            OrderCreated(
                order_id=order_id,
                user_id=caller.user_id,
                items=lines,
                total=total,
                currency=currency,
            ),
            correlation_id=request[CORRELATION_ID],
        ).traceparent
        await saga.start(unit, values, priced, request.app[POLICY])

    try:
        # orders placed at the same moment commit in one transaction (group commit)
        await transactions.together(write)
    except IntegrityError:
        # the same Idempotency-Key raced in from another request: answer with its order
        if key and (existing := await _order_for_key(request, caller.user_id, key, fingerprint)):
            return _accepted(existing)
        raise
    admission.took_one()
    return _accepted(new_order_view(values, priced))


@api.get(
    "/orders",
    response=Page[OrderView],
    roles=ANYONE,
    summary="Orders: your own; staff see everyone's (?status=, ?user_id=)",
)
async def list_orders(request: web.Request) -> web.StreamResponse:
    caller = principal(request)
    limit, offset = page_params(request)
    status = _status_filter(request.query.get("status"))
    async with request.app[TRANSACTIONS].db.session() as session:
        staff = await _acts_as_staff(request, session)
        user_id = request.query.get("user_id") if staff else caller.user_id
        views, total = await order_views(
            session, user_id=user_id, status=status, limit=limit, offset=offset
        )
    return json_response(Page[OrderView](items=views, total=total, limit=limit, offset=offset))


@api.get("/orders/{order_id}", response=OrderView, roles=ANYONE, summary="One order")
async def get_order(request: web.Request) -> web.StreamResponse:
    return json_response(await _visible_order(request))


@api.put(
    "/orders/{order_id}/status",
    body=StatusChange,
    response=OrderView,
    roles=STAFF,
    summary="Move a confirmed order along: processing, shipped, delivered (or cancel)",
)
async def change_status(request: web.Request, body: StatusChange) -> web.StreamResponse:
    async with request.app[TRANSACTIONS].db.reading() as session:
        if not await _acts_as_staff(request, session):
            raise Forbidden("your account no longer acts as staff")
    order_id = request.match_info["order_id"]
    if body.status is OrderStatus.CANCELLED:
        return await _cancel(request, order_id, body.reason or "cancelled by staff")
    if body.status not in MANUAL:
        raise Conflict(f"status {body.status} is set by the saga, not by hand")
    async with request.app[TRANSACTIONS].begin() as unit:
        order = await _locked(unit.session, order_id)
        try:
            await saga.set_status(unit, order, body.status, body.reason)
        except TransitionError as error:
            raise Conflict(str(error)) from None
    return json_response(await _existing_view(request, order_id))


@api.post(
    "/orders/{order_id}/cancel",
    body=CancelRequest,
    response=OrderView,
    status=202,
    roles=ANYONE,
    summary="Cancel: release stock, or refund first once paid",
)
async def cancel_order(request: web.Request, body: CancelRequest) -> web.StreamResponse:
    await _visible_order(request)
    return await _cancel(
        request, request.match_info["order_id"], body.reason or "cancelled by the customer"
    )


async def _cancel(request: web.Request, order_id: str, reason: str) -> web.StreamResponse:
    async with request.app[TRANSACTIONS].begin() as unit:
        order = await _locked(unit.session, order_id)
        try:
            await saga.cancel(unit, order, reason, request.app[POLICY])
        except TransitionError as error:
            raise Conflict(str(error)) from None
    return json_response(await _existing_view(request, order_id), status=202)


async def _locked(session: AsyncConnection, order_id: str) -> store.Order:
    order = await store.lock_order(session, order_id)
    if order is None:
        raise NotFound(f"no order {order_id}")
    return order


async def _visible_order(request: web.Request) -> OrderView:
    caller, order_id = principal(request), request.match_info["order_id"]
    async with request.app[TRANSACTIONS].db.session() as session:
        view = await order_view(session, order_id)
        # another user's order is "not found": saying "forbidden" would confirm it exists
        if view is None or (
            view.user_id != caller.user_id and not await _acts_as_staff(request, session)
        ):
            raise NotFound(f"no order {order_id}")
    return view


async def _acts_as_staff(request: web.Request, session: AsyncConnection) -> bool:
    """Whether the caller may act as staff: its token says so and the users replica, when
    it knows the caller, still does (read on the caller's connection). A token outlives a
    demotion or a deactivation by up to its lifetime; the replica hears of either at once."""
    caller = principal(request)
    if not caller.is_staff:
        return False
    known = await replicas.known_user(session, caller.user_id)
    return known is None or (known.status == "active" and known.role in STAFF)


async def _view(request: web.Request, order_id: str) -> OrderView | None:
    async with request.app[TRANSACTIONS].db.session() as session:
        return await order_view(session, order_id)


async def _existing_view(request: web.Request, order_id: str) -> OrderView:
    view = await _view(request, order_id)
    if view is None:
        raise NotFound(f"no order {order_id}")
    return view


def _accepted(view: OrderView) -> web.StreamResponse:
    return json_response(view, status=202, headers={"Location": f"/orders/{view.id}"})


async def _order_for_key(
    request: web.Request, user_id: str, key: str, fingerprint: str
) -> OrderView | None:
    table = store.idempotency_keys
    query = select(table).where((table.c.user_id == user_id) & (table.c.key == key))
    async with request.app[TRANSACTIONS].db.session() as session:
        row = (await session.execute(query)).first()
    if row is None:
        return None
    if row.request_hash != fingerprint:
        raise Unprocessable("this Idempotency-Key was used for a different order")
    return await _view(request, row.order_id)


def _merged(items: list[OrderLine]) -> list[OrderLine]:
    quantities: dict[str, int] = {}
    for item in items:
        quantities[item.product_id] = quantities.get(item.product_id, 0) + item.quantity
    for product_id, quantity in quantities.items():
        if quantity > MOST_OF_ONE_PRODUCT:
            raise Unprocessable(
                f"body.items: {quantity} of {product_id!r} in all; "
                f"an order takes at most {MOST_OF_ONE_PRODUCT} of one product"
            )
    return [OrderLine(product_id=p, quantity=q) for p, q in sorted(quantities.items())]


def _status_filter(value: str | None) -> OrderStatus | None:
    if value is None:
        return None
    try:
        return OrderStatus(value)
    except ValueError:
        raise Unprocessable(f"query.status: unknown status {value!r}") from None


async def _what_is_known(
    request: web.Request, user_id: str, product_ids: set[str]
) -> tuple[dict[str, Any] | None, dict[str, KnownProduct], list[KnownProduct]]:
    """Check the customer may order and price the products, from the replicas first.

    Returns the user if it had to be learnt over HTTP, every product ordered, and the
    products that had to be learnt over HTTP. Inactive or deleted accounts are refused,
    unknown products are unprocessable.
    """
    async with request.app[TRANSACTIONS].db.reading() as session:
        user = await replicas.known_user(session, user_id)
        known = await replicas.known_products(session, product_ids)
    directory = request.app[DIRECTORY]
    found = None
    if user is None:
        try:
            found = await directory.user(user_id, request.headers["Authorization"])
        except Refused:
            raise Forbidden(
                "your account is deactivated or deleted: it cannot place orders"
            ) from None
        if found is None:
            raise Forbidden("your account does not exist any more")
        user = replicas.KnownUser(user_id, found.get("status", "active"))
    if user.status != "active":
        raise Forbidden(f"your account is {user.status}: it cannot place orders")
    fetched = []
    for product_id in sorted(product_ids - known.keys()):
        try:
            product = await directory.product(product_id)
        except Refused as refused:
            raise Unprocessable(f"product {product_id!r} cannot be ordered: {refused}") from None
        if product is None:
            raise Unprocessable(f"unknown product {product_id!r}")
        known[product_id] = KnownProduct(product_id, product["name"], Decimal(product["price"]))
        fetched.append(known[product_id])
    return found, known, fetched
