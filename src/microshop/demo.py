"""``microshop demo``: the gateway and every service in one process, no servers needed.

The services share the in-process broker (``memory://demo``) and keep their data in SQLite
files in a temporary folder, with the demo users and catalogue loaded. ``--once`` places a
set of sample orders over HTTP, shows how each saga ends, and exits. With
``MICROSHOP_BROKER_URL=amqp://...`` the same demo runs on RabbitMQ, on an exchange and
queues of its own that it deletes when it stops: the variable the operator tools read
must not make the demo a consumer of a real system's commands.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bus.observability import configure_logging
from bus.service import Runnable
from bus.settings import DEFAULT_PORTS
from microshop.local import SERVICES, exchange_of, queue_of, remove_from_broker

BOB = "bob@example.com"
TERMINAL = {"confirmed", "cancelled", "refunded"}


@dataclass(frozen=True)
class Scenario:
    """A sample order, what to do with it, and how its saga should end."""

    name: str
    items: list[dict[str, Any]]
    method: str
    expect: str
    cancel_after_confirm: bool = False


SCENARIOS = (
    Scenario(
        "happy path",
        [{"product_id": "laptop", "quantity": 1}, {"product_id": "mouse", "quantity": 2}],
        "tok_visa",
        "confirmed",
    ),
    Scenario("out of stock", [{"product_id": "laptop", "quantity": 50}], "tok_visa", "cancelled"),
    Scenario(
        "declined card", [{"product_id": "phone", "quantity": 1}], "tok_declined", "cancelled"
    ),
    Scenario(
        "cancel with refund",
        [{"product_id": "keyboard", "quantity": 1}],
        "tok_visa",
        "refunded",
        cancel_after_confirm=True,
    ),
)


def build_services(workdir: Path, broker_url: str, system: str | None) -> list[Runnable]:
    """The gateway, then each service with demo data, SQLite in ``workdir``, one broker.

    With ``system`` (on RabbitMQ), the system is its own: exchange ``SYSTEM.events``,
    queues ``SYSTEM-SERVICE``. The gateway starts first so that it hears every service's
    first heartbeat.
    """
    own: dict[str, Any] = {} if system is None else {"exchange": exchange_of(system)}
    user_url = f"http://127.0.0.1:{DEFAULT_PORTS['user']}"
    import gateway.app

    gateway_settings = gateway.app.Settings(
        service="gateway",
        port=DEFAULT_PORTS["gateway"],
        broker_url=broker_url,
        jwks_url=f"{user_url}/.well-known/jwks.json",
        log_json=False,
        **own,
    )
    services: list[Runnable] = [gateway.app.build(gateway_settings)]
    for name in SERVICES:
        module = importlib.import_module(f"{name}_svc.app")
        fields = module.Settings.model_fields
        values: dict[str, Any] = {
            "service": name,
            "port": DEFAULT_PORTS[name],
            "broker_url": broker_url,
            "database_url": f"sqlite+aiosqlite:///{workdir}/{name}.db",
            "jwks_url": f"{user_url}/.well-known/jwks.json",
            "log_json": False,
        }
        if "demo_data" in fields:
            values["demo_data"] = True
        if system is not None:
            values |= own | {"queue": queue_of(system, name)}
        services.append(module.build(module.Settings(**values)))
    return services


async def run_demo(once: bool) -> int:
    """Start everything; then play the scenarios (``once``) or serve until Ctrl-C."""
    configure_logging("demo", level=os.environ.get("MICROSHOP_LOG_LEVEL", "WARNING"), json=False)
    broker_url = os.environ.get("MICROSHOP_BROKER_URL") or "memory://demo"
    # on RabbitMQ, a system of its own: never a consumer of a real one's commands
    name = None if broker_url.startswith("memory:") else f"demo-{uuid.uuid4().hex[:6]}"
    if name is not None:
        print(f"on RabbitMQ as {name}: exchange {exchange_of(name)}, queues {name}-*", flush=True)
    with tempfile.TemporaryDirectory(prefix="microshop-demo-") as workdir:
        services = build_services(Path(workdir), broker_url, name)
        started: list[Runnable] = []
        try:
            for service in services:
                await service.start()
                started.append(service)
            if once:
                return await play(services)
            print("microshop demo is running (Ctrl-C stops it):")
            for service in services:
                print(f"  {service.name:<10} {service.settings.public_url}")
            await _until_signalled()
            return 0
        finally:
            for service in reversed(started):
                await service.stop()
            if name is not None:
                delays = services[-1].settings.retry_delays_ms
                try:
                    await remove_from_broker(broker_url, name, delays)
                except Exception as error:  # must not hide why the demo stopped
                    print(f"could not remove {name} from RabbitMQ: {error}", file=sys.stderr)


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()


async def play(services: list[Runnable]) -> int:
    """Place each scenario's order over HTTP, follow it to its end, print a table."""
    urls = {service.name: service.settings.public_url for service in services}
    from user_svc.app import DEMO_PASSWORD

    started = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        async with http.post(
            f"{urls['user']}/auth/login", json={"email": BOB, "password": DEMO_PASSWORD}
        ) as response:
            token = (await response.json())["access_token"]
        auth = {"Authorization": f"Bearer {token}"}
        outcomes = await asyncio.gather(
            *(follow(http, urls["order"], auth, scenario) for scenario in SCENARIOS)
        )
    elapsed = time.monotonic() - started
    print()
    print(f"{'scenario':<20} {'order':<10} {'total':>9}  {'status':<10} reason")
    for scenario, order in zip(SCENARIOS, outcomes, strict=True):
        mark = "ok" if order["status"] == scenario.expect else f"expected {scenario.expect}"
        print(
            f"{scenario.name:<20} {order['id'][:8]:<10} {order['total']:>9}  "
            f"{order['status']:<10} {order.get('status_reason') or ''}  [{mark}]"
        )
    good = sum(order["status"] == s.expect for s, order in zip(SCENARIOS, outcomes, strict=True))
    print(f"\n{good}/{len(SCENARIOS)} scenarios ended as expected in {elapsed:.1f} s")
    return 0 if good == len(SCENARIOS) else 1


