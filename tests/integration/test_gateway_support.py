"""What the gateway's integration tests share: the gateway in-process on the real broker,
the four services behind it, and a person calling it over HTTP.

No tests live here; the name only follows the files the gateway owns (test_gateway_*).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import inventory_svc.app
import order_svc.app
import payment_svc.app
import user_svc.app
from bus.service import Service
from gateway.app import Gateway, Settings, build
from tests.integration.conftest import ServiceStarter, delete_exchanges
from tests.integration.service_http import Answer, ServiceHttp
from tests.support import eventually, free_port

ALICE, BOB, CAROL = "alice@example.com", "bob@example.com", "carol@example.com"
VISA = {"provider": "stripe", "method": "tok_visa"}


class Caller(ServiceHttp):
    """A person (or a program) calling one base URL; logs in as demo users when asked."""

    def __init__(self, base_url: str) -> None:
        super().__init__(base_url)
        self.tokens: dict[str, str] = {}

    async def call(
        self,
        method: str,
        path: str,
        *,
        as_user: str | None = None,
        token: str | None = None,
        json: Any = None,
        data: Any = None,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        """One request; ``as_user`` logs in (through the gateway) and sends the token."""
        if as_user is not None:
            token = self.tokens.get(as_user) or await self.login(as_user)
        return await super().call(method, path, token=token, json=json, data=data, headers=headers)

    async def login(self, email: str, password: str = user_svc.app.DEMO_PASSWORD) -> str:
        """Log in through the gateway and remember the token."""
        answer = await self.call("POST", "/auth/login", json={"email": email, "password": password})
        assert answer.status == 200, answer.body
        token: str = answer.body["access_token"]
        self.tokens[email] = token
        return token


class Gateways:
    """Starts gateways in-process on the real broker; stops them and their exchange after."""

    def __init__(self, rabbit_url: str, unique: str) -> None:
        self.rabbit_url = rabbit_url
        self.unique = unique
        self.started: list[Gateway] = []

    async def start(self, **settings: Any) -> Gateway:
        """A started gateway on the test's exchange; ``settings`` override, ``verifier=`` too."""
        verifier = settings.pop("verifier", None)
        values: dict[str, Any] = {
            "broker_url": self.rabbit_url,
            "exchange": f"{self.unique}.events",
            "port": free_port(),
            "health_check_seconds": 0.5,
            "drain_seconds": 2,
            "log_json": False,
        }
        gateway = build(Settings(**{**values, **settings}), verifier=verifier)
        await gateway.start()
        self.started.append(gateway)
        return gateway

    async def __aenter__(self) -> Gateways:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for gateway in reversed(self.started):
            await gateway.stop()
        exchange = f"{self.unique}.events"
        with contextlib.suppress(Exception):  # gone already when services shared it
            await delete_exchanges(self.rabbit_url, [exchange, f"{exchange}.dlx"])


@dataclass
class System:
    """The four services in-process and the gateway in front of them."""

    gateway: Gateway
    services: dict[str, Service]

    @property
    def url(self) -> str:
        """The gateway's base URL."""
        return self.gateway.settings.public_url


async def start_system(
    run_service: ServiceStarter, gateways: Gateways, unique: str, **gateway_settings: Any
) -> System:
    """The gateway first (so it hears every service's first heartbeat), then the services."""
    user_port = free_port()
    user_url = f"http://127.0.0.1:{user_port}"
    jwks = {"jwks_url": f"{user_url}/.well-known/jwks.json"}
    gateway = await gateways.start(**jwks, **gateway_settings)
    common = {"exchange": f"{unique}.events", "heartbeat_seconds": 2, **jwks}
    user = await run_service(
        user_svc.app, settings={**common, "port": user_port, "demo_data": True}
    )
    inventory = await run_service(inventory_svc.app, settings={**common, "demo_data": True})
    payment = await run_service(payment_svc.app, settings=common)
    order = await run_service(
        order_svc.app,
        settings={**common, "user_url": user_url, "inventory_url": inventory.settings.public_url},
    )
    system = System(
        gateway, {"user": user, "inventory": inventory, "payment": payment, "order": order}
    )
    await eventually(lambda: all_up(gateway), within=15)
    return system


def all_up(gateway: Gateway) -> bool:
    """Every routed service has an available instance behind ``gateway``."""
    return all(
        any(instance.available for instance in gateway.registry.rotation(service))
        for service in ("user", "inventory", "payment", "order")
    )


async def place_order(caller: Caller, as_user: str, product: str = "mouse") -> str:
    """Place an order for one ``product`` through the gateway; its id."""
    answer = await caller.call(
        "POST",
        "/orders",
        as_user=as_user,
        json={"items": [{"product_id": product, "quantity": 1}], "payment": VISA},
    )
    assert answer.status == 202, answer.body
    order_id: str = answer.body["id"]
    return order_id


async def wait_for_order(caller: Caller, order_id: str, as_user: str, status: str) -> Answer:
    """Poll the order through the gateway until it reaches ``status``."""
    seen: list[Answer] = []

    async def reached() -> bool:
        seen.append(await caller.call("GET", f"/orders/{order_id}", as_user=as_user))
        return seen[-1].status == 200 and seen[-1].body["status"] == status

    await eventually(reached, within=30, every=0.1)
    return seen[-1]
