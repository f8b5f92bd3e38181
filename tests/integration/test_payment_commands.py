"""The payment service's commands on the real broker and PostgreSQL: charge and refund orders."""

from __future__ import annotations

import uuid
from decimal import Decimal

import pytest
from sqlalchemy import text

import payment_svc.app
from bus.amqp import AmqpBroker
from bus.envelope import Envelope
from bus.inbox import DUPLICATES
from bus.service import Service
from payment_svc.messages import PaymentCharge, PaymentRefund
from payment_svc.providers import PaymentGateway
from tests.integration.conftest import ServiceStarter
from tests.integration.test_payment_support import EventLog, LateFirstAnswers, PaymentHttp
from tests.support import Tokens, eventually

pytestmark = pytest.mark.integration


@pytest.fixture
def tokens() -> Tokens:
    return Tokens()


@pytest.fixture
async def service(run_service: ServiceStarter, tokens: Tokens) -> Service:
    return await run_service(payment_svc.app, verifier=tokens.verifier)


@pytest.fixture
async def events(amqp: AmqpBroker, unique: str) -> EventLog:
    return await EventLog.watch(amqp, unique)


def charge(order_id: str, *, amount: str = "1459.97", **fields: str) -> Envelope:
    command = PaymentCharge.model_validate(
        {
            "order_id": order_id,
            "user_id": "u-buyer",
            "amount": amount,
            "provider": "stripe",
            "method": "tok_visa",
        }
        | fields
    )
    return Envelope.wrap(command, source="/tests")


def raw_charge(data: dict[str, str]) -> Envelope:
    """A ``payment.charge`` as any AMQP client might write it: only the data it gives."""
    return Envelope(id=uuid.uuid4().hex, source="/tests", type="payment.charge", data=data)


async def refund_25_then_the_rest(
    amqp: AmqpBroker, events: EventLog, order_id: str
) -> PaymentRefund:
    """Refund 25.00 of the order, then the rest, each once answered; the second command."""
    partial = PaymentRefund(order_id=order_id, amount=Decimal("25.00"), reason="late delivery")
    await amqp.publish(Envelope.wrap(partial, source="/tests"))
    await events.wait_for("payment.refunded", order_id=order_id)
    rest = PaymentRefund(order_id=order_id, reason="order cancelled")
    await amqp.publish(Envelope.wrap(rest, source="/tests"))
    await events.wait_for("payment.refunded", count=2, order_id=order_id)
    return rest


def new_order() -> str:
    return f"ord-{uuid.uuid4().hex}"


async def test_charge_command_answers_payment_succeeded_with_the_fees(
    service: Service, events: EventLog, amqp: AmqpBroker, tokens: Tokens
) -> None:
    order_id = new_order()
    command = charge(order_id)

    await amqp.publish(command)

    (succeeded,) = await events.wait_for("payment.succeeded", order_id=order_id)
    assert succeeded.data == {
        "order_id": order_id,
        "payment_id": succeeded.data["payment_id"],
        "amount": "1459.97",
        "currency": "USD",
        "provider": "stripe",
        "fees": {"processing": "42.64", "net": "1417.33"},
    }
    assert (succeeded.causationid, succeeded.correlationid) == (command.id, command.correlationid)
    async with PaymentHttp(service) as http:
        payment = await http.call(
            "GET", f"/payments/{succeeded.data['payment_id']}", token=tokens.mint("u-buyer")
        )
    assert (payment.body["order_id"], payment.body["status"]) == (order_id, "completed")


async def test_charge_command_without_a_user_is_charged_and_only_staff_see_the_payment(
    service: Service, events: EventLog, amqp: AmqpBroker, tokens: Tokens
) -> None:
    order_id = new_order()
    # the published contract: {order_id, amount, currency, provider, method}, no user_id
    data = {
        "order_id": order_id,
        "amount": "25.00",
        "currency": "USD",
        "provider": "stripe",
        "method": "tok_visa",
    }

    for _ in range(2):  # the second is the publisher asking again: answered the same
        await amqp.publish(raw_charge(data))

    answers = await events.wait_for("payment.succeeded", count=2, order_id=order_id)
    assert answers[1].data == answers[0].data
    assert answers[0].data["amount"] == "25.00"
    assert not events.about("payment.failed", order_id=order_id)
    payment_id = answers[0].data["payment_id"]
    async with PaymentHttp(service) as http:
        by_staff = await http.call(
            "GET", f"/payments/{payment_id}", token=tokens.mint("m-1", "manager")
        )
        by_a_user = await http.call("GET", f"/payments/{payment_id}", token=tokens.mint("u-1"))
    assert (by_staff.status, by_staff.body["status"]) == (200, "completed")
    assert by_staff.body["user_id"] is None
    assert by_a_user.status == 404


