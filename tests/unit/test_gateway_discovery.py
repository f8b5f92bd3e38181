"""The gateway on the in-process broker: it finds services by their heartbeats, forwards to
them, forgets them at goodbye; and ``microshop run gateway`` serves until SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from bus.db import Database
from bus.envelope import Envelope
from bus.memory import MemoryBroker
from bus.service import Service
from bus.settings import Settings as ServiceSettings
from bus.web import Api, json_response
from gateway.app import Gateway, Settings, build
from tests.integration.tables import metadata
from tests.support import eventually, free_port, heartbeat

api = Api()


@api.get("/products")
async def list_products(_: web.Request) -> web.Response:
    return json_response({"items": [{"id": "laptop"}], "total": 1, "limit": 50, "offset": 0})


@pytest.fixture
async def gateway() -> AsyncIterator[Gateway]:
    broker = MemoryBroker()
    settings = Settings(port=free_port(), health_check_seconds=0.2)
    started = build(settings, broker=broker)
    await started.start()
    yield started
    await started.stop()


def inventory(tmp_path: Path, broker: MemoryBroker) -> Service:
    settings = ServiceSettings(service="inventory", port=free_port(), heartbeat_seconds=60)
    db = Database(f"sqlite+aiosqlite:///{tmp_path}/inventory.db", metadata=[metadata])
    return Service(settings, db=db, broker=broker, api=api)


async def test_a_service_is_routed_from_its_first_heartbeat_until_its_goodbye(
    gateway: Gateway, tmp_path: Path
) -> None:
    assert isinstance(gateway.broker, MemoryBroker)
    service = inventory(tmp_path, gateway.broker)
    url = f"{gateway.settings.public_url}/products"
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as response:
            assert response.status == 503  # nobody there yet
        await service.start()
        try:
            await eventually(lambda: gateway.balancer.pick("inventory") is not None)
            (instance,) = gateway.registry.rotation("inventory")
            assert instance.instance_id == service.instance_id
            assert instance.url == service.settings.public_url
            async with http.get(url) as response:
                assert response.status == 200
                assert (await response.json())["items"] == [{"id": "laptop"}]
        finally:
            await service.stop()
        await eventually(lambda: gateway.registry.rotation("inventory") == ())
        async with http.get(url) as response:
            assert response.status == 503


async def test_stopping_the_gateway_twice_is_harmless(gateway: Gateway) -> None:
    await gateway.stop()
    await gateway.stop()
    assert not gateway.ready


async def test_microshop_run_gateway_serves_until_sigterm(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "MICROSHOP_BROKER_URL": "memory://", "MICROSHOP_LOG_JSON": "0"}
    with (tmp_path / "gateway.log").open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "microshop.cli", "run", "gateway", "--port", str(port)),
            env=env,
            stdout=log,
            stderr=log,
        )
    try:
        async with aiohttp.ClientSession() as http:

            async def live() -> bool:
                try:
                    async with http.get(f"http://127.0.0.1:{port}/health/live") as response:
                        return response.status == 200
                except aiohttp.ClientError:
                    return False

            await eventually(live, within=20, every=0.1)
            async with http.get(f"http://127.0.0.1:{port}/") as response:
                assert (await response.json())["name"] == "microshop gateway"
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 15) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_a_new_gateway_is_ready_once_it_heard_the_services_or_waited_a_beat() -> None:
    broker = MemoryBroker()
    settings = Settings(port=free_port(), health_check_seconds=0.2, heartbeat_seconds=1.0)
    waiting, hearing, stopped = (
        build(settings.model_copy(update={"port": free_port()}), broker=broker) for _ in range(3)
    )
    try:
        await waiting.start()
        await stopped.start()
        assert not waiting.ready  # it has heard of no instance yet: it would answer 503
        await asyncio.sleep(0.5)
        assert not waiting.ready
        await stopped.stop()  # before its beat has passed
        await eventually(lambda: waiting.ready, within=2)  # no service came: a beat, then ready
        assert not stopped.ready  # the beat passed for it too: stopping comes first

        await hearing.start()
        for service in ("user", "inventory", "payment", "order"):
            url = f"http://127.0.0.1:{free_port()}"
            beat = heartbeat(url, f"{service}-1", service=service)
            await broker.publish(Envelope.wrap(beat, source=f"/{service}"))
        await eventually(lambda: hearing.ready, within=0.5)  # every service heard: at once
    finally:
        await waiting.stop()
        await hearing.stop()
