"""The versioning rule of schemas/README.md, for every message type in the catalogue.

Same major version: read, whatever the minor, unknown fields ignored (at any depth).
Another major version: refused, and dead-lettered at once with the reason.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from bus.broker import ATTEMPT_HEADER, CAUSE_HEADER, REASON_HEADER, Delivery, process
from bus.envelope import InvalidMessage
from bus.schemas import Contract, example_envelope
from microshop.catalogue import CONTRACTS, REGISTRY

TYPES = [contract.model.type for contract in CONTRACTS]


def contract(message_type: str) -> Contract:
    return next(c for c in CONTRACTS if c.model.type == message_type)


def with_extras(value: Any) -> Any:
    """``value`` with an unknown field in every object, however deep."""
    if isinstance(value, dict):
        return {**{key: with_extras(item) for key, item in value.items()}, "added_later": 1}
    if isinstance(value, list):
        return [with_extras(item) for item in value]
    return value


def written_as(message_type: str, version: str | None, *, extras: bool = False) -> bytes:
    """The catalogue's example of ``message_type``, as a producer at ``version`` writes it."""
    envelope = example_envelope(contract(message_type))
    envelope.pop("dataschema")
    if version is not None:
        envelope["dataschema"] = f"urn:microshop:schema:{message_type}:{version}"
    if extras:
        envelope["data"] = with_extras(envelope["data"])
        envelope["subject"] = "an extension attribute this consumer does not know"
    return json.dumps(envelope).encode()


@pytest.mark.parametrize("message_type", TYPES)
def test_a_newer_minor_version_with_unknown_fields_is_read(message_type: str) -> None:
    _, expected = REGISTRY.parse(written_as(message_type, "1.0"))

    envelope, message = REGISTRY.parse(written_as(message_type, "1.7", extras=True))

    assert message == expected
    assert envelope.type == message_type


@pytest.mark.parametrize("message_type", TYPES)
def test_a_message_that_names_no_version_is_read_as_the_current_one(message_type: str) -> None:
    _, message = REGISTRY.parse(written_as(message_type, None))
    assert message.type == message_type


@pytest.mark.parametrize("version", ["2.0", "0.9", "10.1"])
@pytest.mark.parametrize("message_type", TYPES)
def test_another_major_version_is_refused(message_type: str, version: str) -> None:
    with pytest.raises(InvalidMessage, match=f"schema version {version} is incompatible with 1.0"):
        REGISTRY.parse(written_as(message_type, version))


async def test_an_incompatible_message_is_dead_lettered_at_once_with_the_reason() -> None:
    handled: list[Delivery] = []

    async def handler(delivery: Delivery) -> None:
        handled.append(delivery)

    outcome = await process(
        written_as("order.created", "2.0"),
        {},
        queue="audit",
        routing_key="order.created",
        handler=handler,
        registry=REGISTRY,
        retry_delays_ms=(100, 200),
    )

    assert outcome.action == "dead_letter"
    assert outcome.headers[CAUSE_HEADER] == "invalid"
    assert outcome.headers[ATTEMPT_HEADER] == 1  # no retry: retrying cannot help
    assert "order.created schema version 2.0 is incompatible" in outcome.headers[REASON_HEADER]
    assert handled == []
