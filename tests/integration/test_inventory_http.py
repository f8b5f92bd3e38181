"""The inventory's HTTP API on the real broker and PostgreSQL: requests in, events out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import select, text

from bus.amqp import AmqpBroker
from bus.db import Database
from bus.envelope import Envelope
from bus.outbox import outbox_table
from inventory_svc.app import DEMO_CATALOGUE
from inventory_svc.messages import LineItem, StockReserve
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


async def test_a_created_product_is_listed_served_and_announced(shop: Inventory) -> None:
    product_id = shop.new_id("laptop")
    body = {"id": product_id, "name": "Laptop", "price": 1299.99, "stock": 5}

    status, created = await shop.call("POST", "/products", role="manager", json=body)

    assert status == 201
    assert created == {
        "id": product_id,
        "name": "Laptop",
        "price": "1299.99",
        "stock": 5,
        "reserved": 0,
        "available": 5,
    }
    announced = await shop.event("product.created", product_id=product_id)
    assert announced == {"product_id": product_id, "name": "Laptop", "price": "1299.99", "stock": 5}
    assert await shop.call("GET", f"/products/{product_id}", role=None) == (200, created)
    status, page = await shop.call("GET", "/products?limit=10", role=None)
    assert status == 200
    assert page == {"items": [created], "total": 1, "limit": 10, "offset": 0}


async def test_creating_a_product_whose_id_is_taken_is_a_conflict(shop: Inventory) -> None:
    product_id = await shop.add_product(stock=1, price="5.00")
    again = {"id": product_id, "name": "Other", "price": "7.00", "stock": 9}

    status, problem = await shop.call("POST", "/products", json=again)

    assert status == 409
    assert problem["detail"] == f"product {product_id!r} already exists"
    assert (await shop.call("GET", f"/products/{product_id}"))[1]["price"] == "5.00"
    assert shop.service is not None  # the outbox says what was and will be announced
    async with shop.service.db.session() as session:
        bodies = await session.scalars(
            select(outbox_table.c.body).where(outbox_table.c.type == "product.created")
        )
        announced = [Envelope.from_json(body).data["product_id"] for body in bodies]
    assert announced.count(product_id) == 1


async def test_an_update_changes_name_and_price_and_announces_what_changed(
    shop: Inventory,
) -> None:
    product_id = await shop.add_product(stock=2, price="10.00")

    status, updated = await shop.call(
        "PUT", f"/products/{product_id}", json={"name": "Renamed", "price": "12.50"}
    )
    same_again = await shop.call("PUT", f"/products/{product_id}", json={"price": "12.5"})

    assert status == 200
    assert (updated["name"], updated["price"]) == ("Renamed", "12.50")
    assert same_again == (200, updated)
    announced = await shop.event("product.updated", product_id=product_id)
    assert announced == {
        "product_id": product_id,
        "name": "Renamed",
        "price": "12.50",
        "changed": ["name", "price"],
    }
    assert len(shop.events("product.updated", product_id=product_id)) == 1  # nothing changed


async def test_a_restock_adds_units_and_announces_the_new_levels(shop: Inventory) -> None:
    product_id = await shop.add_product(stock=3)
    order = shop.new_id("order")
    items = [LineItem(product_id=product_id, quantity=2)]
    await shop.send(StockReserve(order_id=order, items=items))
    await shop.event("stock.reserved", order_id=order)

    status, product = await shop.call(
        "POST", f"/inventory/{product_id}/restock", json={"quantity": 4}
    )

    assert status == 200
    assert (product["stock"], product["reserved"], product["available"]) == (7, 2, 5)
    announced = await shop.event("stock.restocked", product_id=product_id)
    assert announced == {"product_id": product_id, "quantity": 4, "stock": 7, "available": 5}
    assert await shop.counters(product_id) == {
        "stock": 7,
        "reserved": 2,
        "available": 5,
        "sold": 0,
    }


async def test_an_unknown_product_or_reservation_is_not_found(shop: Inventory) -> None:
    ghost = shop.new_id("ghost")
    calls: list[tuple[str, str, Any]] = [
        ("GET", f"/products/{ghost}", None),
        ("PUT", f"/products/{ghost}", {"name": "x"}),
        ("POST", f"/inventory/{ghost}/restock", {"quantity": 1}),
        ("GET", f"/reservations/{ghost}", None),
    ]

    for method, path, body in calls:
        status, problem = await shop.call(method, path, json=body)
        assert (method, path, status) == (method, path, 404)
        assert ghost in problem["detail"]


async def test_reading_the_catalogue_is_open_but_stock_and_changes_need_staff(
    shop: Inventory,
) -> None:
    product_id = await shop.add_product(stock=1)
    body = {"id": shop.new_id("new"), "name": "New", "price": "1.00", "stock": 1}

    assert (await shop.call("GET", "/products", role=None))[0] == 200
    assert (await shop.call("POST", "/products", role=None, json=body))[0] == 401
    assert (await shop.call("POST", "/products", role="user", json=body))[0] == 403
    assert (await shop.call("PUT", f"/products/{product_id}", role="user", json=body))[0] == 403
    restock = f"/inventory/{product_id}/restock"
    assert (await shop.call("POST", restock, role=None, json={"quantity": 1}))[0] == 401
    assert (await shop.call("GET", "/inventory", role=None))[0] == 401
    assert (await shop.call("GET", "/inventory", role="user"))[0] == 403
    assert (await shop.call("GET", "/reservations/o-1", role="user"))[0] == 403
    assert (await shop.call("GET", "/inventory", role="manager"))[0] == 200
    assert shop.events("product.created", product_id=body["id"]) == []


async def test_bad_input_is_unprocessable_and_changes_nothing(shop: Inventory) -> None:
    product_id = await shop.add_product(stock=1)
    good = {"id": shop.new_id("good"), "name": "Good", "price": "1.00", "stock": 1}
    bad_bodies: list[tuple[str, str, Any]] = [
        ("POST", "/products", good | {"id": "Not A Slug"}),
        ("POST", "/products", good | {"id": "-leading-dash"}),
        ("POST", "/products", good | {"id": "x" * 65}),
        ("POST", "/products", good | {"price": "0"}),
        ("POST", "/products", good | {"price": "-1.00"}),
        ("POST", "/products", good | {"price": "1.001"}),
        ("POST", "/products", good | {"price": "NaN"}),
        ("POST", "/products", good | {"stock": -1}),
        ("POST", "/products", good | {"stock": "3"}),
        ("POST", "/products", good | {"name": "  "}),
        ("POST", "/products", {key: good[key] for key in ("id", "price", "stock")}),
        ("POST", "/products", good | {"colour": "red"}),
        ("PUT", f"/products/{product_id}", {}),
        ("PUT", f"/products/{product_id}", {"price": "0.00"}),
        ("POST", f"/inventory/{product_id}/restock", {"quantity": 0}),
        ("POST", f"/inventory/{product_id}/restock", {"quantity": 1.5}),
        ("POST", f"/inventory/{product_id}/restock", {}),
        ("GET", "/products?limit=-1", None),
    ]

    for method, path, body in bad_bodies:
        status, problem = await shop.call(method, path, json=body)
        assert (method, path, body, status) == (method, path, body, 422)
        assert problem["status"] == 422

    status, page = await shop.call("GET", "/products")
    assert [item["id"] for item in page["items"]] == [product_id]
    assert page["items"][0]["stock"] == 1


async def test_products_and_reservations_survive_a_restart(shop: Inventory) -> None:
    product_id = await shop.add_product(stock=4, price="3.30")
    order = shop.new_id("order")
    items = [LineItem(product_id=product_id, quantity=3)]
    await shop.send(StockReserve(order_id=order, items=items))
    await shop.event("stock.reserved", order_id=order)
    _, before = await shop.call("GET", f"/reservations/{order}")

    await shop.restart()

    assert await shop.counters(product_id) == {
        "stock": 4,
        "reserved": 3,
        "available": 1,
        "sold": 0,
    }
    assert await shop.call("GET", f"/reservations/{order}") == (200, before)
    await shop.send(StockReserve(order_id=order, items=items))  # still known as a repeat
    await eventually(lambda: len(shop.events("stock.reserved", order_id=order)) == 2)
    assert (await shop.counters(product_id))["reserved"] == 3


async def test_the_demo_catalogue_loads_once_into_an_empty_table(
    run_service: ServiceStarter, amqp: AmqpBroker, unique: str
) -> None:
    async with Inventory.running(run_service, amqp, unique, demo_data=True) as shop:
        status, page = await shop.call("GET", "/products", role=None)
        await eventually(lambda: len(shop.events("product.created")) == len(DEMO_CATALOGUE))
        await shop.restart()

        assert status == 200
        catalogue = {(p["id"], p["name"], p["price"], p["stock"]) for p in page["items"]}
        assert catalogue == {
            ("laptop", "Laptop", "1299.99", 5),
            ("phone", "Phone", "699.99", 10),
            ("monitor", "Monitor", "399.99", 8),
            ("keyboard", "Keyboard", "129.99", 15),
            ("mouse", "Mouse", "79.99", 20),
        }
        _, again = await shop.call("GET", "/products", role=None)
        assert again["total"] == len(DEMO_CATALOGUE)
        # the outbox publishes in order: a second loading would be announced before this
        later = await shop.add_product(stock=1)
        await shop.event("product.created", product_id=later)
        assert len(shop.events("product.created")) == len(DEMO_CATALOGUE) + 1


async def test_without_demo_data_the_catalogue_starts_empty(shop: Inventory) -> None:
    status, page = await shop.call("GET", "/products", role=None)

    assert (status, page["total"], page["items"]) == (200, 0, [])


async def test_openapi_documents_every_route_with_its_models(shop: Inventory) -> None:
    status, document = await shop.call("GET", "/openapi.json", role=None)

    assert status == 200
    paths = document["paths"]
    assert set(paths) >= {
        "/products",
        "/products/{product_id}",
        "/inventory",
        "/inventory/{product_id}/restock",
        "/reservations/{order_id}",
    }
    assert set(paths["/products"]) == {"get", "post"}
    assert "201" in paths["/products"]["post"]["responses"]
    assert paths["/products/{product_id}"]["put"]["security"] == [{"bearer": []}]
    assert "ReservationView" in document["components"]["schemas"]


async def test_a_database_that_drops_its_connections_costs_one_503_at_most(
    shop: Inventory, unique: str, database_url: str
) -> None:
    product_id = await shop.add_product(stock=1, price="5.00")
    admin = Database(database_url)
    async with admin.session() as session, session.begin():
        dropped = await session.scalar(
            text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE application_name = :name"
            ),
            {"name": f"{unique}_inventory"},
        )
    await admin.close()
    assert dropped, "the service holds pooled connections"

    # without a pre-ping the stale connection is found by whoever uses it first: this
    # request (503, try again) or one of the service's own tasks (then this one is fine)
    status, answer = await shop.call("GET", f"/products/{product_id}", role=None)
    assert status in (200, 503), answer
    if status == 503:
        assert answer["detail"] == "the database connection was lost; try again"
    status, product = await shop.call("GET", f"/products/{product_id}", role=None)
    assert (status, product["stock"]) == (200, 1)