async def test_tables_from_before_a_charge_could_name_no_user_are_upgraded_at_start(
    run_service: ServiceStarter, events: EventLog, amqp: AmqpBroker, tokens: Tokens
) -> None:
    first = await run_service(payment_svc.app, verifier=tokens.verifier)
    schema = first.settings.schema_name
    async with first.db.session() as session, session.begin():
        for table in ("payments", "transactions"):  # as the earlier version made them
            await session.execute(
                text(f'ALTER TABLE "{schema}"."{table}" ALTER COLUMN user_id SET NOT NULL')
            )
    await first.stop()

    await run_service(payment_svc.app, verifier=tokens.verifier)
    order_id = new_order()
    data = {"order_id": order_id, "amount": "9.99", "provider": "stripe", "method": "tok_visa"}
    await amqp.publish(raw_charge(data))

    (succeeded,) = await events.wait_for("payment.succeeded", order_id=order_id)
    assert succeeded.data["amount"] == "9.99"


async def test_charge_command_with_a_declined_card_answers_payment_failed(
    service: Service, events: EventLog, amqp: AmqpBroker
) -> None:
    order_id = new_order()

    await amqp.publish(charge(order_id, method="tok_declined"))

    (failed,) = await events.wait_for("payment.failed", order_id=order_id)
    assert failed.data["reason"] == "card declined"
    assert failed.data["payment_id"].startswith("pay_")


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"provider": "crypto"}, "provider crypto is in maintenance"),
        ({"method": "tok_mastercard"}, "unsupported payment method"),
        ({"provider": "bitpay"}, "unknown provider 'bitpay'"),
        ({"amount": "0"}, "amount must be positive"),
    ],
)
async def test_charge_command_that_cannot_be_attempted_fails_without_a_payment(
    service: Service,
    events: EventLog,
    amqp: AmqpBroker,
    tokens: Tokens,
    fields: dict[str, str],
    reason: str,
) -> None:
    order_id = new_order()

    await amqp.publish(charge(order_id, **fields))

    (failed,) = await events.wait_for("payment.failed", order_id=order_id)
    assert failed.data["payment_id"] is None
    assert failed.data["reason"].startswith(reason)
    async with PaymentHttp(service) as http:
        payments = await http.call("GET", "/payments", token=tokens.mint("a-1", "admin"))
    assert payments.body["total"] == 0


async def test_duplicate_charges_for_an_order_make_one_payment_and_call_the_provider_once(
    run_service: ServiceStarter, events: EventLog, amqp: AmqpBroker, tokens: Tokens
) -> None:
    # a slow provider keeps the first charge in flight while the copies arrive
    service = await run_service(
        payment_svc.app, verifier=tokens.verifier, settings={"payment_latency_ms": 200}
    )
    order_id = new_order()
    command = charge(order_id)
    retry = charge(order_id)  # the saga asking again: the same charge, another message
    duplicates_before = DUPLICATES.labels(service.name)._value.get()

    await amqp.publish(command)
    await amqp.publish(command)  # redelivered: the same message id
    await amqp.publish(retry)

    answers = await events.wait_for("payment.succeeded", count=2, order_id=order_id)
    await eventually(lambda: DUPLICATES.labels(service.name)._value.get() > duplicates_before)
    assert answers[1].data == answers[0].data
    async with PaymentHttp(service) as http:
        admin = tokens.mint("a-1", "admin")
        payments = await http.call("GET", "/payments", token=admin)
        transactions = await http.call("GET", "/transactions", token=admin)
        attempts = await http.attempts("stripe")
    assert payments.body["total"] == 1
    assert transactions.body["total"] == 1
    assert attempts == 1
    assert len(events.about("payment.succeeded", order_id=order_id)) == 2


async def test_a_charge_whose_answer_was_lost_is_retried_without_charging_the_card_again(
    run_service: ServiceStarter, events: EventLog, amqp: AmqpBroker, tokens: Tokens
) -> None:
    provider = LateFirstAnswers(late={"charge"})
    gateway = PaymentGateway({"stripe": provider}, timeout=0.2)
    service = await run_service(payment_svc.app, verifier=tokens.verifier, gateway=gateway)
    order_id = new_order()

    await amqp.publish(charge(order_id))  # times out once the card is charged; then retried

    (succeeded,) = await events.wait_for("payment.succeeded", order_id=order_id)
    first, retried = provider.references("charge")
    assert retried == first  # the provider knows the charge again and takes nothing more
    assert provider.moved == {first: Decimal("1459.97")}
    async with PaymentHttp(service) as http:
        payments = await http.call("GET", "/payments", token=tokens.mint("a-1", "admin"))
    assert [p["id"] for p in payments.body["items"]] == [succeeded.data["payment_id"]]


async def test_a_refund_whose_answer_was_lost_is_retried_without_refunding_twice(
    run_service: ServiceStarter, events: EventLog, amqp: AmqpBroker, tokens: Tokens
) -> None:
    provider = LateFirstAnswers(late={"refund"})
    gateway = PaymentGateway({"stripe": provider}, timeout=0.2)
    await run_service(payment_svc.app, verifier=tokens.verifier, gateway=gateway)
    order_id = new_order()
    await amqp.publish(charge(order_id, amount="100.00"))
    await events.wait_for("payment.succeeded", order_id=order_id)

    await refund_25_then_the_rest(amqp, events, order_id)

    lost, retried, second = provider.references("refund")
    assert retried == lost  # the lost refund, asked again: the same refund
    assert second != lost  # a later refund of the same payment is a new one
    assert sorted(provider.moved[r] for r in (lost, second)) == [Decimal("25.00"), Decimal("75.00")]


