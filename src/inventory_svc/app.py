"""The inventory service's composition root: ``build(settings)`` returns a ready-to-start Service.

Nothing connects here; the demo catalogue loads on start-up, after the tables exist, and
the expiry sweep runs as a background task.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import structlog
from aiohttp import web
from pydantic import Field

import bus.settings
from bus.db import Database
from bus.envelope import MessageRegistry
from bus.service import Service, token_verifier
from bus.transactions import Transactions
from bus.web import TRANSACTIONS
from inventory_svc import store
from inventory_svc.api import RESERVATION_TTL, api
from inventory_svc.handlers import HANDLERS, expire_reservations
from inventory_svc.messages import COMMANDS, ProductCreated

log = structlog.get_logger(__name__)

DEMO_CATALOGUE = (
    ("laptop", "Laptop", Decimal("1299.99"), 5),
    ("phone", "Phone", Decimal("699.99"), 10),
    ("monitor", "Monitor", Decimal("399.99"), 8),
    ("keyboard", "Keyboard", Decimal("129.99"), 15),
    ("mouse", "Mouse", Decimal("79.99"), 20),
)


class Settings(bus.settings.Settings):
    """The inventory's knobs, on top of every service's (``MICROSHOP_`` env vars)."""

    service: str = "inventory"
    demo_data: bool = False  # MICROSHOP_DEMO_DATA=1 loads DEMO_CATALOGUE into an empty table
    reservation_ttl: float = Field(default=900.0, gt=0)  # seconds an uncommitted hold lasts
    reservation_sweep_seconds: float = Field(default=5.0, gt=0)


def build(settings: Settings, **test_overrides: Any) -> Service:
    """The inventory service; tests may override ``verifier`` and ``broker``."""
    db = Database.from_settings(settings, metadata=[store.metadata])
    service: Service

    # Service builds its Transactions itself and hands tasks nothing, so the sweep finds
    # them through the service it is about to belong to.
    async def sweep_expired_reservations() -> None:
        await _sweep_forever(service.transactions, settings)

    service = Service(
        settings,
        db=db,
        broker=test_overrides.get("broker"),
        handlers=HANDLERS,
        registry=MessageRegistry(COMMANDS),
        api=api,
        verifier=test_overrides.get("verifier") or token_verifier(settings),
        tasks=[sweep_expired_reservations],
    )
    service.app[RESERVATION_TTL] = settings.reservation_ttl
    if settings.demo_data:
        # on_startup runs after Service.start() has created the tables
        service.app.on_startup.append(_load_demo_catalogue)
    return service


async def _sweep_forever(transactions: Transactions, settings: Settings) -> None:
    # never sweep less often than a reservation lasts, or tiny TTLs would be overrun
    interval = min(settings.reservation_sweep_seconds, settings.reservation_ttl)
    while True:
        await asyncio.sleep(interval)
        try:
            if expired := await expire_reservations(transactions, settings.reservation_ttl):
                log.info("reservations expired", count=expired)
        except Exception:  # a database blip must not end the sweeping for good
            log.exception("reservation sweep failed; trying again next round")


async def _load_demo_catalogue(app: web.Application) -> None:
    async with app[TRANSACTIONS].begin() as unit:
        if await store.has_products(unit.session):
            return
        now, loaded = store.utc_now(), 0
        for product_id, name, price, stock in DEMO_CATALOGUE:
            # another instance may be seeding too: whoever inserts a row announces it
            if await store.add_product(unit.session, product_id, name, price, stock, now):
                unit.publish(
                    ProductCreated(product_id=product_id, name=name, price=price, stock=stock)
                )
                loaded += 1
    log.info("demo catalogue loaded", products=loaded)
