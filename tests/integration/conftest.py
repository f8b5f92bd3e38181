"""Integration fixtures: a real broker and a real PostgreSQL schema per test."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import aio_pika
import pytest
from tests.conftest import RabbitAdmin

from bus.amqp import AmqpBroker, retry_queue
from bus.db import Database

RETRY_DELAYS_MS = (20, 40)


@pytest.fixture
async def amqp(rabbit: RabbitAdmin, unique: str) -> AsyncIterator[AmqpBroker]:
    """A connected AmqpBroker; the test's queues (named ``<unique>*``) are deleted after."""
    broker = AmqpBroker(rabbit.url, name=unique, prefetch=16, retry_delays_ms=RETRY_DELAYS_MS)
    await broker.connect()
    yield broker
    await broker.close()
    await delete_queues(rabbit.url, [unique])


async def delete_queues(url: str, queues: list[str]) -> None:
    """Delete each queue with its DLQ and retry queues."""
    connection = await aio_pika.connect(url)
    async with connection:
        for queue in queues:
            names = [queue, f"{queue}.dlq", *(retry_queue(queue, d) for d in RETRY_DELAYS_MS)]
            for name in names:
                channel = await connection.channel()
                with contextlib.suppress(Exception):
                    await channel.queue_delete(name)
                with contextlib.suppress(Exception):
                    await channel.close()


@pytest.fixture
async def postgres(database_url: str, unique: str) -> AsyncIterator[Database]:
    """A schema of its own on the real PostgreSQL, dropped after the test."""
    from tests.integration.tables import metadata

    db = Database(database_url, schema=unique, metadata=[metadata])
    await db.create_all()
    yield db
    await db.drop_schema()
    await db.close()
