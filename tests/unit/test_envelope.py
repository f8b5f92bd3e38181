"""The CloudEvents envelope and the message registry."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import ClassVar

import pytest
from pydantic import ValidationError

from bus.broker import Delivery, Reject
from bus.envelope import Command, Envelope, Event, InvalidMessage, MessageRegistry


class PriceSet(Event):
    type: ClassVar[str] = "price.set"
    product_id: str
    price: Decimal


class ReserveIt(Command):
    type: ClassVar[str] = "it.reserve"
    schema_version: ClassVar[str] = "2.1"
    quantity: int


REGISTRY = MessageRegistry([PriceSet, ReserveIt])


def test_wire_form_is_structured_cloudevents_json() -> None:
    envelope = Envelope.wrap(PriceSet(product_id="laptop", price=Decimal("1299.99")), source="/s")

    wire = json.loads(envelope.to_json())

    assert wire["specversion"] == "1.0"
    assert wire["type"] == "price.set"
    assert wire["source"] == "/s"
    assert wire["datacontenttype"] == "application/json"
    assert wire["dataschema"] == "urn:microshop:schema:price.set:1.0"
    assert wire["data"] == {"product_id": "laptop", "price": "1299.99"}  # money as a string
    assert wire["correlationid"] == wire["id"]  # a new flow starts with its own id
    assert "causationid" not in wire  # None attributes are left out
    assert wire["time"].endswith("Z") or wire["time"].endswith("+00:00")


def test_round_trip_gives_back_the_message() -> None:
    sent = Envelope.wrap(PriceSet(product_id="p", price=Decimal("1.50")), source="/s")

    envelope, message = REGISTRY.parse(sent.to_json())

    assert envelope == sent
    assert message == PriceSet(product_id="p", price=Decimal("1.50"))


def test_caused_message_inherits_correlation_and_names_its_cause() -> None:
    first = Envelope.wrap(ReserveIt(quantity=1), source="/order")
    second = Envelope.wrap(PriceSet(product_id="p", price=Decimal(1)), source="/x", causation=first)

    assert second.correlationid == first.correlationid == first.id
    assert second.causationid == first.id
    assert second.id != first.id


def test_messages_are_frozen() -> None:
    message = ReserveIt(quantity=1)
    with pytest.raises(ValidationError):
        message.quantity = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"\xff\xfe", "not a CloudEvent"),
        (b"[1, 2]", "not a CloudEvent"),
        (
            b'{"specversion": "1.0", "type": "price.set", "source": "/s", "data": {}}',
            "id: Field required",
        ),
        (
            b'{"specversion": "0.3", "id": "1", "type": "price.set", "source": "/s", "data": {}}',
            "specversion",
        ),
        (
            b'{"specversion": "1.0", "id": "' + b"x" * 65 + b'", "type": "price.set",'
            b' "source": "/s", "data": {}}',
            "id: String should have at most 64 characters",
        ),
        (
            b'{"specversion": "1.0", "id": "1", "type": "nope", "source": "/s", "data": {}}',
            "unknown message type 'nope'",
        ),
        (
            b'{"specversion": "1.0", "id": "1", "type": "it.reserve", "source": "/s",'
            b' "data": {"quantity": "lots"}}',
            "invalid it.reserve data: quantity",
        ),
    ],
)
def test_invalid_bodies_say_why(body: bytes, reason: str) -> None:
    with pytest.raises(InvalidMessage, match=reason):
        REGISTRY.parse(body)


def test_newer_minor_version_with_unknown_fields_is_read() -> None:
    body = json.dumps(
        {
            "specversion": "1.0",
            "id": "1",
            "type": "it.reserve",
            "source": "/s",
            "dataschema": "urn:microshop:schema:it.reserve:2.7",
            "data": {"quantity": 3, "added_in_2_7": "ignored"},
        }
    )
    _, message = REGISTRY.parse(body)
    assert message == ReserveIt(quantity=3)


def test_other_major_version_is_refused() -> None:
    body = json.dumps(
        {
            "specversion": "1.0",
            "id": "1",
            "type": "it.reserve",
            "source": "/s",
            "dataschema": "urn:microshop:schema:it.reserve:3.0",
            "data": {"quantity": 3},
        }
    )
    with pytest.raises(InvalidMessage, match=r"3\.0 is incompatible with 2\.1"):
        REGISTRY.parse(body)


def test_one_type_cannot_be_registered_with_two_models() -> None:
    class Impostor(Event):
        type: ClassVar[str] = "price.set"

    with pytest.raises(ValueError, match="registered twice"):
        MessageRegistry([PriceSet, Impostor])


def test_a_delivery_gives_its_message_as_the_expected_type_or_rejects_it() -> None:
    message = ReserveIt(quantity=3)
    envelope = Envelope.wrap(message, source="/tests")
    delivery = Delivery(envelope, message, queue="inventory", attempt=1)
    assert delivery.expect(ReserveIt).quantity == 3
    with pytest.raises(Reject, match=r"expected price\.set, got it\.reserve"):
        delivery.expect(PriceSet)
