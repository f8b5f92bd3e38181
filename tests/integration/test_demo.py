"""``microshop demo`` on the real RabbitMQ: a system of its own, gone when it stops."""

from __future__ import annotations

import asyncio
import os
import re
import sys

import aio_pika
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
    # and what it had of its own is gone
    name = re.search(r"on RabbitMQ as (demo-[0-9a-f]+):", out.decode())
    assert name is not None, out.decode()
    connection = await aio_pika.connect(rabbit.url)
    async with connection:
        with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
            await (await connection.channel()).declare_exchange(f"{name[1]}.events", passive=True)
        for queue in (f"{name[1]}-order", f"{name[1]}-order.dlq", f"{name[1]}-payment"):
            with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
                await (await connection.channel()).declare_queue(queue, passive=True)
