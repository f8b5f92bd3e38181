"""One trace spans the HTTP request that placed an order and every message of its saga."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

import inventory_svc.app
import order_svc.app
import payment_svc.app
import user_svc.app
from tests.integration.conftest import ServiceStarter
from tests.support import eventually

pytestmark = pytest.mark.integration


async def test_one_trace_id_spans_the_request_and_the_whole_saga(
    run_service: ServiceStarter, unique: str, spans: Any
) -> None:
    system = {"exchange": f"{unique}.events", "demo_data": True}
    user = await run_service(user_svc.app, settings=system)
    jwks = {"jwks_url": f"{user.settings.public_url}/.well-known/jwks.json"}
    inventory = await run_service(inventory_svc.app, settings={**system, **jwks})
    await run_service(payment_svc.app, settings={"exchange": f"{unique}.events", **jwks})
    order = await run_service(
        order_svc.app,
        settings={
            "exchange": f"{unique}.events",
            **jwks,
            "user_url": user.settings.public_url,
            "inventory_url": inventory.settings.public_url,
        },
    )
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{user.settings.public_url}/auth/login",
            json={
                "email": "bob@example.com",
                "password": user_svc.app.DEMO_PASSWORD,
            },
        ) as response:
            auth = {"Authorization": f"Bearer {(await response.json())['access_token']}"}
        spans.clear()
        async with http.post(
            f"{order.settings.public_url}/orders",
            headers=auth,
            json={
                "items": [{"product_id": "mouse", "quantity": 1}],
                "payment": {"provider": "stripe", "method": "tok_visa"},
            },
        ) as response:
            assert response.status == 202
            order_id = (await response.json())["id"]

        async def confirmed() -> bool:
            url = f"{order.settings.public_url}/orders/{order_id}"
            async with http.get(url, headers=auth) as response:
                return (await response.json())["status"] == "confirmed"

        await eventually(confirmed)

    finished = spans.get_finished_spans()
    (request,) = [s for s in finished if s.name == "POST /orders"]
    trace_id = request.context.trace_id

    async def saga_spans_done() -> bool:
        names = {s.name for s in spans.get_finished_spans() if s.context.trace_id == trace_id}
        return "stock.committed process" in names

    await eventually(saga_spans_done)
    in_trace = {s.name for s in spans.get_finished_spans() if s.context.trace_id == trace_id}
    for hop in (
        "stock.reserve",
        "stock.reserved",
        "payment.charge",
        "payment.succeeded",
        "stock.commit",
        "stock.committed",
    ):
        assert f"{hop} publish" in in_trace, hop
        assert f"{hop} process" in in_trace, hop
    assert {"order.created publish", "order.confirmed publish"} <= in_trace
