"""``/docs/events``: every message type rendered from the AsyncAPI document, escaped, with
nothing loaded from elsewhere."""

from __future__ import annotations

import base64
import hashlib
import html
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from bus.memory import MemoryBroker
from bus.schemas import asyncapi
from gateway.app import Gateway, Settings, build
from gateway.event_docs import render
from microshop.catalogue import CONTRACTS, REGISTRY
from tests.support import free_port

DOCUMENT = asyncapi(CONTRACTS, version="9.9.9")
PAGE = render(DOCUMENT)


def section(page: str, message_type: str) -> str:
    match = re.search(
        rf'<section class="message" id="{re.escape(message_type)}">(.*?)</section>', page, re.S
    )
    assert match, f"no section for {message_type}"
    return match.group(1)


def test_every_message_type_has_a_section_and_a_link() -> None:
    ids = re.findall(r'<section class="message" id="([^"]+)">', PAGE)
    assert ids == sorted(contract.model.type for contract in CONTRACTS)
    for message_type in ids:
        assert f'<a href="#{message_type}">' in PAGE
    assert "28 message types" in PAGE
    assert "version 9.9.9" in PAGE


def test_a_section_names_producer_consumers_fields_schema_and_example() -> None:
    charge = section(PAGE, "payment.charge")

    assert "<dt>producer</dt><dd>order</dd>" in charge
    assert "<dt>consumers</dt><dd>payment</dd>" in charge
    assert "<code>payment.charge</code> on <code>microshop.events</code>" in charge
    assert "urn:microshop:schema:payment.charge:1.0" in charge
    assert '<span class="kind command">command</span>' in charge
    assert (
        "<tr><td><code>currency</code></td><td>string</td><td>no (default &quot;USD&quot;)</td>"
        in charge
    )
    assert "JSON Schema of <code>data</code>" in charge
    unwatched = section(PAGE, "order.created")
    assert "no service consumes it" in unwatched
    assert "<td>array of OrderLine</td>" in unwatched
    assert "<caption>OrderLine:</caption>" in unwatched


@pytest.mark.parametrize("message_type", [contract.model.type for contract in CONTRACTS])
def test_each_example_is_a_message_its_consumers_accept(message_type: str) -> None:
    blocks = re.findall(r"<pre>(.*?)</pre>", section(PAGE, message_type), re.S)
    schema, example = (html.unescape(block) for block in blocks)

    envelope, _ = REGISTRY.parse(example)

    assert envelope.type == message_type
    assert f'"$id": "urn:microshop:schema:{message_type}:1.0"' in schema


def test_text_from_the_document_is_escaped() -> None:
    hostile = "<script>alert(1)</script>"
    document: dict[str, Any] = {
        "asyncapi": "3.0.0",
        "info": {"version": hostile, "description": hostile},
        "defaultContentType": "application/cloudevents+json",
        "channels": {
            "x.y": {"bindings": {"amqp": {"exchange": {"name": hostile}}}},
        },
        "components": {
            "messages": {
                "x.y": {
                    "x-microshop-kind": "event",
                    "x-microshop-producer": hostile,
                    "x-microshop-consumers": [hostile],
                    "examples": [{"payload": {"data": hostile}}],
                    "payload": {
                        "allOf": [
                            {},
                            {
                                "properties": {
                                    "data": {
                                        "description": f"``{hostile}``",
                                        "properties": {hostile: {"type": "string"}},
                                    }
                                }
                            },
                        ]
                    },
                }
            }
        },
    }

    page = render(document)

    assert "<script" not in page
    assert page.count(html.escape(hostile)) >= 6


def test_the_page_loads_nothing_from_anywhere() -> None:
    assert "<script" not in PAGE
    assert not re.search(r'(src|href)="(https?:)?//', PAGE)
    assert "@import" not in PAGE
    assert "url(" not in PAGE


@pytest.fixture
async def gateway() -> AsyncIterator[Gateway]:
    started = build(Settings(port=free_port()), broker=MemoryBroker())
    await started.start()
    yield started
    await started.stop()


async def test_the_gateway_serves_it_publicly_with_a_policy_that_runs_no_script(
    gateway: Gateway,
) -> None:
    async with aiohttp.ClientSession(gateway.settings.public_url) as http:
        async with http.get("/docs/events") as response:
            assert response.status == 200
            assert response.content_type == "text/html"
            body = await response.text()
            policy = response.headers["Content-Security-Policy"]
        async with http.get("/") as response:
            links = (await response.json())["links"]

    assert 'id="order.created"' in body
    assert "script-src 'none'" in policy
    (style,) = re.findall(r"<style>(.*?)</style>", body, re.S)
    digest = base64.b64encode(hashlib.sha256(style.encode()).digest()).decode()
    assert f"style-src 'sha256-{digest}'" in policy
    assert links["docs/events"] == "/docs/events"
