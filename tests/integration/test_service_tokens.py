"""Tokens at the services themselves: each one refuses a bad token, gateway or no gateway."""

from __future__ import annotations

from types import ModuleType

import pytest

import inventory_svc.app
import order_svc.app
import payment_svc.app
import user_svc.app
from bus.auth import SigningKey
from tests.integration.conftest import ServiceStarter
from tests.integration.service_http import ServiceHttp
from tests.integration.test_user_support import UserHttp
from tests.support import Tokens, refused_tokens

pytestmark = pytest.mark.integration

# why some of the refused tokens are refused, as the services say it
REASONS = {
    "alg none": "unsupported algorithm",
    "expired": "token expired",
    "another key": "unknown key id",
}


async def assert_refused_with_401(base_url: str, path: str, key: SigningKey) -> None:
    """Every token of ``refused_tokens`` gets a 401 problem straight from ``base_url``."""
    async with ServiceHttp(base_url) as service:
        for why, token in refused_tokens(key).items():
            answer = await service.call("GET", path, token=token)

            assert answer.status == 401, (why, answer.body)
            assert answer.headers["Content-Type"] == "application/problem+json", why
            assert answer.headers["WWW-Authenticate"] == "Bearer", why
            if why in REASONS:
                assert answer.body["detail"] == REASONS[why], why


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
    tokens = Tokens()
    service = await run_service(module, verifier=tokens.verifier)
    async with ServiceHttp(service.settings.public_url) as caller:
        assert (await caller.call("GET", path, token=tokens.mint("u-2", "admin"))).status == 200

    await assert_refused_with_401(service.settings.public_url, path, tokens.key)
