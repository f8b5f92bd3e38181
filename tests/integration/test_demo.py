"""``microshop demo`` on the real RabbitMQ: a system of its own, gone when it stops."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest

from bus.amqp import AmqpBroker
from bus.broker import Delivery
from microshop.catalogue import REGISTRY
from tests.conftest import RabbitAdmin

pytestmark = pytest.mark.integration


async def test_the_demo_on_rabbitmq_keeps_off_the_shared_exchange(
    rabbit: RabbitAdmin, unique: str
) -> None:
    # what a system on the default exchange would hear of the demo: nothing
    heard: list[str] = []

    async def overhear(delivery: Delivery) -> None:
        heard.append(delivery.envelope.type)

    watcher = AmqpBroker(rabbit.url, name=unique)
    await watcher.connect()
    try:
        await watcher.subscribe(["#"], overhear, REGISTRY)  # every type the system knows
        demo = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "microshop.cli", "demo", "--once"),
            env=os.environ | {"MICROSHOP_BROKER_URL": rabbit.url},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(demo.communicate(), 60)
        await asyncio.sleep(0.5)
    finally:
        await watcher.close()

    assert demo.returncode == 0, err.decode()
    assert "4/4 scenarios ended as expected" in out.decode()
    assert heard == []
