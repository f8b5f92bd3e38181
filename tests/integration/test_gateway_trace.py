"""One trace spans the caller, the gateway and the service behind it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from opentelemetry.trace import SpanKind

import inventory_svc.app
from tests.conftest import RabbitAdmin
from tests.integration.conftest import ServiceStarter
from tests.integration.test_gateway_support import Caller, Gateways
from tests.support import eventually

pytestmark = pytest.mark.integration

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


@pytest.fixture
async def gateways(rabbit: RabbitAdmin, unique: str) -> AsyncIterator[Gateways]:
    async with Gateways(rabbit.url, unique) as started:
        yield started


async def test_the_callers_trace_continues_through_the_gateway_into_the_service(
    gateways: Gateways, run_service: ServiceStarter, unique: str, spans: Any
) -> None:
    gateway = await gateways.start()
    inventory = await run_service(
        inventory_svc.app, settings={"exchange": f"{unique}.events", "demo_data": True}
    )
    await eventually(lambda: bool(gateway.registry.rotation("inventory")))
    spans.clear()
    async with Caller(gateway.settings.public_url) as caller:
        answer = await caller.call(
            "GET", "/products", headers={"traceparent": f"00-{TRACE_ID}-{CALLER_SPAN}-01"}
        )
    assert answer.status == 200

    def in_trace() -> list[Any]:
        return [s for s in spans.get_finished_spans() if f"{s.context.trace_id:032x}" == TRACE_ID]

    await eventually(lambda: len(in_trace()) >= 3)
    servers = [s for s in in_trace() if s.kind is SpanKind.SERVER]
    (client,) = [s for s in in_trace() if s.kind is SpanKind.CLIENT and s.name == "GET inventory"]
    (at_gateway,) = [s for s in servers if s.parent and f"{s.parent.span_id:016x}" == CALLER_SPAN]
    (at_service,) = [s for s in servers if s.parent and s.parent.span_id == client.context.span_id]
    assert client.parent is not None
    assert client.parent.span_id == at_gateway.context.span_id
    assert at_gateway.attributes["http.route"] == "/products"
    assert at_service.attributes["http.route"] == "/products"
    assert inventory.settings.public_url in str(client.attributes["server.address"])
