"""The payment service over HTTP on the real broker and PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

import payment_svc.app
from bus.amqp import AmqpBroker
from payment_svc import store
from payment_svc.providers import PaymentGateway
from tests.integration.conftest import ServiceStarter
from tests.integration.test_payment_support import EventLog, LateFirstAnswers, PaymentHttp
from tests.support import Tokens

pytestmark = pytest.mark.integration


@pytest.fixture
def tokens() -> Tokens:
    return Tokens()


@pytest.fixture
async def http(run_service: ServiceStarter, tokens: Tokens) -> AsyncIterator[PaymentHttp]:
    service = await run_service(payment_svc.app, verifier=tokens.verifier)
    async with PaymentHttp(service) as client:
        yield client


def new_user() -> str:
    return f"u-{uuid.uuid4().hex[:12]}"


async def test_processing_a_payment_answers_201_and_announces_payment_succeeded(
    http: PaymentHttp, tokens: Tokens, amqp: AmqpBroker, unique: str
) -> None:
    events = await EventLog.watch(amqp, unique)
    user = new_user()

    answer = await http.call(
        "POST",
        "/payments/process",
        token=tokens.mint(user),
        json={"amount": 1459.97, "provider": "stripe", "payment_method": "tok_visa"},
    )

    assert answer.status == 201, answer.body
    payment = answer.body
    assert payment["id"].startswith("pay_")
    assert payment["order_id"] is None
    assert payment["user_id"] == user
    assert (payment["amount"], payment["currency"], payment["status"]) == (
        "1459.97",
        "USD",
        "completed",
    )
    assert payment["fees"] == {"processing": "42.64", "net": "1417.33"}
    assert (payment["refunded_amount"], payment["failure_reason"]) == ("0.00", None)
    assert payment["processed_at"] is not None
    (succeeded,) = await events.wait_for("payment.succeeded", payment_id=payment["id"])
    assert succeeded.data == {
        "order_id": None,
        "payment_id": payment["id"],
        "amount": "1459.97",
        "currency": "USD",
        "provider": "stripe",
        "fees": {"processing": "42.64", "net": "1417.33"},
    }
    assert succeeded.correlationid == answer.headers["X-Correlation-ID"]
    transaction = await http.call(
        "GET", f"/transactions/{payment['transaction_id']}", token=tokens.mint(user)
    )
    assert transaction.body | {"id": "-", "created_at": "-"} == {
        "id": "-",
        "payment_id": payment["id"],
        "type": "payment",
        "status": "completed",
        "amount": "1459.97",
        "currency": "USD",
        "provider": "stripe",
        "created_at": "-",
    }


async def test_declined_card_answers_402_records_a_failed_payment_and_announces_it(
    http: PaymentHttp, tokens: Tokens, amqp: AmqpBroker, unique: str
) -> None:
    events = await EventLog.watch(amqp, unique)
    token = tokens.mint(new_user())

    answer = await http.call(
        "POST",
        "/payments/process",
        token=token,
        json={"amount": "25.00", "provider": "paypal", "payment_method": "tok_declined"},
    )

    assert answer.status == 402
    assert answer.headers["Content-Type"].startswith("application/problem+json")
    assert answer.body["detail"] == "payment declined: card declined"
    failed_payment = answer.body["payment"]
    assert (failed_payment["status"], failed_payment["failure_reason"]) == (
        "failed",
        "card declined",
    )
    (failed,) = await events.wait_for("payment.failed", payment_id=failed_payment["id"])
    assert failed.data == {
        "order_id": None,
        "payment_id": failed_payment["id"],
        "reason": "card declined",
        "provider": "paypal",
    }
    recorded = await http.call("GET", f"/payments/{failed_payment['id']}", token=token)
    assert recorded.body["status"] == "failed"
    transaction = await http.call(
        "GET", f"/transactions/{failed_payment['transaction_id']}", token=token
    )
    assert (transaction.body["type"], transaction.body["status"]) == ("payment", "failed")


async def test_idempotency_key_retry_returns_the_same_payment_and_charges_once(
    http: PaymentHttp, tokens: Tokens
) -> None:
    user = new_user()
    token = tokens.mint(user)
    body = {"amount": "100", "provider": "square", "payment_method": "tok_visa"}
    key = {"Idempotency-Key": f"checkout-{uuid.uuid4()}"}

    first = await http.call("POST", "/payments/process", token=token, json=body, headers=key)
    # the same request, written differently: the same amount and the default currency
    retry = await http.call(
        "POST",
        "/payments/process",
        token=token,
        json=body | {"amount": 100.0, "currency": "USD"},
        headers=key,
    )
    changed = await http.call(
        "POST", "/payments/process", token=token, json=body | {"amount": "101"}, headers=key
    )
    someone_else = await http.call(
        "POST", "/payments/process", token=tokens.mint(new_user()), json=body, headers=key
    )

    assert (first.status, retry.status) == (201, 201)
    assert retry.body == first.body
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert changed.status == 422
    assert "different request" in changed.body["detail"]
    assert someone_else.status == 201  # keys are per caller
    assert someone_else.body["id"] != first.body["id"]
    transactions = await http.call("GET", "/transactions", token=token)
    assert transactions.body["total"] == 1
    assert await http.attempts("square") == 2  # the first caller once, the other once


async def test_a_retry_after_a_lost_answer_names_the_same_charge_to_the_provider(
    run_service: ServiceStarter, tokens: Tokens
) -> None:
    provider = LateFirstAnswers(late={"charge"})
    gateway = PaymentGateway({"stripe": provider}, timeout=0.2)
    service = await run_service(payment_svc.app, verifier=tokens.verifier, gateway=gateway)
    token = tokens.mint(new_user())
    body = {"amount": "100", "provider": "stripe", "payment_method": "tok_visa"}
    key = {"Idempotency-Key": f"checkout-{uuid.uuid4()}"}

    async with PaymentHttp(service) as http:
        lost = await http.call("POST", "/payments/process", token=token, json=body, headers=key)
        retried = await http.call("POST", "/payments/process", token=token, json=body, headers=key)
        other = await http.call(
            "POST", "/payments/process", token=token, json=body, headers={"Idempotency-Key": "2"}
        )

    assert (lost.status, retried.status, other.status) == (504, 201, 201)
    first, again, another = provider.references("charge")
    assert again == first  # the provider answers the charge it made: the card paid once
    assert another != first  # another key is another charge
    assert len(provider.moved) == 2


async def test_concurrent_requests_with_one_idempotency_key_charge_once(
    run_service: ServiceStarter, tokens: Tokens
) -> None:
    slow = await run_service(
        payment_svc.app, verifier=tokens.verifier, settings={"payment_latency_ms": 200}
    )
    token = tokens.mint(new_user())
    body = {"amount": "80.00", "provider": "stripe", "payment_method": "tok_visa"}
    key = {"Idempotency-Key": "double-click"}

    async with PaymentHttp(slow) as http:
        answers = await asyncio.gather(
            *(
                http.call("POST", "/payments/process", token=token, json=body, headers=key)
                for _ in range(3)
            )
        )
        transactions = await http.call("GET", "/transactions", token=token)
        attempts = await http.attempts("stripe")

    assert [answer.status for answer in answers] == [201, 201, 201]
    assert len({answer.body["id"] for answer in answers}) == 1
    assert transactions.body["total"] == 1
    assert attempts == 1


async def test_bad_payments_are_refused_before_anything_is_charged_or_recorded(
    http: PaymentHttp, tokens: Tokens
) -> None:
    token = tokens.mint(new_user())
    good = {"amount": "10.00", "provider": "stripe", "payment_method": "tok_visa"}

    async def status_of(**change: object) -> int:
        answer = await http.call("POST", "/payments/process", token=token, json=good | change)
        assert answer.headers["Content-Type"].startswith("application/problem+json")
        return answer.status

    assert await status_of(amount="0") == 422
    assert await status_of(amount="-5") == 422
    assert await status_of(amount="1.005") == 422
    assert await status_of(currency="dollars") == 422
    assert await status_of(provider="bitpay") == 422
    assert await status_of(payment_method="4242 4242 4242 4242") == 422
    assert await status_of(provider="crypto") == 503
    for key in ("k" * 256, "tab\there"):
        keyed = await http.call(
            "POST", "/payments/process", token=token, json=good, headers={"Idempotency-Key": key}
        )
        assert keyed.status == 422
        assert "Idempotency-Key" in keyed.body["detail"]
    unauthenticated = await http.call("POST", "/payments/process", json=good)
    assert unauthenticated.status == 401
    payments = await http.call("GET", "/payments", token=tokens.mint("staff", "admin"))
    assert payments.body["total"] == 0
    assert await http.attempts("stripe") == 0


async def test_owners_see_their_own_payments_and_staff_see_everyones(
    http: PaymentHttp, tokens: Tokens
) -> None:
    alice, bob = tokens.mint(new_user()), tokens.mint(new_user())
    alices = [await http.pay(alice, amount="10.00"), await http.pay(alice, amount="20.00")]
    bobs = await http.pay(bob)

    mine = await http.call("GET", "/payments", token=alice)
    page = await http.call("GET", "/payments?limit=1&offset=1", token=alice)
    not_mine = await http.call("GET", f"/payments/{bobs['id']}", token=alice)
    not_my_transaction = await http.call(
        "GET", f"/transactions/{bobs['transaction_id']}", token=alice
    )
    my_transactions = await http.call("GET", "/transactions", token=alice)
    by_admin = await http.call("GET", "/payments", token=tokens.mint("a-1", "admin"))
    by_manager = await http.call(
        "GET", f"/payments/{bobs['id']}", token=tokens.mint("m-1", "manager")
    )

    assert [p["id"] for p in mine.body["items"]] == [alices[1]["id"], alices[0]["id"]]
    assert mine.body["total"] == 2
    assert (page.body["items"][0]["id"], page.body["limit"], page.body["offset"]) == (
        alices[0]["id"],
        1,
        1,
    )
    assert not_mine.status == 404
    assert not_my_transaction.status == 404
    assert {t["payment_id"] for t in my_transactions.body["items"]} == {p["id"] for p in alices}
    assert by_admin.body["total"] == 3
    assert by_manager.status == 200
    assert by_manager.body == bobs


async def test_partial_then_full_refund_and_over_refund_is_a_conflict(
    http: PaymentHttp, tokens: Tokens, amqp: AmqpBroker, unique: str
) -> None:
    events = await EventLog.watch(amqp, unique)
    payer = tokens.mint(new_user())
    manager = tokens.mint("m-1", "manager")
    payment = await http.pay(payer, amount="100.00")

    def refund(**fields: object) -> dict[str, object]:
        return {"payment_id": payment["id"]} | fields

    partial = await http.call(
        "POST", "/refunds", token=manager, json=refund(amount="30.00", reason="one item broken")
    )
    too_much = await http.call("POST", "/refunds", token=manager, json=refund(amount="70.01"))
    by_payer = await http.call("POST", "/refunds", token=payer, json=refund(amount="1.00"))
    rest = await http.call("POST", "/refunds", token=manager, json=refund())
    again = await http.call("POST", "/refunds", token=manager, json=refund(amount="0.01"))
    missing = await http.call("POST", "/refunds", token=manager, json={"payment_id": "pay_none"})

    assert partial.status == 201, partial.body
    assert (partial.body["amount"], partial.body["payment_status"]) == (
        "30.00",
        "partially_refunded",
    )
    assert partial.body["reason"] == "one item broken"
    assert too_much.status == 409
    assert "exceeds the 70.00 still refundable" in too_much.body["detail"]
    assert by_payer.status == 403
    assert rest.status == 201
    assert (rest.body["amount"], rest.body["payment_status"]) == ("70.00", "refunded")
    assert again.status == 409
    assert missing.status == 404
    after = await http.call("GET", f"/payments/{payment['id']}", token=payer)
    assert (after.body["status"], after.body["refunded_amount"]) == ("refunded", "100.00")
    transactions = await http.call("GET", "/transactions", token=payer)
    assert sorted((t["type"], t["amount"]) for t in transactions.body["items"]) == [
        ("payment", "100.00"),
        ("refund", "30.00"),
        ("refund", "70.00"),
    ]
    refunded = await events.wait_for("payment.refunded", count=2, payment_id=payment["id"])
    assert [(e.data["amount"], e.data["payment_status"]) for e in refunded] == [
        ("30.00", "partially_refunded"),
        ("70.00", "refunded"),
    ]
    assert refunded[0].data["refund_id"] == partial.body["id"]
    assert refunded[0].data["order_id"] is None


async def test_refunding_a_failed_payment_is_a_conflict(http: PaymentHttp, tokens: Tokens) -> None:
    declined = await http.call(
        "POST",
        "/payments/process",
        token=tokens.mint(new_user()),
        json={"amount": "10.00", "provider": "stripe", "payment_method": "tok_declined"},
    )

    answer = await http.call(
        "POST",
        "/refunds",
        token=tokens.mint("a-1", "admin"),
        json={"payment_id": declined.body["payment"]["id"]},
    )

    assert answer.status == 409
    assert answer.body["detail"] == "a failed payment cannot be refunded"


async def test_an_order_is_paid_once_over_http_too(http: PaymentHttp, tokens: Tokens) -> None:
    token = tokens.mint(new_user())
    order_id = f"ord-{uuid.uuid4().hex}"
    paid = await http.pay(token, order_id=order_id)

    again = await http.call(
        "POST",
        "/payments/process",
        token=token,
        json={
            "amount": "5.00",
            "provider": "paypal",
            "payment_method": "tok_visa",
            "order_id": order_id,
        },
    )

    assert paid["order_id"] == order_id
    assert again.status == 409
    assert again.body["payment_id"] == paid["id"]
    assert await http.attempts("paypal") == 0


async def test_providers_are_public_with_fees_status_and_recent_health(
    http: PaymentHttp, tokens: Tokens
) -> None:
    token = tokens.mint(new_user())
    await http.pay(token)
    await http.call(
        "POST",
        "/payments/process",
        token=token,
        json={"amount": "10.00", "provider": "stripe", "payment_method": "tok_declined"},
    )

    answer = await http.call("GET", "/providers")

    assert answer.status == 200
    listed = {item["name"]: item for item in answer.body["items"]}
    assert answer.body["total"] == 4
    assert {
        name: (p["status"], p["fee_percent"], p["fee_fixed"]) for name, p in listed.items()
    } == {
        "stripe": ("active", "2.9", "0.30"),
        "paypal": ("active", "3.4", "0.00"),
        "square": ("active", "2.6", "0.10"),
        "crypto": ("maintenance", "1.5", "0.00"),
    }
    stripe = listed["stripe"]["health"]
    assert (stripe["attempts"], stripe["success_rate"], stripe["window"]) == (2, 0.5, 100)
    assert 0 <= stripe["average_latency_ms"] <= stripe["p95_latency_ms"]
    assert listed["paypal"]["health"]["success_rate"] is None


async def test_payments_and_idempotency_keys_survive_a_restart(
    run_service: ServiceStarter, tokens: Tokens
) -> None:
    token = tokens.mint(new_user())
    key = {"Idempotency-Key": "order-form-1"}
    body = {"amount": "42.00", "provider": "stripe", "payment_method": "tok_visa"}
    first = await run_service(payment_svc.app, verifier=tokens.verifier)
    async with PaymentHttp(first) as http:
        paid = await http.call("POST", "/payments/process", token=token, json=body, headers=key)
    await first.stop()

    second = await run_service(payment_svc.app, verifier=tokens.verifier)
    async with PaymentHttp(second) as http:
        kept = await http.call("GET", f"/payments/{paid.body['id']}", token=token)
        retried = await http.call("POST", "/payments/process", token=token, json=body, headers=key)
        transactions = await http.call("GET", "/transactions", token=token)

    assert paid.status == 201
    assert kept.body == paid.body
    assert (retried.status, retried.body["id"]) == (201, paid.body["id"])
    assert transactions.body["total"] == 1


async def test_forgotten_idempotency_keys_no_longer_replay(
    run_service: ServiceStarter, tokens: Tokens
) -> None:
    service = await run_service(payment_svc.app, verifier=tokens.verifier)
    token = tokens.mint(new_user())
    body = {"amount": "12.00", "provider": "stripe", "payment_method": "tok_visa"}
    key = {"Idempotency-Key": "weekly-invoice"}
    async with PaymentHttp(service) as http:
        first = await http.call("POST", "/payments/process", token=token, json=body, headers=key)
        async with service.db.session() as session, session.begin():
            young = await store.forget_idempotency_keys(
                session, before=datetime.now(UTC) - timedelta(hours=1)
            )
            old = await store.forget_idempotency_keys(
                session, before=datetime.now(UTC) + timedelta(seconds=1)
            )
        later = await http.call("POST", "/payments/process", token=token, json=body, headers=key)

    assert (young, old) == (0, 1)
    assert later.status == 201
    assert later.body["id"] != first.body["id"]
