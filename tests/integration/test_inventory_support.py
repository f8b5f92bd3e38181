"""Set-up shared by the inventory integration tests (this module holds no tests itself).

:class:`Inventory` runs the service on the real broker and PostgreSQL, calls its HTTP API
with minted tokens, sends it commands, and taps the events it publishes.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

import inventory_svc.app
from bus.amqp import AmqpBroker
from bus.broker import Delivery
from bus.envelope import Envelope, Message, MessageRegistry
from bus.service import Service
from inventory_svc.messages import COMMANDS, EVENTS
from tests.integration.conftest import ServiceStarter
from tests.support import Tokens, eventually

EVERYTHING_INVENTORY_SAYS = MessageRegistry([*COMMANDS, *EVENTS])


class Inventory:
    """One inventory service under test, its HTTP client and the events it published."""

    def __init__(
        self,
        run_service: ServiceStarter,
        amqp: AmqpBroker,
        unique: str,
        http: aiohttp.ClientSession,
        settings: dict[str, Any],
    ) -> None:
        self._run_service = run_service
        self.amqp = amqp
        self.unique = unique
        self.http = http
        # A name of its own: other engineers' inventory instances on this broker answer
        # our commands too, and the envelope's source tells their answers from ours.
        self.settings = {"service": f"inventory-{unique}", **settings}
        self.source = f"/microshop/{self.settings['service']}"
        self.tokens = Tokens()
        self.published: list[Envelope] = []
        self._ids = itertools.count(1)
        self.service: Service | None = None

    @classmethod
    @contextlib.asynccontextmanager
    async def running(
        cls, run_service: ServiceStarter, amqp: AmqpBroker, unique: str, **settings: Any
    ) -> AsyncIterator[Inventory]:
        """Tap the events, then start the service; the amqp fixture deletes the tap after."""
        async with aiohttp.ClientSession() as http:
            shop = cls(run_service, amqp, unique, http, settings)
            # bound before the service starts, so not even start-up events are missed
            await amqp.consume(
                unique, ["stock.*", "product.*"], shop._record, EVERYTHING_INVENTORY_SAYS
            )
            await shop.start()
            yield shop

    async def start(self) -> None:
        """Start (or start again) the service on the same queue and schema."""
        self.service = await self._run_service(
            inventory_svc.app, settings=self.settings, verifier=self.tokens.verifier
        )

    async def restart(self) -> None:
        """Stop the service as SIGTERM would, then start a new instance."""
        assert self.service is not None
        await self.service.stop()
        await self.start()

    async def _record(self, delivery: Delivery) -> None:
        if delivery.envelope.source == self.source:
            self.published.append(delivery.envelope)

    # --- HTTP -------------------------------------------------------------------------------

    def token(self, role: str) -> str:
        """A bearer token for a user with ``role``."""
        return self.tokens.mint(f"{role}-user", role)

    async def call(
        self, method: str, path: str, *, role: str | None = "admin", json: Any = None
    ) -> tuple[int, Any]:
        """``(status, parsed JSON body)`` of one request, as ``role`` (``None``: no token)."""
        assert self.service is not None
        headers = {"Authorization": f"Bearer {self.token(role)}"} if role else {}
        url = f"{self.service.settings.public_url}{path}"
        async with self.http.request(method, url, json=json, headers=headers) as response:
            return response.status, await response.json(content_type=None)

    def new_id(self, name: str = "item") -> str:
        """A product or order id no other test uses."""
        return f"{self.unique}-{name}-{next(self._ids)}"

    async def add_product(self, *, stock: int, price: str = "10.00") -> str:
        """Create a product with a fresh id; return the id."""
        product_id = self.new_id("product")
        body = {"id": product_id, "name": f"Product {product_id}", "price": price, "stock": stock}
        status, answer = await self.call("POST", "/products", json=body)
        assert status == 201, answer
        return product_id

    async def counters(self, product_id: str) -> dict[str, int]:
        """The product's row in ``GET /inventory``: stock, reserved, available, sold."""
        status, page = await self.call("GET", "/inventory?limit=200")
        assert status == 200, page
        (row,) = [item for item in page["items"] if item["id"] == product_id]
        return {name: row[name] for name in ("stock", "reserved", "available", "sold")}

    # --- messages ---------------------------------------------------------------------------

    async def send(self, command: Message) -> Envelope:
        """Publish ``command`` as a new message; return its envelope (to send it again)."""
        envelope = Envelope.wrap(command, source="/tests")
        await self.amqp.publish(envelope)
        return envelope

    def events(self, message_type: str, **data: Any) -> list[dict[str, Any]]:
        """The ``data`` of every ``message_type`` event published so far that matches ``data``."""
        return [
            envelope.data
            for envelope in self.published
            if envelope.type == message_type
            and all(envelope.data.get(key) == value for key, value in data.items())
        ]

    async def event(self, message_type: str, **data: Any) -> dict[str, Any]:
        """Wait for the first ``message_type`` event matching ``data``; return its data."""
        await eventually(lambda: bool(self.events(message_type, **data)))
        return self.events(message_type, **data)[0]

    def answers(self, order_id: str) -> list[str]:
        """The types of every event published about ``order_id``, in order."""
        return [e.type for e in self.published if e.data.get("order_id") == order_id]
