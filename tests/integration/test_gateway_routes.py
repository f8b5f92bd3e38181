"""Every route through the gateway, to the real services on RabbitMQ and PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from tests.conftest import RabbitAdmin
from tests.integration.conftest import ServiceStarter
from tests.integration.test_gateway_support import (
    ALICE,
    BOB,
    CAROL,
    Caller,
    Gateways,
    place_order,
    start_system,
    wait_for_order,
)
from tests.support import free_port

pytestmark = pytest.mark.integration


# Tests name this fixture before run_service, so it is set up first and torn down last:
# the services stop while the exchange they announce their goodbyes on still exists.
@pytest.fixture
async def gateways(rabbit: RabbitAdmin, unique: str) -> AsyncIterator[Gateways]:
    async with Gateways(rabbit.url, unique) as started:
        yield started


async def test_every_route_reaches_its_service(
    gateways: Gateways, run_service: ServiceStarter, unique: str
) -> None:
    system = await start_system(run_service, gateways, unique)
    async with Caller(system.url) as caller:
        # user: registration and login are public, the rest needs a token
        email = f"{uuid.uuid4().hex[:8]}@example.com"
        registered = await caller.call(
            "POST", "/users", json={"name": "Dana", "email": email, "password": "long-password-1"}
        )
        assert registered.status == 201, registered.body
        token = await caller.login(email, "long-password-1")
        me = await caller.call("GET", "/auth/me", token=token)
        assert me.body["email"] == email
        assert (await caller.call("GET", "/.well-known/jwks.json")).body["keys"]
        users = await caller.call("GET", "/users?limit=200", as_user=ALICE)
        assert email in {user["email"] for user in users.body["items"]}
        assert (await caller.call("GET", f"/users/{me.body['id']}", as_user=ALICE)).status == 200

        # inventory: the catalogue is public, stock and reservations are staff's
        products = await caller.call("GET", "/products")
        assert {p["id"] for p in products.body["items"]} >= {"laptop", "mouse"}
        assert (await caller.call("GET", "/products/laptop")).body["price"] == "1299.99"
        assert (await caller.call("GET", "/inventory", as_user=ALICE)).body["total"] >= 5

        # payment: providers are public
        providers = await caller.call("GET", "/providers")
        assert "stripe" in {p["name"] for p in providers.body["items"]}

        # an order's saga, then what it left in every service
        order_id = await place_order(caller, BOB)
        order = await wait_for_order(caller, order_id, BOB, "confirmed")
        assert order_id in {
            o["id"] for o in (await caller.call("GET", "/orders", as_user=BOB)).body["items"]
        }
        reservation = await caller.call("GET", f"/reservations/{order_id}", as_user=ALICE)
        assert reservation.status == 200, reservation.body
        payments = await caller.call("GET", "/payments?limit=200", as_user=BOB)
        (payment,) = [p for p in payments.body["items"] if p["order_id"] == order_id]
        one = await caller.call("GET", f"/payments/{payment['id']}", as_user=BOB)
        assert one.body["amount"] == order.body["total"]
        transactions = await caller.call("GET", "/transactions?limit=200", as_user=BOB)
        assert payment["transaction_id"] in {t["id"] for t in transactions.body["items"]}
        transaction = await caller.call(
            "GET", f"/transactions/{payment['transaction_id']}", as_user=BOB
        )
        assert transaction.status == 200
        refund = await caller.call(
            "POST", "/refunds", as_user=ALICE, json={"payment_id": payment["id"], "reason": "test"}
        )
        assert refund.status == 201, refund.body


async def test_gateway_describes_itself_and_the_system(
    gateways: Gateways, run_service: ServiceStarter, unique: str
) -> None:
    system = await start_system(run_service, gateways, unique, version="2.4.1")
    async with Caller(system.url) as caller:
        info = await caller.call("GET", "/")
        assert (info.body["name"], info.body["version"]) == ("microshop gateway", "2.4.1")
        assert info.body["routes"]["/refunds"] == "payment"
        assert info.body["routes"]["/reservations"] == "inventory"

        health = await caller.call("GET", "/health")
        assert health.status == 200, health.body
        assert health.body["down"] == []
        assert set(health.body["services"]) == {"user", "inventory", "payment", "order"}

        status = await caller.call("GET", "/status", as_user=ALICE)
        (instance,) = status.body["services"]["order"]["instances"]
        assert instance["url"] == system.services["order"].settings.public_url
        assert instance["instance_id"] == system.services["order"].instance_id
        assert instance["state"] == "healthy"
        assert instance["breaker"] == "closed"
        assert instance["last_check"] is not None

        document = await caller.call("GET", "/openapi.json")
        assert document.body.get("x-unavailable") is None
        paths = document.body["paths"]
        for path in ("/users", "/auth/login", "/orders/{order_id}", "/products", "/refunds"):
            assert path in paths
        assert "/health" not in paths  # the services' own plumbing is not routed
        assert paths["/orders"]["post"]["tags"] == ["order"]

        docs = await caller.call("GET", "/docs")
        assert docs.status == 200
        assert docs.headers["Content-Type"].startswith("text/html")
        assert "script-src 'sha256-" in docs.headers["Content-Security-Policy"]

        await caller.call("GET", "/products")
        metrics = await caller.call("GET", "/metrics", as_user=ALICE)
        assert 'microshop_http_requests_total{method="GET",route="/products"' in metrics.body


async def test_the_protections_hold_in_front_of_the_real_services(
    gateways: Gateways, run_service: ServiceStarter, unique: str
) -> None:
    system = await start_system(
        run_service,
        gateways,
        unique,
        gzip_min_bytes=200,
        max_body_bytes=64 * 1024,
        rate_limit_rps=1,
        rate_limit_burst=40,
    )
    async with Caller(system.url) as caller:
        catalogue = await caller.call(
            "GET", "/products", headers={"Accept-Encoding": "gzip", "X-Request-ID": "req-7"}
        )
        oversized = await caller.call(
            "POST",
            "/orders",
            as_user=BOB,
            data=b"{" + b" " * (65 * 1024) + b"}",
            headers={"Content-Type": "application/json"},
        )
        mine = await caller.call("GET", "/orders", as_user=BOB)
        statuses = []
        for _ in range(60):  # bounded: the burst is 40 and refills at 1 a second
            statuses.append((await caller.call("GET", "/products")).status)
            if statuses[-1] == 429:
                break
        limited = await caller.call("GET", "/products")

    # the inventory service's own answer, compressed and marked on the way out
    assert catalogue.status == 200
    assert {item["id"] for item in catalogue.body["items"]} >= {"laptop", "mouse"}
    assert catalogue.headers["Content-Encoding"] == "gzip"
    assert catalogue.headers["X-Request-ID"] == "req-7"
    assert catalogue.headers["X-Content-Type-Options"] == "nosniff"
    assert catalogue.headers["Cache-Control"] == "no-store"
    assert oversized.status == 413
    assert oversized.headers["Content-Type"].startswith("application/problem+json")
    assert mine.status == 200
    assert mine.body["items"] == []  # the 413 placed nothing
    assert statuses[-1] == 429
    assert statuses[:-1] == [200] * (len(statuses) - 1)
    assert limited.status == 429
    assert int(limited.headers["Retry-After"]) >= 1


async def test_status_metrics_and_dashboard_data_are_for_staff_or_the_internal_port(
    gateways: Gateways, run_service: ServiceStarter, unique: str
) -> None:
    internal_port = free_port()
    system = await start_system(run_service, gateways, unique, internal_port=internal_port)
    operator_pages = ("/status", "/metrics", "/dashboard/state")
    async with Caller(system.url) as caller:
        anonymous = [await caller.call("GET", page) for page in operator_pages]
        customer = [await caller.call("GET", page, as_user=BOB) for page in operator_pages]
        manager = [await caller.call("GET", page, as_user=CAROL) for page in operator_pages]
        page = await caller.call("GET", "/dashboard")  # the page itself holds no data
    assert [a.status for a in anonymous] == [401, 401, 401]
    assert [a.status for a in customer] == [403, 403, 403]
    assert "staff" in customer[0].body["detail"]
    assert [a.status for a in manager] == [200, 200, 200]
    assert page.status == 200
    async with Caller(f"http://127.0.0.1:{internal_port}") as inside:
        scraped = [await inside.call("GET", page) for page in operator_pages]
        elsewhere = await inside.call("GET", "/orders")  # the rest still needs a token
    assert [a.status for a in scraped] == [200, 200, 200]
    assert "microshop_http_requests_total" in scraped[1].body
    assert elsewhere.status == 401


async def test_one_user_cannot_read_another_users_order_or_payment(
    gateways: Gateways, run_service: ServiceStarter, unique: str
) -> None:
    system = await start_system(run_service, gateways, unique)
    async with Caller(system.url) as caller:
        order_id = await place_order(caller, ALICE)
        await wait_for_order(caller, order_id, ALICE, "confirmed")
        payments = await caller.call("GET", "/payments?limit=200", as_user=ALICE)
        (payment,) = [p for p in payments.body["items"] if p["order_id"] == order_id]

        assert (await caller.call("GET", f"/orders/{order_id}", as_user=BOB)).status == 404
        assert (await caller.call("GET", f"/payments/{payment['id']}", as_user=BOB)).status == 404
        theirs = f"/transactions/{payment['transaction_id']}"
        assert (await caller.call("GET", theirs, as_user=BOB)).status == 404
        listed = await caller.call("GET", "/orders?limit=200", as_user=BOB)
        assert order_id not in {o["id"] for o in listed.body["items"]}
        cancel = await caller.call("POST", f"/orders/{order_id}/cancel", as_user=BOB, json={})
        assert cancel.status == 404
