"""Tokens at the services themselves: each one refuses a bad token, gateway or no gateway."""

from __future__ import annotations

from types import ModuleType

import pytest

import inventory_svc.app
import order_svc.app
import payment_svc.app
import user_svc.app
from bus.auth import SigningKey, TokenVerifier
from tests.integration.conftest import ServiceStarter
from tests.integration.service_http import ServiceHttp
from tests.integration.test_gateway_support import AUDIENCE, ISSUER
from tests.integration.test_user_support import UserHttp
from tests.support import refused_tokens

pytestmark = pytest.mark.integration

# the refused tokens this file sends (named as refused_tokens names them), and why each is
REASONS = {
    "alg none": "unsupported algorithm",
    "expired": "token expired",
    "another key": "unknown key id",
}


async def assert_refused_with_401(base_url: str, path: str, key: SigningKey) -> None:
    """Each token of REASONS gets a 401 problem saying why, straight from ``base_url``."""
    tokens = refused_tokens(key)
    async with ServiceHttp(base_url) as service:
        for why, reason in REASONS.items():
            answer = await service.call("GET", path, token=tokens[why])

            assert answer.status == 401, (why, answer.body)
            assert answer.headers["Content-Type"] == "application/problem+json", why
            assert answer.headers["WWW-Authenticate"] == "Bearer", why
            assert answer.body["detail"] == reason, why


async def test_the_user_service_refuses_bad_tokens_with_401(run_service: ServiceStarter) -> None:
    key = SigningKey.generate()
    service = await run_service(user_svc.app, settings={"demo_data": True}, signing_key=key)
    async with UserHttp(service.settings.public_url) as users:
        token = await users.login("bob@example.com", user_svc.app.DEMO_PASSWORD)
        assert (await users.call("GET", "/auth/me", token=token)).status == 200

    await assert_refused_with_401(service.settings.public_url, "/auth/me", key)


@pytest.mark.parametrize(
    ("module", "path"),
    [(inventory_svc.app, "/inventory"), (payment_svc.app, "/payments"), (order_svc.app, "/orders")],
)
async def test_the_inventory_payment_and_order_services_refuse_bad_tokens_with_401(
    run_service: ServiceStarter, module: ModuleType, path: str
) -> None:
    key = SigningKey.generate()
    verifier = TokenVerifier.from_jwks(key.jwks(), issuer=ISSUER, audience=AUDIENCE)
    service = await run_service(module, verifier=verifier)
    admin = key.mint(subject="u-2", role="admin", issuer=ISSUER, audience=AUDIENCE)
    async with ServiceHttp(service.settings.public_url) as caller:
        assert (await caller.call("GET", path, token=admin)).status == 200

    await assert_refused_with_401(service.settings.public_url, path, key)
