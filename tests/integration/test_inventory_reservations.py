"""stock.reserve / commit / release on the real broker and PostgreSQL, duplicates included."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest

from bus.amqp import AmqpBroker
from bus.envelope import Envelope, Message
from bus.service import settings_queue
from inventory_svc.messages import LineItem, StockCommit, StockRelease, StockReserve
from tests.integration.conftest import ServiceStarter
from tests.integration.test_inventory_support import Inventory
from tests.support import eventually

pytestmark = pytest.mark.integration


@pytest.fixture
async def shop(
    run_service: ServiceStarter, amqp: AmqpBroker, unique: str
) -> AsyncIterator[Inventory]:
    async with Inventory.running(run_service, amqp, unique) as running:
        yield running


def reserve(order_id: str, *lines: tuple[str, int]) -> StockReserve:
    items = [LineItem(product_id=pid, quantity=quantity) for pid, quantity in lines]
    return StockReserve(order_id=order_id, items=items)


async def test_reserve_holds_every_line_and_answers_with_prices_and_total(shop: Inventory) -> None:
    laptop = await shop.add_product(stock=5, price="1299.99")
    mouse = await shop.add_product(stock=20, price="79.99")
    order = shop.new_id("order")

    await shop.send(reserve(order, (mouse, 1), (laptop, 2), (mouse, 2)))

    reserved = await shop.event("stock.reserved", order_id=order)
    assert reserved["items"] == [  # one line per product, by id (laptop's came first)
        {"product_id": laptop, "quantity": 2, "unit_price": "1299.99"},
        {"product_id": mouse, "quantity": 3, "unit_price": "79.99"},
    ]
    assert reserved["total"] == "2839.95"
    assert await shop.counters(laptop) == {"stock": 5, "reserved": 2, "available": 3, "sold": 0}
    status, reservation = await shop.call("GET", f"/reservations/{order}")
    assert status == 200
    assert reservation["status"] == "reserved"
    assert reservation["total"] == "2839.95"
    assert reservation["expires_at"] > reservation["created_at"]


async def test_reserve_is_all_or_nothing_when_one_line_falls_short(shop: Inventory) -> None:
    plenty = await shop.add_product(stock=5)
    scarce = await shop.add_product(stock=1)
    order = shop.new_id("order")

    await shop.send(reserve(order, (plenty, 2), (scarce, 2)))

    rejected = await shop.event("stock.rejected", order_id=order)
    assert rejected["items"] == [{"product_id": scarce, "requested": 2, "available": 1}]
    assert "insufficient stock" in rejected["reason"]
    assert (await shop.counters(plenty))["reserved"] == 0  # the held line was undone
    assert shop.answers(order) == ["stock.rejected"]

    await shop.send(reserve(order, (plenty, 2), (scarce, 2)))  # answered from what was stored
    await eventually(lambda: len(shop.events("stock.rejected", order_id=order)) == 2)
    assert shop.events("stock.rejected", order_id=order) == [rejected, rejected]


async def test_reserve_of_an_unknown_product_is_rejected_with_nothing_available(
    shop: Inventory,
) -> None:
    order, ghost = shop.new_id("order"), shop.new_id("ghost")

    await shop.send(reserve(order, (ghost, 1)))

    rejected = await shop.event("stock.rejected", order_id=order)
    assert rejected["items"] == [{"product_id": ghost, "requested": 1, "available": 0}]
    assert rejected["reason"] == f"unknown product: {ghost}"


async def test_commit_sells_the_held_units_once_however_often_it_is_sent(shop: Inventory) -> None:
    product = await shop.add_product(stock=5)
    order = shop.new_id("order")
    await shop.send(reserve(order, (product, 2)))
    await shop.event("stock.reserved", order_id=order)

    await shop.send(StockCommit(order_id=order))
    await shop.send(StockCommit(order_id=order))  # a new message id: a business duplicate

    await eventually(lambda: len(shop.events("stock.committed", order_id=order)) == 2)
    assert await shop.counters(product) == {"stock": 3, "reserved": 0, "available": 3, "sold": 2}


async def test_release_frees_held_units_and_answers_a_repeat_without_freeing_twice(
    shop: Inventory,
) -> None:
    product = await shop.add_product(stock=5)
    order = shop.new_id("order")
    await shop.send(reserve(order, (product, 2)))
    await shop.event("stock.reserved", order_id=order)

    await shop.send(StockRelease(order_id=order, reason="payment declined"))
    await shop.send(StockRelease(order_id=order, reason="again"))

    # the two are handled side by side: whichever locks the reservation first frees the
    # units, and the other is answered with that same release
    await eventually(lambda: len(shop.events("stock.released", order_id=order)) == 2)
    first, repeat = shop.events("stock.released", order_id=order)
    assert first == repeat
    assert first["items"] == [{"product_id": product, "quantity": 2}]
    assert first["reason"] in ("payment declined", "again")
    assert await shop.counters(product) == {"stock": 5, "reserved": 0, "available": 5, "sold": 0}


async def test_release_after_commit_returns_the_sold_units_to_stock(shop: Inventory) -> None:
    product = await shop.add_product(stock=5)
    order = shop.new_id("order")
    await shop.send(reserve(order, (product, 2)))
    await shop.event("stock.reserved", order_id=order)
    await shop.send(StockCommit(order_id=order))
    await shop.event("stock.committed", order_id=order)

    await shop.send(StockRelease(order_id=order, reason="refunded"))

    released = await shop.event("stock.released", order_id=order)
    assert released["items"] == [{"product_id": product, "quantity": 2}]
    assert await shop.counters(product) == {"stock": 5, "reserved": 0, "available": 5, "sold": 0}
    status, reservation = await shop.call("GET", f"/reservations/{order}")
    assert (status, reservation["status"]) == (200, "released")


async def test_release_of_an_unknown_order_answers_and_a_late_reserve_holds_nothing(
    shop: Inventory,
) -> None:
    product = await shop.add_product(stock=5)
    order = shop.new_id("order")

    await shop.send(StockRelease(order_id=order, reason="gave up waiting"))
    released = await shop.event("stock.released", order_id=order)
    await shop.send(reserve(order, (product, 1)))  # overtaken by its own compensation

    assert released["items"] == []
    rejected = await shop.event("stock.rejected", order_id=order)
    assert rejected["reason"] == "reservation already released"
    assert (await shop.counters(product))["reserved"] == 0


async def test_commit_without_a_reservation_is_dead_lettered_with_the_reason(
    shop: Inventory, amqp: AmqpBroker
) -> None:
    order = shop.new_id("order")
    assert shop.service is not None
    queue = settings_queue(shop.service.settings)

    await shop.send(StockCommit(order_id=order))

    async def dead_lettered() -> bool:
        return any(order in letter.reason for letter in await amqp.dead_letters(queue))

    await eventually(dead_lettered)
    (letter,) = [x for x in await amqp.dead_letters(queue) if order in x.reason]
    assert letter.cause == "rejected"
    assert letter.reason == f"cannot commit order {order}: it has no reservation"
    assert shop.answers(order) == []


async def test_redelivered_commands_change_nothing(shop: Inventory) -> None:
    product = await shop.add_product(stock=5)
    order = shop.new_id("order")
    reserve_once = Envelope.wrap(reserve(order, (product, 2)), source="/tests")
    commit_once = Envelope.wrap(StockCommit(order_id=order), source="/tests")

    for envelope in (reserve_once, reserve_once):
        await shop.amqp.publish(envelope)
    await shop.event("stock.reserved", order_id=order)
    for envelope in (commit_once, commit_once):
        await shop.amqp.publish(envelope)
    await shop.event("stock.committed", order_id=order)
    # a later command's answer: the copies before it were handled by then
    barrier = shop.new_id("barrier")
    await shop.send(StockRelease(order_id=barrier))
    await shop.event("stock.released", order_id=barrier)

    assert shop.answers(order) == ["stock.reserved", "stock.committed"]
    assert await shop.counters(product) == {"stock": 3, "reserved": 0, "available": 3, "sold": 2}


async def test_a_repeated_reserve_gets_the_same_answer_and_holds_nothing_more(
    shop: Inventory,
) -> None:
    product = await shop.add_product(stock=5, price="2.50")
    order = shop.new_id("order")

    await shop.send(reserve(order, (product, 2)))
    first = await shop.event("stock.reserved", order_id=order)
    await shop.send(reserve(order, (product, 2)))

    await eventually(lambda: len(shop.events("stock.reserved", order_id=order)) == 2)
    assert shop.events("stock.reserved", order_id=order) == [first, first]
    assert (await shop.counters(product))["reserved"] == 2


async def test_concurrent_orders_for_the_last_unit_confirm_exactly_one(shop: Inventory) -> None:
    product = await shop.add_product(stock=1)
    orders = [shop.new_id("order") for _ in range(8)]

    await asyncio.gather(*(shop.send(reserve(order, (product, 1))) for order in orders))

    await eventually(lambda: all(shop.answers(order) for order in orders))
    outcomes = [answer for order in orders for answer in shop.answers(order)]
    assert sorted(outcomes) == ["stock.rejected"] * 7 + ["stock.reserved"]
    assert await shop.counters(product) == {"stock": 1, "reserved": 1, "available": 0, "sold": 0}


async def test_an_uncommitted_reservation_expires_and_frees_its_units(
    run_service: ServiceStarter, amqp: AmqpBroker, unique: str
) -> None:
    # long enough for kept to be committed first, even on a busy machine
    async with Inventory.running(run_service, amqp, unique, reservation_ttl=1.0) as shop:
        product = await shop.add_product(stock=3)
        kept, forgotten = shop.new_id("kept"), shop.new_id("forgotten")
        await shop.send(reserve(kept, (product, 1)))
        await shop.send(reserve(forgotten, (product, 2)))
        await shop.event("stock.reserved", order_id=kept)
        await shop.send(StockCommit(order_id=kept))

        expired = await shop.event("stock.expired", order_id=forgotten)

        # news the order service must act on, not an answer to a release
        assert expired == {"order_id": forgotten, "items": [{"product_id": product, "quantity": 2}]}
        assert await shop.counters(product) == {
            "stock": 2,
            "reserved": 0,
            "available": 2,
            "sold": 1,
        }
        status, reservation = await shop.call("GET", f"/reservations/{forgotten}")
        assert (status, reservation["status"]) == (200, "expired")
        assert shop.answers(kept) == ["stock.reserved", "stock.committed"]

        await shop.send(StockCommit(order_id=forgotten))  # paid for too late: told again
        await eventually(lambda: len(shop.answers(forgotten)) == 3)
        assert shop.answers(forgotten) == ["stock.reserved", "stock.expired", "stock.expired"]
        assert shop.events("stock.expired", order_id=forgotten)[1] == expired
        assert (await shop.counters(product))["sold"] == 1


async def test_stock_adds_up_under_a_mix_of_commands_each_delivered_twice(
    shop: Inventory,
) -> None:
    initial = {await shop.add_product(stock=stock): stock for stock in (3, 4, 2)}
    products = sorted(initial)
    orders = [shop.new_id("order") for _ in range(12)]
    chance = random.Random(7)
    envelopes = []
    for order in orders:
        lines = [(pid, chance.randint(1, 2)) for pid in chance.sample(products, 2)]
        envelopes.append(Envelope.wrap(reserve(order, *lines), source="/tests"))
    for envelope in envelopes:  # each twice: a redelivery
        await asyncio.gather(shop.amqp.publish(envelope), shop.amqp.publish(envelope))
    await eventually(lambda: all(shop.answers(order) for order in orders))

    reserved = [o for o in orders if shop.events("stock.reserved", order_id=o)]
    to_commit, to_release = reserved[::2], reserved[1::2]
    followups: list[Message] = [StockCommit(order_id=o) for o in to_commit]
    followups += [StockRelease(order_id=o, reason="changed mind") for o in to_release]
    for command in followups:
        envelope = Envelope.wrap(command, source="/tests")
        await asyncio.gather(shop.amqp.publish(envelope), shop.amqp.publish(envelope))
    status, _ = await shop.call("POST", f"/inventory/{products[1]}/restock", json={"quantity": 2})
    assert status == 200
    initial[products[1]] += 2
    await eventually(lambda: all(len(shop.answers(o)) == 2 for o in reserved))
    barrier = shop.new_id("barrier")  # as above: the copies before it were handled by then
    await shop.send(StockRelease(order_id=barrier))
    await shop.event("stock.released", order_id=barrier)

    for order in orders:  # one answer per distinct message
        expected = ["stock.reserved"] if order in reserved else ["stock.rejected"]
        expected += ["stock.committed"] if order in to_commit else []
        expected += ["stock.released"] if order in to_release else []
        assert shop.answers(order) == expected
    sold = dict.fromkeys(products, 0)
    for order in to_commit:
        for item in shop.events("stock.reserved", order_id=order)[0]["items"]:
            sold[item["product_id"]] += item["quantity"]
    for pid in products:
        counters = await shop.counters(pid)
        assert counters["available"] + counters["reserved"] + counters["sold"] == initial[pid]
        assert (counters["sold"], counters["reserved"]) == (sold[pid], 0)
