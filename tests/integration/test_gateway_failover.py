"""Instances joining, dying and coming back, with the services as real processes.

The services run as ``microshop run NAME`` processes (``microshop.local``) on an exchange of
their own; the gateway runs in the test's process and finds them by their heartbeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.app import Gateway
from microshop.local import LocalSystem
from tests.conftest import RabbitAdmin
from tests.integration.test_gateway_support import Caller, Gateways, all_up
from tests.support import eventually, free_port

pytestmark = pytest.mark.integration


@pytest.fixture
async def gateways(rabbit: RabbitAdmin, unique: str) -> AsyncIterator[Gateways]:
    async with Gateways(rabbit.url, unique) as started:
        yield started


@pytest.fixture
async def system(
    gateways: Gateways, rabbit: RabbitAdmin, database_url: str, unique: str, tmp_path: Path
) -> AsyncIterator[tuple[LocalSystem, Gateway]]:
    """The four services as processes, and a gateway that was listening before they started."""
    local = LocalSystem(rabbit.url, database_url, unique, tmp_path)
    gateway = await gateways.start(
        jwks_url=f"{local.url('user')}/.well-known/jwks.json",
        rate_limit_rps=10_000,  # the readers below are one client asking as fast as it can
        rate_limit_burst=10_000,
    )
    try:
        await local.start()
        await eventually(lambda: all_up(gateway), within=20)
        yield local, gateway
    finally:
        await local.stop()


def available(gateway: Gateway, service: str) -> int:
    return sum(instance.available for instance in gateway.registry.rotation(service))


@contextlib.asynccontextmanager
async def second_inventory(
    local: LocalSystem, logs: Path, port: int, **env: str
) -> AsyncIterator[asyncio.subprocess.Process]:
    """One more inventory process, on ``port`` with ``env`` added; killed after if alive."""
    with (logs / "inventory-2.log").open("ab") as log:
        second = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "microshop.cli", "run", "inventory", "--port", str(port)),
            env={**local.env("inventory"), "MICROSHOP_PORT": str(port), **env},
            stdout=log,
            stderr=log,
        )
    try:
        yield second
    finally:
        if second.returncode is None:
            second.kill()
            await second.wait()


async def test_a_second_instance_joins_in_seconds_and_losing_one_of_two_loses_no_get(
    system: tuple[LocalSystem, Gateway], tmp_path: Path
) -> None:
    local, gateway = system
    port = free_port()
    async with second_inventory(local, tmp_path, port) as second:
        started = time.monotonic()
        await eventually(lambda: available(gateway, "inventory") == 2, within=20)
        assert time.monotonic() - started < 10

        statuses: Counter[int] = Counter()
        done = asyncio.Event()

        async def keep_reading(caller: Caller) -> None:
            while not done.is_set():
                statuses[(await caller.call("GET", "/products")).status] += 1

        async with Caller(gateway.settings.public_url) as caller:
            readers = [asyncio.create_task(keep_reading(caller)) for _ in range(4)]
            await asyncio.sleep(1.0)
            served = {i.url: i.requests for i in gateway.registry.rotation("inventory")}
            second.send_signal(signal.SIGKILL)  # no drain, no goodbye
            await second.wait()
            await asyncio.sleep(1.5)
            done.set()
            await asyncio.gather(*readers)

    assert all(count > 0 for count in served.values()), served  # both were in rotation
    assert statuses[200] > 50
    assert set(statuses) == {200}, statuses
    (killed,) = [i for i in gateway.registry.rotation("inventory") if str(port) in i.url]
    assert not killed.available


async def test_an_instance_is_reached_at_the_url_it_advertises(
    system: tuple[LocalSystem, Gateway], tmp_path: Path
) -> None:
    local, gateway = system
    port = free_port()
    advertised = f"http://localhost:{port}"  # not the 127.0.0.1 address it would announce
    async with second_inventory(local, tmp_path, port, MICROSHOP_ADVERTISE_URL=advertised):
        await eventually(lambda: available(gateway, "inventory") == 2, within=20)
        urls = {instance.url for instance in gateway.registry.rotation("inventory")}
        assert urls == {local.url("inventory"), advertised}
        async with Caller(gateway.settings.public_url) as caller:
            for _ in range(4):
                assert (await caller.call("GET", "/products")).status == 200
        (second,) = [i for i in gateway.registry.rotation("inventory") if i.url == advertised]
        assert second.requests > 0


async def test_a_dead_service_answers_503_at_once_and_is_back_when_it_restarts(
    system: tuple[LocalSystem, Gateway],
) -> None:
    local, gateway = system
    await local.kill("payment")
    async with Caller(gateway.settings.public_url) as caller:
        for _ in range(3):
            started = time.monotonic()
            answer = await caller.call("GET", "/providers")
            assert answer.status == 503, answer.body
            assert answer.headers["Content-Type"] == "application/problem+json"
            assert time.monotonic() - started < 0.5
        health = await caller.call("GET", "/health")
        assert health.status == 503
        assert health.body["down"] == ["payment"]

        await local.start("payment")
        await eventually(lambda: available(gateway, "payment") == 1, within=20)
        assert (await caller.call("GET", "/providers")).status == 200
        assert (await caller.call("GET", "/health")).status == 200