async def test_a_payment_made_over_http_for_an_order_does_not_pay_for_the_sagas_charge(
    service: Service, events: EventLog, amqp: AmqpBroker, tokens: Tokens
) -> None:
    order_id = new_order()
    async with PaymentHttp(service) as http:
        await http.pay(tokens.mint("u-someone-else"), amount="0.50", order_id=order_id)

    await amqp.publish(charge(order_id))

    (failed,) = await events.wait_for("payment.failed", order_id=order_id)
    assert failed.data["reason"] == f"order {order_id} already has a different payment"
    assert failed.data["payment_id"] is None


async def test_a_declined_order_answers_its_recorded_failure_again(
    service: Service, events: EventLog, amqp: AmqpBroker
) -> None:
    order_id = new_order()
    await amqp.publish(charge(order_id, method="tok_declined"))
    (first,) = await events.wait_for("payment.failed", order_id=order_id)

    await amqp.publish(charge(order_id))  # a good card now: still the one recorded outcome

    answers = await events.wait_for("payment.failed", count=2, order_id=order_id)
    assert answers[1].data == first.data
    assert not events.about("payment.succeeded", order_id=order_id)


async def test_a_copy_that_would_be_refused_now_answers_the_recorded_charge(
    service: Service, events: EventLog, amqp: AmqpBroker
) -> None:
    order_id = new_order()
    await amqp.publish(charge(order_id))
    (first,) = await events.wait_for("payment.succeeded", order_id=order_id)

    await amqp.publish(charge(order_id, method="tok_unsupported"))  # refused, were it new

    answers = await events.wait_for("payment.succeeded", count=2, order_id=order_id)
    assert answers[1].data == first.data
    assert not events.about("payment.failed", order_id=order_id)


async def test_refund_command_refunds_the_rest_and_a_repeat_answers_the_same_refund(
    service: Service, events: EventLog, amqp: AmqpBroker, tokens: Tokens
) -> None:
    order_id = new_order()
    await amqp.publish(charge(order_id, amount="100.00"))
    (paid,) = await events.wait_for("payment.succeeded", order_id=order_id)
    payment_id = paid.data["payment_id"]

    full = await refund_25_then_the_rest(amqp, events, order_id)
    await amqp.publish(Envelope.wrap(full, source="/tests"))  # the saga asks again

    refunded = await events.wait_for("payment.refunded", count=3, order_id=order_id)
    assert [(e.data["amount"], e.data["payment_status"]) for e in refunded] == [
        ("25.00", "partially_refunded"),
        ("75.00", "refunded"),
        ("75.00", "refunded"),
    ]
    assert refunded[2].data == refunded[1].data
    assert refunded[1].data == {
        "order_id": order_id,
        "payment_id": payment_id,
        "refund_id": refunded[1].data["refund_id"],
        "amount": "75.00",
        "reason": "order cancelled",
        "payment_status": "refunded",
    }
    async with PaymentHttp(service) as http:
        token = tokens.mint("u-buyer")
        payment = await http.call("GET", f"/payments/{payment_id}", token=token)
        transactions = await http.call("GET", "/transactions", token=token)
    assert (payment.body["status"], payment.body["refunded_amount"]) == ("refunded", "100.00")
    assert transactions.body["total"] == 3


async def test_refund_command_without_a_successful_payment_answers_refund_failed(
    service: Service, events: EventLog, amqp: AmqpBroker
) -> None:
    never_paid, declined = new_order(), new_order()
    await amqp.publish(charge(declined, method="tok_declined"))
    await events.wait_for("payment.failed", order_id=declined)

    for order_id in (never_paid, declined):
        await amqp.publish(Envelope.wrap(PaymentRefund(order_id=order_id, reason="x"), source="/t"))

    for order_id in (never_paid, declined):
        (failed,) = await events.wait_for("payment.refund_failed", order_id=order_id)
        assert failed.data["reason"] == f"order {order_id} has no successful payment"
    assert not events.about("payment.refunded", order_id=declined)


async def test_refund_command_over_what_is_left_answers_refund_failed(
    service: Service, events: EventLog, amqp: AmqpBroker
) -> None:
    order_id = new_order()
    await amqp.publish(charge(order_id, amount="10.00"))
    await events.wait_for("payment.succeeded", order_id=order_id)

    too_much = PaymentRefund(order_id=order_id, amount=Decimal("10.01"), reason="x")
    await amqp.publish(Envelope.wrap(too_much, source="/tests"))

    (failed,) = await events.wait_for("payment.refund_failed", order_id=order_id)
    assert failed.data["reason"] == "refund of 10.01 exceeds the 10.00 still refundable"
