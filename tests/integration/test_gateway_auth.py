"""Tokens at the edge: refused tokens never reach a service."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator

import pytest

import inventory_svc.app
from bus.auth import SigningKey, TokenVerifier
from tests.conftest import RabbitAdmin
from tests.integration.conftest import ServiceStarter
from tests.integration.test_gateway_support import AUDIENCE, ISSUER, Caller, Gateways
from tests.support import eventually

pytestmark = pytest.mark.integration


@pytest.fixture
async def gateways(rabbit: RabbitAdmin, unique: str) -> AsyncIterator[Gateways]:
    async with Gateways(rabbit.url, unique) as started:
        yield started


def _b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _claims(token: str) -> dict[str, object]:
    payload = token.split(".")[1]
    decoded: dict[str, object] = json.loads(base64.urlsafe_b64decode(payload + "=="))
    return decoded


def refused_tokens(key: SigningKey) -> dict[str, str | None]:
    """Tokens the edge must refuse, by why."""
    good = key.mint(subject="u-1", role="user", issuer=ISSUER, audience=AUDIENCE)
    header, _, signature = good.split(".")
    promoted = {**_claims(good), "role": "admin"}
    return {
        "missing": None,
        "expired": key.mint(
            subject="u-1",
            role="user",
            issuer=ISSUER,
            audience=AUDIENCE,
            ttl=60,
            now=int(time.time()) - 3600,
        ),
        "tampered": f"{header}.{_b64(promoted)}.{signature}",
        "alg none": f"{_b64({'alg': 'none', 'typ': 'JWT', 'kid': key.kid})}.{_b64(promoted)}.",
        "another key": SigningKey.generate().mint(
            subject="u-1", role="admin", issuer=ISSUER, audience=AUDIENCE
        ),
        "wrong audience": key.mint(subject="u-1", role="user", issuer=ISSUER, audience="other"),
        "garbage": "not-a-token",
    }


async def test_missing_expired_tampered_and_alg_none_tokens_get_401_at_the_edge(
    gateways: Gateways, run_service: ServiceStarter, unique: str
) -> None:
    key = SigningKey.generate()
    verifier = TokenVerifier.from_jwks(key.jwks(), issuer=ISSUER, audience=AUDIENCE)
    gateway = await gateways.start(verifier=verifier)
    await run_service(
        inventory_svc.app,
        settings={"exchange": f"{unique}.events", "demo_data": True},
        verifier=verifier,
    )
    await eventually(lambda: bool(gateway.registry.rotation("inventory")))
    (instance,) = gateway.registry.rotation("inventory")

    async with Caller(gateway.settings.public_url) as caller:
        for why, token in refused_tokens(key).items():
            answer = await caller.call("GET", "/inventory", token=token)
            assert answer.status == 401, (why, answer.body)
            assert answer.headers["Content-Type"] == "application/problem+json", why
            assert answer.headers["WWW-Authenticate"] == "Bearer", why
            assert "Traceback" not in answer.raw.decode(), why
        assert instance.requests == 0  # none of them got past the edge

        admin = key.mint(subject="u-2", role="admin", issuer=ISSUER, audience=AUDIENCE)
        assert (await caller.call("GET", "/inventory", token=admin)).status == 200
        assert (await caller.call("GET", "/products")).status == 200  # public, no token
        assert instance.requests == 2
