"""A service's life on the in-process broker and SQLite: start, ready, handle, drain."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import ClassVar

import aiohttp
from sqlalchemy import insert

from bus.broker import Delivery
from bus.db import Database
from bus.envelope import Envelope, Event, MessageRegistry
from bus.memory import MemoryBroker
from bus.messages import BUS_MESSAGES
from bus.service import YOUNG_COLLECTION_EVERY, Service, quiet_collector
from bus.settings import Settings
from bus.transactions import UnitOfWork
from tests.integration.tables import effects, metadata
from tests.support import eventually, free_port


class ThingAsked(Event):
    type: ClassVar[str] = "thing.asked"
    name: str


class ThingDone(Event):
    type: ClassVar[str] = "thing.done"
    name: str


async def do_thing(delivery: Delivery, unit: UnitOfWork) -> None:
    name = delivery.message.name  # type: ignore[attr-defined]
    await unit.session.execute(insert(effects).values(name=name))
    unit.publish(ThingDone(name=name))


def build(tmp_path: Path, broker: MemoryBroker) -> Service:
    settings = Settings(service="things", port=free_port(), heartbeat_seconds=0.05)
    db = Database(f"sqlite+aiosqlite:///{tmp_path}/things.db", metadata=[metadata])
    return Service(
        settings,
        db=db,
        broker=broker,
        handlers={ThingAsked.type: do_thing},
        registry=MessageRegistry([ThingAsked, ThingDone]),
    )


async def test_service_handles_a_message_and_publishes_through_the_outbox(tmp_path: Path) -> None:
    broker = MemoryBroker()
    service = build(tmp_path, broker)
    done: list[Envelope] = []

    async def record(delivery: Delivery) -> None:
        done.append(delivery.envelope)

    await service.start()
    try:
        await broker.consume("watcher", [ThingDone.type], record, MessageRegistry([ThingDone]))
        asked = Envelope.wrap(ThingAsked(name="x"), source="/tests")
        await broker.publish(asked)
        await eventually(lambda: len(done) == 1)
    finally:
        await service.stop()

    assert done[0].causationid == asked.id
    assert done[0].correlationid == asked.correlationid


async def test_ready_only_between_start_and_stop(tmp_path: Path) -> None:
    service = build(tmp_path, MemoryBroker())
    url = f"{service.settings.public_url}/health/ready"
    await service.start()
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as response:
            assert response.status == 200
        service.health.mark_not_ready()  # what stop() does first, while it drains
        async with http.get(url) as response:
            assert response.status == 503
            assert (await response.json())["marked_ready"] is False
    await service.stop()


async def test_instances_announce_themselves_and_say_goodbye(tmp_path: Path) -> None:
    broker = MemoryBroker()
    seen: list[str] = []

    async def record(delivery: Delivery) -> None:
        seen.append(delivery.envelope.type)

    await broker.connect()
    await broker.consume("gateway", ["service.*"], record, BUS_MESSAGES)
    service = build(tmp_path, broker)
    await service.start()
    await eventually(lambda: seen.count("service.heartbeat") >= 2)  # at start, then repeated
    await service.stop()

    assert seen[-1] == "service.stopped"


async def test_unknown_handled_type_is_rejected_not_retried(tmp_path: Path) -> None:
    broker = MemoryBroker()
    service = build(tmp_path, broker)
    await service.start()
    try:
        # bound and registered, but this service has no handler for it
        service.registry.register(ThingDone)
        await broker.declare("things", [ThingDone.type])
        await broker.publish(Envelope.wrap(ThingDone(name="y"), source="/tests"))

        async def dead() -> bool:
            return len(await broker.dead_letters("things")) == 1

        await eventually(dead)
        (letter,) = await broker.dead_letters("things")
        assert letter.cause == "rejected"
        assert "no handler for thing.done" in letter.reason
    finally:
        await service.stop()


class _Node:
    next: _Node | None = None


def test_a_started_process_hides_what_it_holds_from_the_collector() -> None:
    before = gc.get_threshold()
    held = ["built at start"]
    assert any(tracked is held for tracked in gc.get_objects())
    garbage = _Node()
    garbage.next = garbage  # a cycle only the collector frees
    left_over = weakref.ref(garbage)
    del garbage
    try:
        quiet_collector()
        assert left_over() is None  # collected, not frozen for good
        assert not any(tracked is held for tracked in gc.get_objects())  # frozen
        assert gc.get_threshold() == (YOUNG_COLLECTION_EVERY, *before[1:])
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
