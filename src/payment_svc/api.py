"""HTTP routes: providers, payments, transactions, refunds. Thin: check, delegate, answer."""

from __future__ import annotations

import hashlib
from decimal import Decimal
from typing import Annotated, Any

from aiohttp import web
from pydantic import AfterValidator, BaseModel, Field
from sqlalchemy.ext.asyncio import AsyncConnection

from bus.web import (
    CORRELATION_ID,
    TRANSACTIONS,
    Api,
    Conflict,
    HttpProblem,
    NotFound,
    Page,
    Unprocessable,
    idempotency_key,
    json_response,
    page_params,
    principal,
)
from payment_svc import charging, refunding, store
from payment_svc.domain import (
    PROVIDERS,
    ChargeRefused,
    InvalidRefundAmount,
    Payment,
    PaymentStatus,
    ProviderName,
    ProviderStatus,
    ProviderUnavailable,
    Refund,
    RefundRefused,
    Transaction,
    money,
)
from payment_svc.providers import PaymentGateway, ProviderHealth, ProviderTimeout

api = Api()
GATEWAY = web.AppKey("GATEWAY", PaymentGateway)
STAFF = ("admin", "manager")

# 100 and 100.00 are one amount: normalised, they also fingerprint alike for Idempotency-Key
Amount = Annotated[Decimal, Field(gt=0, max_digits=11, decimal_places=2), AfterValidator(money)]


class ProcessPayment(BaseModel):
    """A payment to make; ``order_id`` ties it to an order, which is charged at most once."""

    amount: Amount
    currency: str = Field(default="USD", pattern=r"^[A-Z]{3}$")
    provider: ProviderName
    payment_method: str = Field(min_length=1, max_length=100)
    order_id: str | None = Field(default=None, min_length=1, max_length=100)


class RefundRequest(BaseModel):
    """Give back ``amount`` of a payment, or all that is left of it when ``amount`` is absent."""

    payment_id: str = Field(min_length=1, max_length=40)
    amount: Amount | None = None
    reason: str = Field(default="no reason given", min_length=1, max_length=500)


class ProviderView(BaseModel):
    """A provider's terms and its recent health on this instance."""

    name: str
    status: ProviderStatus
    fee_percent: Decimal
    fee_fixed: Decimal
    health: ProviderHealth


def _session(request: web.Request) -> AsyncConnection:
    return request.app[TRANSACTIONS].db.session()


def _owner_filter(request: web.Request) -> str | None:
    """Whose records the caller may see: their own, or everyone's (None) for staff."""
    caller = principal(request)
    return None if caller.is_staff else caller.user_id


@api.get("/providers", response=Page[ProviderView])
async def list_providers(request: web.Request) -> web.Response:
    """List the payment providers, their fees and their recent health."""
    limit, offset = page_params(request)
    gateway = request.app[GATEWAY]
    views = [
        ProviderView(
            name=provider.name,
            status=provider.status,
            fee_percent=provider.fee_percent,
            fee_fixed=provider.fee_fixed,
            health=gateway.health(provider.name),
        )
        for provider in PROVIDERS.values()
    ]
    page = Page[ProviderView](
        items=views[offset : offset + limit], total=len(views), limit=limit, offset=offset
    )
    return json_response(page)


def _idempotency_key(request: web.Request, body: ProcessPayment) -> store.IdempotencyKey | None:
    key = idempotency_key(request, longest=store.IDEMPOTENCY_KEY_LENGTH)
    if key is None:
        return None
    fingerprint = hashlib.sha256(body.model_dump_json().encode()).hexdigest()
    return store.IdempotencyKey(principal(request).user_id, key, fingerprint)


