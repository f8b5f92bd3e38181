"""Logs carry service, correlation id, trace and span ids, as JSON lines."""

from __future__ import annotations

import json
from typing import Any, ClassVar

import pytest
import structlog
from opentelemetry import trace

from bus.broker import Delivery
from bus.envelope import Envelope, Event, MessageRegistry
from bus.memory import MemoryBroker
from bus.observability import configure_logging
from tests.support import eventually


class Logged(Event):
    type: ClassVar[str] = "logged.thing"


@pytest.fixture
def json_logs(capsys: pytest.CaptureFixture[str]) -> Any:
    configure_logging("orders", level="INFO", json=True)
    yield lambda: [json.loads(line) for line in capsys.readouterr().err.splitlines() if line]
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


async def test_handler_logs_carry_service_correlation_and_trace(json_logs: Any) -> None:
    broker = MemoryBroker()
    await broker.connect()
    handled: list[bool] = []

    async def handler(delivery: Delivery) -> None:
        structlog.get_logger("test").info("handling", order_id="o-1")
        handled.append(True)

    await broker.consume("orders", [Logged.type], handler, MessageRegistry([Logged]))
    with trace.get_tracer("test").start_as_current_span("request") as span:
        sent = Envelope.wrap(Logged(), source="/tests")
        await broker.publish(sent)
        trace_id = format(span.get_span_context().trace_id, "032x")
    await eventually(lambda: handled == [True])
    await broker.close()

    (line,) = [entry for entry in json_logs() if entry["event"] == "handling"]
    assert line["service"] == "orders"
    assert line["correlation_id"] == sent.correlationid
    assert line["message_type"] == "logged.thing"
    assert line["trace_id"] == trace_id
    assert len(line["span_id"]) == 16
    assert line["level"] == "info"
    assert line["order_id"] == "o-1"
