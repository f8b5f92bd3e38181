"""Tokens at the edge: refused tokens never reach a service."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

import inventory_svc.app
from tests.conftest import RabbitAdmin
from tests.integration.conftest import ServiceStarter
from tests.integration.test_gateway_support import Caller, Gateways
from tests.support import Tokens, eventually, refused_tokens

pytestmark = pytest.mark.integration


@pytest.fixture
async def gateways(rabbit: RabbitAdmin, unique: str) -> AsyncIterator[Gateways]:
    async with Gateways(rabbit.url, unique) as started:
        yield started


async def test_missing_expired_tampered_and_alg_none_tokens_get_401_at_the_edge(
    gateways: Gateways, run_service: ServiceStarter, unique: str
) -> None:
    tokens = Tokens()
    verifier = tokens.verifier
    gateway = await gateways.start(verifier=verifier)
    await run_service(
        inventory_svc.app,
        settings={"exchange": f"{unique}.events", "demo_data": True},
        verifier=verifier,
    )
    await eventually(lambda: bool(gateway.registry.rotation("inventory")))
    (instance,) = gateway.registry.rotation("inventory")

    async with Caller(gateway.settings.public_url) as caller:
        for why, token in refused_tokens(tokens.key).items():
            answer = await caller.call("GET", "/inventory", token=token)
            assert answer.status == 401, (why, answer.body)
            assert answer.headers["Content-Type"] == "application/problem+json", why
            assert answer.headers["WWW-Authenticate"] == "Bearer", why
            assert "Traceback" not in answer.raw.decode(), why
        assert instance.requests == 0  # none of them got past the edge

        admin = tokens.mint("u-2", "admin")
        assert (await caller.call("GET", "/inventory", token=admin)).status == 200
        assert (await caller.call("GET", "/products")).status == 200  # public, no token
        assert instance.requests == 2
