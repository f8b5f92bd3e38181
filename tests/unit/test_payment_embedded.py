"""The payment service as ``microshop demo`` runs it: the in-process broker and SQLite."""

from __future__ import annotations

import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp

from bus.broker import Delivery
from bus.envelope import Envelope, MessageRegistry
from payment_svc import app
from payment_svc.messages import EVENTS, PaymentCharge
from tests.support import Tokens, eventually, free_port


async def test_payments_over_http_and_charge_commands_work_on_sqlite(tmp_path: Path) -> None:
    settings = app.Settings(
        port=free_port(),
        broker_url=f"memory://{uuid.uuid4().hex}",  # a broker of this test's own
        database_url=f"sqlite+aiosqlite:///{tmp_path}/payment.db",
        heartbeat_seconds=60,
    )
    tokens = Tokens()
    service = app.build(settings, verifier=tokens.verifier)
    broker = service.broker
    heard: list[Envelope] = []

    async def record(delivery: Delivery) -> None:
        heard.append(delivery.envelope)

    def answers(order_id: str) -> list[Envelope]:
        return [e for e in heard if e.data.get("order_id") == order_id]

    async def charge(order_id: str, method: str = "tok_visa") -> None:
        command = PaymentCharge(
            order_id=order_id,
            user_id="u-1",
            amount=Decimal("1459.97"),
            provider="stripe",
            method=method,
        )
        await broker.publish(Envelope.wrap(command, source="/tests"))

    async def call(method: str, path: str, token: str, **body: Any) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"}
        url = f"{settings.public_url}{path}"
        async with (
            aiohttp.ClientSession() as http,
            http.request(method, url, headers=headers, json=body or None) as response,
        ):
            return response.status, await response.json(content_type=None)

    user, admin = tokens.mint("u-1"), tokens.mint("a-1", "admin")
    await broker.connect()
    await broker.consume("watch", [e.type for e in EVENTS], record, MessageRegistry(EVENTS))
    await service.start()
    try:
        paid = await call(
            "POST",
            "/payments/process",
            user,
            amount="100.00",
            provider="stripe",
            payment_method="tok_visa",
        )
        await charge("ord-1")
        await charge("ord-1")  # the saga asking again before the first answer
        await charge("ord-2", method="tok_declined")
        await eventually(lambda: len(answers("ord-1")) == 2 and bool(answers("ord-2")))
        read_back = await call("GET", f"/payments/{paid[1]['id']}", user)
        listed = await call("GET", "/payments", admin)
    finally:
        await service.stop()
        await broker.close()

    status, payment = paid
    assert (status, payment["status"], payment["fees"]) == (
        201,
        "completed",
        {"processing": "3.20", "net": "96.80"},
    )
    assert read_back == (200, payment)
    first, again = answers("ord-1")
    assert (first.type, again.type) == ("payment.succeeded", "payment.succeeded")
    assert again.data == first.data
    assert first.data["fees"] == {"processing": "42.64", "net": "1417.33"}
    assert [(e.type, e.data["reason"]) for e in answers("ord-2")] == [
        ("payment.failed", "card declined")
    ]
    assert listed[1]["total"] == 3  # one over HTTP, one per order: the repeat charged nothing


def test_charges_never_share_a_transaction_as_a_rollback_would_call_the_provider_again(
    tmp_path: Path,
) -> None:
    settings = app.Settings(
        broker_url=f"memory://{uuid.uuid4().hex}",
        database_url=f"sqlite+aiosqlite:///{tmp_path}/payment.db",
        group_commit_size=32,
    )
    service = app.build(settings, verifier=Tokens().verifier)

    assert service.transactions.group_size == 1