@api.post("/payments/process", auth=True, body=ProcessPayment, response=Payment, status=201)
async def process_payment(request: web.Request, body: ProcessPayment) -> web.Response:
    """Charge the caller; a declined charge is recorded and answered with 402."""
    charge = charging.ChargeRequest(
        user_id=principal(request).user_id,
        amount=body.amount,
        currency=body.currency,
        provider=body.provider,
        method=body.payment_method,
        order_id=body.order_id,
    )
    key = _idempotency_key(request, body)
    try:
        async with request.app[TRANSACTIONS].begin() as unit:
            charged = await charging.charge(
                unit, request.app[GATEWAY], charge, key=key, correlation_id=request[CORRELATION_ID]
            )
    except ProviderUnavailable as error:
        raise HttpProblem(str(error), status=503) from None
    except (ChargeRefused, charging.KeyReused) as error:
        raise Unprocessable(str(error)) from None
    except charging.AlreadyCharged as error:
        # name the existing payment only to someone allowed to look it up
        visible = _owner_filter(request) in (None, error.payment.user_id)
        extra: dict[str, Any] = {"payment_id": error.payment.id} if visible else {}
        raise Conflict(f"order {body.order_id} already has a payment", **extra) from None
    except ProviderTimeout as error:
        raise HttpProblem(str(error), status=504) from None
    payment = charged.payment
    headers = {"Idempotent-Replayed": "true"} if charged.replayed else None
    if payment.status is PaymentStatus.FAILED:
        raise HttpProblem(
            f"payment declined: {payment.failure_reason}",
            status=402,
            headers=headers,
            payment=payment,
        )
    return json_response(payment, status=201, headers=headers)


@api.get("/payments", auth=True, response=Page[Payment])
async def list_payments(request: web.Request) -> web.Response:
    """List payments, newest first: the caller's own, or everyone's for staff."""
    limit, offset = page_params(request)
    async with _session(request) as session:
        items, total = await store.list_payments(
            session, user_id=_owner_filter(request), limit=limit, offset=offset
        )
    return json_response(Page[Payment](items=items, total=total, limit=limit, offset=offset))


@api.get("/payments/{payment_id}", auth=True, response=Payment)
async def get_payment(request: web.Request) -> web.Response:
    """One payment; someone else's is not found, except for staff."""
    owner = _owner_filter(request)
    async with _session(request) as session:
        payment = await store.get_payment(session, request.match_info["payment_id"])
    if payment is None or owner not in (None, payment.user_id):
        raise NotFound("no such payment")
    return json_response(payment)


@api.get("/transactions", auth=True, response=Page[Transaction])
async def list_transactions(request: web.Request) -> web.Response:
    """List transactions (charge attempts and refunds), newest first, as for payments."""
    limit, offset = page_params(request)
    async with _session(request) as session:
        items, total = await store.list_transactions(
            session, user_id=_owner_filter(request), limit=limit, offset=offset
        )
    return json_response(Page[Transaction](items=items, total=total, limit=limit, offset=offset))


@api.get("/transactions/{transaction_id}", auth=True, response=Transaction)
async def get_transaction(request: web.Request) -> web.Response:
    """One transaction; someone else's is not found, except for staff."""
    async with _session(request) as session:
        transaction = await store.get_transaction(
            session, request.match_info["transaction_id"], owner=_owner_filter(request)
        )
    if transaction is None:
        raise NotFound("no such transaction")
    return json_response(transaction)


@api.post("/refunds", roles=STAFF, body=RefundRequest, response=Refund, status=201)
async def create_refund(request: web.Request, body: RefundRequest) -> web.Response:
    """Refund part or all of a payment (admin, manager)."""
    async with request.app[TRANSACTIONS].begin() as unit:
        payment = await store.get_payment(unit.session, body.payment_id, for_update=True)
        if payment is None:
            raise NotFound("no such payment")
        try:
            made = await refunding.refund(
                unit,
                request.app[GATEWAY],
                payment,
                amount=body.amount,
                reason=body.reason,
                requested_by=principal(request).user_id,
                correlation_id=request[CORRELATION_ID],
            )
        except InvalidRefundAmount as error:
            raise Unprocessable(str(error)) from None
        except RefundRefused as error:
            raise Conflict(str(error), payment_status=payment.status) from None
        except ProviderTimeout as error:
            raise HttpProblem(str(error), status=504) from None
    return json_response(made, status=201)
