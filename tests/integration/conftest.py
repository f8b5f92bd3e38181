"""Integration fixtures: a real broker and a real PostgreSQL schema per test."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from types import ModuleType
from typing import Any

import aio_pika
import pytest

from bus.amqp import AmqpBroker, dead_letter_queue, retry_queue
from bus.broker import EXCHANGE
from bus.db import Database
from bus.service import Service
from tests.conftest import RabbitAdmin
from tests.support import free_port

RETRY_DELAYS_MS = (50, 200)
# every delay a test or a default gives, so cleaning up finds every retry queue
ANY_RETRY_DELAY = (20, 40, 50, 100, 200, 500, 1000, 5000)


@pytest.fixture
async def amqp(rabbit: RabbitAdmin, unique: str) -> AsyncIterator[AmqpBroker]:
    """A connected AmqpBroker; every queue the test consumes or declares is deleted after."""
    broker = AmqpBroker(rabbit.url, name=unique, prefetch=16, retry_delays_ms=RETRY_DELAYS_MS)
    await broker.connect()
    used: set[str] = {unique}
    consume, declare = broker.consume, broker.declare

    async def consume_and_note(queue: str, *args: Any, **kwargs: Any) -> Any:
        used.add(queue)
        return await consume(queue, *args, **kwargs)

    async def declare_and_note(queue: str, *args: Any, **kwargs: Any) -> None:
        used.add(queue)
        await declare(queue, *args, **kwargs)

    broker.consume = consume_and_note  # type: ignore[method-assign]
    broker.declare = declare_and_note  # type: ignore[method-assign]
    yield broker
    await broker.close()
    await delete_queues(rabbit.url, sorted(used))


async def delete_queues(url: str, queues: list[str]) -> None:
    """Delete each queue with its DLQ and retry queues."""
    connection = await aio_pika.connect(url)
    async with connection:
        for queue in queues:
            names = [
                queue,
                dead_letter_queue(queue),
                *(retry_queue(queue, d) for d in ANY_RETRY_DELAY),
            ]
            for name in names:
                # another test may be closing every connection: cleaning up is best effort
                with contextlib.suppress(Exception):
                    channel = await connection.channel()
                    await channel.queue_delete(name)
                    await channel.close()


async def delete_exchanges(url: str, exchanges: list[str]) -> None:
    """Delete exchanges a test declared for itself."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        for name in exchanges:
            await channel.exchange_delete(name)


@pytest.fixture
async def postgres(database_url: str, unique: str) -> AsyncIterator[Database]:
    """A schema of its own on the real PostgreSQL, dropped after the test."""
    from tests.integration.tables import metadata

    db = Database(database_url, schema=unique, metadata=[metadata])
    await db.create_all()
    yield db
    await db.drop_schema()
    await db.close()


ServiceStarter = Callable[..., Awaitable[Service]]


@pytest.fixture
async def run_service(
    rabbit: RabbitAdmin, database_url: str, unique: str
) -> AsyncIterator[ServiceStarter]:
    """Start services in-process on the real broker and PostgreSQL, each isolated.

    ``await run_service(inventory_svc.app, settings={...}, **build_kwargs)`` builds the
    service from its ``app`` module with its own queue (``<unique>-<name>``), schema
    (``<unique>_<name>``) and a free port, starts it, and returns it. Starting the same
    module again in one test reuses the queue and schema (a restart). Everything is
    stopped, and the queues and schemas are deleted, after the test.
    """
    started: list[Service] = []

    async def start(
        module: ModuleType, *, settings: dict[str, Any] | None = None, **build_kwargs: Any
    ) -> Service:
        name = module.__name__.split(".")[0].removesuffix("_svc")
        values: dict[str, Any] = {
            "service": name,
            "broker_url": rabbit.url,
            "database_url": database_url,
            "queue": f"{unique}-{name}",
            "db_schema": f"{unique}_{name}",
            "port": free_port(),
            "retry_delays_ms": RETRY_DELAYS_MS,
            "heartbeat_seconds": 60,
            "drain_seconds": 5,
        }
        values.update(settings or {})
        service: Service = module.build(module.Settings(**values), **build_kwargs)
        await service.start()
        started.append(service)
        return service

    yield start
    for service in reversed(started):
        await service.stop()
    schemas = {(s.db.url, s.settings.schema_name) for s in started}
    for url, schema in schemas:
        db = Database(url, schema=schema)
        await db.drop_schema()
        await db.close()
    await delete_queues(rabbit.url, sorted({s.settings.queue or s.name for s in started}))
    exchanges = {s.settings.exchange for s in started} - {EXCHANGE}
    await delete_exchanges(rabbit.url, [name for e in exchanges for name in (e, f"{e}.dlx")])
