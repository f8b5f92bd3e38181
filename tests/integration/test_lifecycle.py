"""SIGTERM drains a real service process: in-flight work finishes, is acked and relayed."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from bus.amqp import AmqpBroker
from bus.broker import Delivery
from bus.db import Database
from bus.envelope import Envelope, MessageRegistry
from tests.conftest import RabbitAdmin
from tests.integration.conftest import delete_queues
from tests.integration.drain_service import SlowAsked, SlowDone
from tests.integration.tables import effects
from tests.support import eventually, free_port

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[2]


async def test_sigterm_finishes_in_flight_handler_acks_it_and_flushes_outbox(
    rabbit: RabbitAdmin, postgres: Database, unique: str
) -> None:
    queue = f"{unique}-drain"
    env = {
        **os.environ,
        "MICROSHOP_BROKER_URL": rabbit.url,
        "MICROSHOP_PORT": str(free_port()),
        "MICROSHOP_HEARTBEAT_SECONDS": "60",
        "DATABASE_URL": postgres.url,
        "DRAIN_QUEUE": queue,
        "DRAIN_SCHEMA": postgres.schema or "",
    }
    broker = AmqpBroker(rabbit.url, name=unique)
    await broker.connect()
    done: list[str] = []

    async def record(delivery: Delivery) -> None:
        done.append(delivery.message.name)  # type: ignore[attr-defined]

    await broker.consume(f"{unique}-watch", [SlowDone.type], record, MessageRegistry([SlowDone]))
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.integration.drain_service",
        cwd=ROOT,
        env=env,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stderr is not None
        await _wait_for_line(process.stderr, b"service ready")
        await broker.publish(Envelope.wrap(SlowAsked(name="in-flight"), source="/tests"))
        await _wait_for_line(process.stderr, b"started in-flight")

        process.send_signal(signal.SIGTERM)
        rest = await asyncio.wait_for(process.stderr.read(), 30)
        assert await asyncio.wait_for(process.wait(), 30) == 0, rest.decode()
    finally:
        if process.returncode is None:
            process.kill()
        await broker.close()

    async with postgres.session() as session:
        assert (await session.scalars(select(effects.c.name))).all() == ["in-flight"]
    await eventually(lambda: done == ["in-flight"], within=5)  # relayed before the process exited
    # acked: nothing is left for the next instance to redo
    restarted = AmqpBroker(rabbit.url, name=f"{unique}-check")
    await restarted.connect()
    channel = await restarted.connection.channel()
    left = await channel.declare_queue(queue, passive=True)
    assert left.declaration_result.message_count == 0
    await restarted.close()
    await delete_queues(rabbit.url, [queue, f"{unique}-watch"])


async def _wait_for_line(stream: asyncio.StreamReader, needle: bytes) -> None:
    async with asyncio.timeout(30):
        while needle not in (line := await stream.readline()):
            if not line:
                raise AssertionError(f"process ended before printing {needle!r}")