async def follow(
    http: aiohttp.ClientSession, order_url: str, auth: dict[str, str], scenario: Scenario
) -> dict[str, Any]:
    """Place one order and print each status it passes through until it settles."""
    body = {"items": scenario.items, "payment": {"provider": "stripe", "method": scenario.method}}
    async with http.post(f"{order_url}/orders", json=body, headers=auth) as response:
        order: dict[str, Any] = await response.json()
    if response.status != 202:
        print(f"  {scenario.name}: refused: {order.get('detail')}", file=sys.stderr)
        return {"id": "-", "total": "-", "status": "refused", "status_reason": order.get("detail")}
    print(f"  {scenario.name}: order {order['id'][:8]} {order['status']}")
    seen = order["status"]
    deadline = time.monotonic() + 20
    cancelled = False
    while time.monotonic() < deadline:
        async with http.get(f"{order_url}/orders/{order['id']}", headers=auth) as response:
            order = await response.json()
        if order["status"] != seen:
            seen = order["status"]
            print(f"  {scenario.name}: order {order['id'][:8]} -> {seen}")
        if scenario.cancel_after_confirm and seen == "confirmed" and not cancelled:
            cancelled = True
            async with http.post(
                f"{order_url}/orders/{order['id']}/cancel",
                headers=auth,
                json={"reason": "demo: changed my mind"},
            ) as response:
                print(f"  {scenario.name}: cancel requested ({response.status})")
            continue
        if seen in TERMINAL and not (scenario.cancel_after_confirm and seen == "confirmed"):
            return order
        await asyncio.sleep(0.05)
    return order
