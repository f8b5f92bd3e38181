"""The order saga end to end: four service processes on the real RabbitMQ and PostgreSQL.

Demo data gives users alice (admin) and bob (user) and the seed catalogue.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from microshop.local import LocalSystem
from tests.conftest import RabbitAdmin
from tests.integration.system import Client
from tests.support import eventually

pytestmark = pytest.mark.integration

ALICE, BOB = "alice@example.com", "bob@example.com"
VISA = {"provider": "stripe", "method": "tok_visa"}
MOUSE = {"product_id": "mouse", "quantity": 1}
DECLINED = {"provider": "stripe", "method": "tok_declined"}

Launch = Callable[..., Awaitable[Client]]


@pytest.fixture
async def launch(
    rabbit: RabbitAdmin, database_url: str, unique: str, tmp_path: Path
) -> AsyncIterator[Launch]:
    """Start the four services as processes; ``env`` adds settings to every one."""
    systems: list[LocalSystem] = []
    http = aiohttp.ClientSession()

    async def start(**env: str) -> Client:
        system = LocalSystem(rabbit.url, database_url, unique, tmp_path, extra_env=env)
        systems.append(system)
        await system.start()
        return Client(system, http)

    yield start
    for system in systems:
        await system.stop()
    await http.close()


async def place(
    client: Client, items: list[dict[str, Any]], payment: dict[str, str] = VISA, as_user: str = BOB
) -> str:
    status, body = await client.call(
        "POST", "order", "/orders", as_user=as_user, json={"items": items, "payment": payment}
    )
    assert status == 202, body
    assert body["status"] == "pending"
    order_id: str = body["id"]
    return order_id


async def stock(client: Client, product_id: str) -> dict[str, Any]:
    status, body = await client.call("GET", "inventory", "/inventory?limit=200", as_user=ALICE)
    assert status == 200, body
    (row,) = [item for item in body["items"] if item["id"] == product_id]
    return row


async def payments_for(client: Client, order_id: str) -> list[dict[str, Any]]:
    status, body = await client.call("GET", "payment", "/payments?limit=200", as_user=ALICE)
    assert status == 200, body
    return [p for p in body["items"] if p["order_id"] == order_id]


async def test_happy_path_confirms_with_an_exact_total_and_sells_the_stock(launch: Launch) -> None:
    client = await launch()
    items = [{"product_id": "laptop", "quantity": 1}, {"product_id": "mouse", "quantity": 2}]
    status, accepted = await client.call(
        "POST", "order", "/orders", as_user=BOB, json={"items": items, "payment": VISA}
    )
    assert status == 202, accepted
    order_id = accepted["id"]

    order = await client.wait_for_status(order_id, {"confirmed"}, as_user=BOB, within=15)

    assert order["total"] == "1459.97"
    # the answer to the POST is the order as it was written
    for field in ("id", "user_id", "items", "total", "currency", "created_at"):
        assert accepted[field] == order[field], field
    assert accepted["history"] == order["history"][:1]
    assert [h["status"] for h in order["history"]] == ["pending", "payment_processing", "confirmed"]
    (payment,) = await payments_for(client, order_id)
    assert (payment["status"], payment["amount"]) == ("completed", "1459.97")
    assert order["payment_id"] == payment["id"]

    async def sold() -> bool:
        laptop = await stock(client, "laptop")
        return (laptop["sold"], laptop["reserved"], laptop["available"]) == (1, 0, 4)

    await eventually(sold)


async def test_out_of_stock_cancels_without_charging(launch: Launch) -> None:
    client = await launch()
    order_id = await place(client, [{"product_id": "laptop", "quantity": 6}])

    order = await client.wait_for_status(order_id, {"cancelled"}, as_user=BOB)

    assert "out of stock" in order["status_reason"]
    assert "laptop (requested 6, available 5)" in order["status_reason"]
    assert await payments_for(client, order_id) == []
    assert (await stock(client, "laptop"))["available"] == 5


async def test_declined_card_cancels_and_gives_the_stock_back(launch: Launch) -> None:
    client = await launch()
    order_id = await place(client, [{"product_id": "phone", "quantity": 2}], payment=DECLINED)

    order = await client.wait_for_status(order_id, {"cancelled"}, as_user=BOB)

    assert order["status_reason"].startswith("payment declined")
    (payment,) = await payments_for(client, order_id)
    assert payment["status"] == "failed"

    async def released() -> bool:
        phone = await stock(client, "phone")
        return (phone["available"], phone["reserved"], phone["sold"]) == (10, 0, 0)

    await eventually(released)


async def test_cancel_while_paying_releases_stock_and_refunds_a_late_charge(
    launch: Launch,
) -> None:
    client = await launch(MICROSHOP_PAYMENT_LATENCY_MS="1500")
    order_id = await place(client, [{"product_id": "monitor", "quantity": 1}])
    await client.wait_for_status(order_id, {"payment_processing"}, as_user=BOB)

    status, body = await client.call(
        "POST",
        "order",
        f"/orders/{order_id}/cancel",
        as_user=BOB,
        json={"reason": "changed my mind"},
    )
    assert status == 202, body
    assert body["status"] == "cancelled"

    # the charge in flight lands after the cancel: it must be given back, exactly once
    order = await client.wait_for_status(order_id, {"refunded"}, as_user=BOB, within=20)
    assert order["status_reason"] == "changed my mind"
    (payment,) = await payments_for(client, order_id)
    assert payment["status"] == "refunded"
    assert payment["refunded_amount"] == payment["amount"] == "399.99"

    async def restored() -> bool:
        monitor = await stock(client, "monitor")
        return (monitor["available"], monitor["reserved"], monitor["sold"]) == (8, 0, 0)

    await eventually(restored)


async def test_cancel_after_confirm_refunds_the_payment_and_restocks(launch: Launch) -> None:
    client = await launch()
    order_id = await place(client, [{"product_id": "keyboard", "quantity": 3}])
    await client.wait_for_status(order_id, {"confirmed"}, as_user=BOB)

    status, body = await client.call(
        "POST", "order", f"/orders/{order_id}/cancel", as_user=BOB, json={}
    )
    assert status == 202, body

    order = await client.wait_for_status(order_id, {"refunded"}, as_user=BOB)
    assert [h["status"] for h in order["history"]][-1] == "refunded"
    (payment,) = await payments_for(client, order_id)
    assert payment["status"] == "refunded"
    assert payment["refunded_amount"] == "389.97"

    async def restored() -> bool:
        keyboard = await stock(client, "keyboard")
        return (keyboard["available"], keyboard["sold"]) == (15, 0)

    await eventually(restored)


async def test_shipped_order_cannot_be_cancelled_and_staff_move_it_along(launch: Launch) -> None:
    client = await launch()
    order_id = await place(client, [{"product_id": "mouse", "quantity": 1}])
    await client.wait_for_status(order_id, {"confirmed"}, as_user=BOB)

    for step in ("processing", "shipped"):
        status, body = await client.call(
            "PUT", "order", f"/orders/{order_id}/status", as_user=ALICE, json={"status": step}
        )
        assert status == 200, body
    assert body["estimated_delivery"] is not None

    status, body = await client.call(
        "POST", "order", f"/orders/{order_id}/cancel", as_user=BOB, json={}
    )
    assert status == 409
    assert "shipped" in body["detail"]
    status, body = await client.call(
        "PUT", "order", f"/orders/{order_id}/status", as_user=ALICE, json={"status": "confirmed"}
    )
    assert status == 409  # the saga's statuses are not set by hand
    status, body = await client.call(
        "PUT", "order", f"/orders/{order_id}/status", as_user=BOB, json={"status": "delivered"}
    )
    assert status == 403


async def test_concurrent_orders_for_the_last_unit_confirm_only_one(launch: Launch) -> None:
    client = await launch()
    product = f"last-{uuid.uuid4().hex[:8]}"
    status, body = await client.call(
        "POST",
        "inventory",
        "/products",
        as_user=ALICE,
        json={"id": product, "name": "Last one", "price": "10.00", "stock": 1},
    )
    assert status == 201, body
    await client.login(BOB)

    orders = await asyncio.gather(
        *(place(client, [{"product_id": product, "quantity": 1}]) for _ in range(6))
    )
    final = [
        (await client.wait_for_status(o, {"confirmed", "cancelled"}, as_user=BOB))["status"]
        for o in orders
    ]

    assert sorted(final) == ["cancelled"] * 5 + ["confirmed"]

    async def sold_once() -> bool:  # stock.commit follows the confirmation
        row = await stock(client, product)
        return (row["stock"], row["reserved"], row["sold"], row["available"]) == (0, 0, 1, 0)

    await eventually(sold_once)


async def test_payment_service_down_when_ordering_confirms_after_restart_charging_once(
    launch: Launch,
) -> None:
    client = await launch()
    await client.login(BOB)
    await client.system.kill("payment")

    order_id = await place(client, [{"product_id": "phone", "quantity": 1}])
    await client.wait_for_status(order_id, {"payment_processing"}, as_user=BOB)
    await asyncio.sleep(2)
    await client.system.start("payment")

    await client.wait_for_status(order_id, {"confirmed"}, as_user=BOB, within=30)
    payments = await payments_for(client, order_id)
    assert [p["status"] for p in payments] == ["completed"]


async def test_a_reservation_that_expires_while_payment_is_down_cancels_and_refunds_the_order(
    launch: Launch,
) -> None:
    client = await launch(MICROSHOP_RESERVATION_TTL="2", MICROSHOP_RESERVATION_SWEEP_SECONDS="0.5")
    await client.login(BOB)
    await client.system.kill("payment")

    order_id = await place(client, [{"product_id": "phone", "quantity": 1}])
    # the hold runs out while the charge waits: the phone must not stay sold to no one
    order = await client.wait_for_status(order_id, {"cancelled"}, as_user=BOB, within=20)
    assert order["status_reason"] == "stock reservation expired"
    await client.system.start("payment")  # the charge waiting in its queue goes through

    order = await client.wait_for_status(order_id, {"refunded"}, as_user=BOB, within=30)
    (payment,) = await payments_for(client, order_id)
    assert (payment["status"], payment["refunded_amount"]) == ("refunded", payment["amount"])

    async def restored() -> bool:
        phone = await stock(client, "phone")
        return (phone["available"], phone["reserved"], phone["sold"]) == (10, 0, 0)

    await eventually(restored)


async def test_order_service_killed_mid_saga_finishes_after_restart(launch: Launch) -> None:
    client = await launch(MICROSHOP_PAYMENT_LATENCY_MS="1000")
    order_id = await place(client, [{"product_id": "monitor", "quantity": 2}])
    await client.wait_for_status(order_id, {"payment_processing"}, as_user=BOB)

    await client.system.kill("order")  # the payment's reply waits in the order queue
    await asyncio.sleep(2)
    await client.system.start("order")

    order = await client.wait_for_status(order_id, {"confirmed"}, as_user=BOB, within=30)
    assert order["total"] == "799.98"
    assert len(await payments_for(client, order_id)) == 1


async def test_unanswered_step_is_retried_then_compensated(launch: Launch) -> None:
    client = await launch(MICROSHOP_SAGA_STEP_TIMEOUT="0.5", MICROSHOP_SAGA_STEP_ATTEMPTS="2")
    # one order while inventory is up, so the order service knows the product already
    warm_up = await place(client, [{"product_id": "mouse", "quantity": 1}])
    await client.wait_for_status(warm_up, {"confirmed"}, as_user=BOB)
    await client.system.kill("inventory")

    order_id = await place(client, [{"product_id": "mouse", "quantity": 1}])
    order = await client.wait_for_status(order_id, {"cancelled"}, as_user=BOB, within=20)

    assert order["status_reason"] == "inventory did not answer in time"
    await client.system.start("inventory")  # the resent reserves arrive now: released again

    async def untouched() -> bool:
        mouse = await stock(client, "mouse")
        return (mouse["available"], mouse["reserved"], mouse["sold"]) == (19, 0, 1)

    await eventually(untouched, within=20)


async def test_orders_are_private_and_validated(launch: Launch) -> None:
    client = await launch()
    order_id = await place(client, [{"product_id": "mouse", "quantity": 1}])

    status, _ = await client.call(
        "GET", "order", f"/orders/{order_id}", as_user="carol@example.com"
    )
    assert status == 200  # carol is a manager
    status, body = await client.call(
        "POST",
        "user",
        "/users",
        as_user=ALICE,
        json={
            "name": "Eve",
            "email": f"eve-{order_id[:6]}@example.com",
            "password": "long-enough-1",
        },
    )
    assert status == 201, body
    eve = body["email"]
    await client.login(eve, "long-enough-1")
    status, _ = await client.call("GET", "order", f"/orders/{order_id}", as_user=eve)
    assert status == 404
    status, body = await client.call("GET", "order", "/orders", as_user=eve)
    assert (status, body["total"]) == (200, 0)

    status, body = await client.call(
        "POST",
        "order",
        "/orders",
        as_user=eve,
        json={"items": [{"product_id": "nope", "quantity": 1}], "payment": VISA},
    )
    assert status == 422
    assert "unknown product 'nope'" in body["detail"]
    status, body = await client.call(
        "POST",
        "order",
        "/orders",
        as_user=eve,
        json={"items": [{"product_id": "mouse", "quantity": 0}], "payment": VISA},
    )
    assert status == 422
    for items, detail in [
        ([{"product_id": "../metrics", "quantity": 1}], "product_id"),
        ([{"product_id": "mouse", "quantity": 10**19}], "quantity"),
        ([{"product_id": "mouse", "quantity": 6000}] * 2, "at most 10000 of one product"),
    ]:
        status, body = await client.call(
            "POST", "order", "/orders", as_user=eve, json={"items": items, "payment": VISA}
        )
        assert (status, body["type"]) == (422, "about:blank"), body
        assert detail in body["detail"]
    status, body = await client.call(
        "POST",
        "order",
        "/orders",
        as_user=eve,
        json={"items": [MOUSE], "payment": VISA},
        headers={"Idempotency-Key": "k" * 201},  # longer than the service keeps
    )
    assert (status, body["detail"]) == (
        422,
        "header.Idempotency-Key: must be 1-200 printable ASCII characters",
    )
    status, body = await client.call(
        "POST", "order", "/orders", as_user=eve, json={"items": [MOUSE], "payment": VISA}
    )
    assert status == 202, body  # what went before opened no breaker


async def test_a_demoted_manager_loses_staff_powers_before_their_token_expires(
    launch: Launch,
) -> None:
    client = await launch()
    order_id = await place(client, [MOUSE])
    carol = "carol@example.com"
    await client.wait_for_status(order_id, {"confirmed"}, as_user=carol)  # a manager sees it
    status, me = await client.call("GET", "user", "/auth/me", as_user=carol)
    assert status == 200, me

    status, body = await client.call(
        "PUT", "user", f"/users/{me['id']}", as_user=ALICE, json={"role": "user"}
    )
    assert status == 200, body

    async def no_longer_seen() -> bool:  # once the order service hears of the demotion
        status, _ = await client.call("GET", "order", f"/orders/{order_id}", as_user=carol)
        return status == 404

    await eventually(no_longer_seen)
    status, _ = await client.call(
        "PUT", "order", f"/orders/{order_id}/status", as_user=carol, json={"status": "processing"}
    )
    assert status == 403
    status, listed = await client.call("GET", "order", "/orders", as_user=carol)
    assert (status, listed["total"]) == (200, 0)  # her own orders only


async def test_idempotency_key_never_creates_a_second_order(launch: Launch) -> None:
    client = await launch()
    request = {"items": [{"product_id": "mouse", "quantity": 1}], "payment": VISA}
    key = {"Idempotency-Key": uuid.uuid4().hex}

    results = await asyncio.gather(
        *(
            client.call("POST", "order", "/orders", as_user=BOB, json=request, headers=key)
            for _ in range(4)
        )
    )

    assert {status for status, _ in results} == {202}
    assert len({body["id"] for _, body in results}) == 1
    status, refused = await client.call(
        "POST",
        "order",
        "/orders",
        as_user=BOB,
        headers=key,
        json={**request, "items": [{"product_id": "phone", "quantity": 1}]},
    )
    assert status == 422, refused
    await client.wait_for_status(results[0][1]["id"], {"confirmed"}, as_user=BOB)
    assert Decimal((await stock(client, "mouse"))["sold"]) == 1


async def test_orders_past_the_ceiling_in_flight_are_turned_away_until_some_finish(
    launch: Launch,
) -> None:
    client = await launch(MICROSHOP_MAX_ORDERS_IN_FLIGHT="2", MICROSHOP_PAYMENT_LATENCY_MS="1500")
    first = await place(client, [MOUSE])
    second = await place(client, [MOUSE])

    status, problem = await client.call(
        "POST", "order", "/orders", as_user=BOB, json={"items": [MOUSE], "payment": VISA}
    )

    assert status == 503, problem
    assert problem["detail"] == (
        "the shop is busy: 2 orders are being processed; try again in a second"
    )
    for order_id in (first, second):
        await client.wait_for_status(order_id, {"confirmed"}, as_user=BOB)

    async def admitted() -> bool:
        status, _ = await client.call(
            "POST", "order", "/orders", as_user=BOB, json={"items": [MOUSE], "payment": VISA}
        )
        return status == 202

    # the saga's last step (stock committed) and the next count free the places
    await eventually(admitted, within=10, every=0.5)
