"""The inventory as ``microshop demo`` runs it: the in-process broker and SQLite."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bus.broker import Delivery
from bus.envelope import Envelope, Message, MessageRegistry
from bus.memory import MemoryBroker
from bus.service import Service
from inventory_svc import app, handlers, store
from inventory_svc.messages import (
    EVENTS,
    LineItem,
    StockCommit,
    StockRelease,
    StockReserve,
)
from tests.support import Tokens, eventually, free_port


def embedded(tmp_path: Path, broker: MemoryBroker, *, reservation_ttl: float) -> Service:
    """The inventory with the demo catalogue, on SQLite in ``tmp_path`` and ``broker``."""
    settings = app.Settings(
        port=free_port(),
        database_url=f"sqlite+aiosqlite:///{tmp_path}/inventory.db",
        demo_data=True,
        reservation_ttl=reservation_ttl,
        heartbeat_seconds=60,
    )
    return app.build(settings, verifier=Tokens().verifier, broker=broker)


async def test_reserve_commit_and_expiry_work_on_sqlite_with_the_demo_catalogue(
    tmp_path: Path,
) -> None:
    broker = MemoryBroker()
    service = embedded(tmp_path, broker, reservation_ttl=0.5)  # kept is committed within it
    settings = service.settings
    heard: list[Envelope] = []

    async def record(delivery: Delivery) -> None:
        heard.append(delivery.envelope)

    def answers(order_id: str) -> list[str]:
        return [e.type for e in heard if e.data.get("order_id") == order_id]

    async def send(command: Message) -> None:
        await broker.publish(Envelope.wrap(command, source="/tests"))

    await broker.connect()
    await broker.consume("watch", ["stock.*", "product.*"], record, MessageRegistry(EVENTS))
    await service.start()
    try:
        two_laptops = [LineItem(product_id="laptop", quantity=2)]
        await send(StockReserve(order_id="kept", items=two_laptops))
        await send(
            StockReserve(order_id="greedy", items=[LineItem(product_id="laptop", quantity=9)])
        )
        await send(StockReserve(order_id="forgotten", items=two_laptops))
        await eventually(lambda: bool(answers("kept") and answers("forgotten")))
        await send(StockCommit(order_id="kept"))
        await eventually(lambda: "stock.expired" in answers("forgotten"))
        await send(StockRelease(order_id="never-seen"))
        await eventually(lambda: bool(answers("never-seen")))

        url = f"{settings.public_url}/products/laptop"
        async with aiohttp.ClientSession() as http, http.get(url) as response:
            laptop = await response.json()
    finally:
        await service.stop()
        await broker.close()

    assert answers("kept") == ["stock.reserved", "stock.committed"]
    assert answers("greedy") == ["stock.rejected"]
    assert answers("forgotten") == ["stock.reserved", "stock.expired"]
    assert answers("never-seen") == ["stock.released"]
    assert (laptop["stock"], laptop["reserved"], laptop["available"]) == (3, 0, 3)
    assert len([e for e in heard if e.type == "product.created"]) == 5


@pytest.mark.parametrize(
    ("failure", "expired_after"),
    [
        (RuntimeError("a row the database will not take"), 1),  # "next", though "stuck" came first
        (ConnectionRefusedError("the database is down"), None),  # the round ends: all would fail
    ],
)
async def test_a_reservation_that_fails_to_expire_keeps_none_behind_it_held(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: Exception, expired_after: int | None
) -> None:
    broker = MemoryBroker()
    service = embedded(tmp_path, broker, reservation_ttl=3600)  # the test sweeps by itself
    await broker.connect()
    await service.start()
    try:
        one_mouse = [LineItem(product_id="mouse", quantity=1)]
        for order_id in ("stuck", "next"):
            reserve = StockReserve(order_id=order_id, items=one_mouse)
            await broker.publish(Envelope.wrap(reserve, source="/tests"))

        async def both_held() -> bool:
            async with service.db.session() as session:
                held = [await store.get_reservation(session, o) for o in ("stuck", "next")]
            return None not in held

        await eventually(both_held)
        release = handlers._release

        async def failing_for_stuck(session: Any, reservation: Any, *args: Any) -> Any:
            if reservation.order_id == "stuck":
                raise failure
            return await release(session, reservation, *args)

        monkeypatch.setattr(handlers, "_release", failing_for_stuck)
        try:
            expired: int | None = await handlers.expire_reservations(service.transactions, ttl=0)
        except ConnectionRefusedError:
            expired = None
    finally:
        await service.stop()
        await broker.close()

    assert expired == expired_after
