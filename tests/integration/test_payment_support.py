"""What the payment service's integration tests share: callers with tokens, an event log.

No tests live here; the name only follows the files this service owns (test_payment_*).
"""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

from bus.amqp import AmqpBroker
from bus.broker import Delivery
from bus.envelope import Envelope, MessageRegistry
from bus.service import Service
from payment_svc.messages import EVENTS
from payment_svc.providers import ProviderAnswer
from tests.integration.service_http import ServiceHttp
from tests.support import eventually


class PaymentHttp(ServiceHttp):
    """The payment service over HTTP, as another process sees it."""

    def __init__(self, service: Service) -> None:
        super().__init__(service.settings.public_url)

    async def pay(self, token: str, **fields: Any) -> dict[str, Any]:
        """Process a stripe ``tok_visa`` payment of 100.00 unless ``fields`` say otherwise."""
        body = {"amount": "100.00", "provider": "stripe", "payment_method": "tok_visa"} | fields
        answer = await self.call("POST", "/payments/process", token=token, json=body)
        assert answer.status == 201, answer.body
        return dict(answer.body)

    async def attempts(self, provider: str) -> int:
        """How many times this instance has called ``provider`` (its health window)."""
        answer = await self.call("GET", "/providers")
        (listed,) = [item for item in answer.body["items"] if item["name"] == provider]
        return int(listed["health"]["attempts"])


class LateFirstAnswers:
    """A provider that approves, and moves money once per reference, as a real one keeps
    its idempotency keys; the first answer to each operation in ``late`` comes after
    ``delay`` seconds, past the gateway's timeout: the money moved, the answer was lost."""

    def __init__(self, late: set[str], delay: float = 1.0) -> None:
        self.late, self.delay = late, delay
        self.calls: list[tuple[str, str]] = []  # (operation, reference), every call
        self.moved: dict[str, Decimal] = {}  # reference: the amount that moved for it

    def accepts(self, method: str) -> bool:
        return method == "tok_visa"

    async def charge(
        self, *, reference: str, amount: Decimal, currency: str, method: str
    ) -> ProviderAnswer:
        return await self._once("charge", reference, amount)

    async def refund(self, *, reference: str, amount: Decimal, currency: str) -> ProviderAnswer:
        return await self._once("refund", reference, amount)

    def references(self, operation: str) -> list[str]:
        """The reference of every call of ``operation``, in order."""
        return [reference for done, reference in self.calls if done == operation]

    async def _once(self, operation: str, reference: str, amount: Decimal) -> ProviderAnswer:
        first = operation not in (done for done, _ in self.calls)
        self.calls.append((operation, reference))
        self.moved.setdefault(reference, amount)
        if first and operation in self.late:
            await asyncio.sleep(self.delay)
        return ProviderAnswer(approved=True)


class EventLog:
    """The payment events seen on the real broker by a watch queue of the test's own."""

    def __init__(self) -> None:
        self.envelopes: list[Envelope] = []

    @classmethod
    async def watch(cls, amqp: AmqpBroker, queue: str) -> EventLog:
        """Bind ``queue`` to the payment events; call it before causing them."""
        log = cls()

        async def record(delivery: Delivery) -> None:
            log.envelopes.append(delivery.envelope)

        # the events only: binding payment.* would also take the commands meant for the service
        types = [event.type for event in EVENTS]
        await amqp.consume(queue, types, record, MessageRegistry(EVENTS))
        return log

    def about(self, event_type: str, **data: Any) -> list[Envelope]:
        """The ``event_type`` events whose data has ``data`` (other tests share the broker)."""
        return [
            envelope
            for envelope in self.envelopes
            if envelope.type == event_type
            and all(envelope.data.get(name) == value for name, value in data.items())
        ]

    async def wait_for(self, event_type: str, count: int = 1, **data: Any) -> list[Envelope]:
        """Wait, with a deadline, until ``count`` such events arrived; return them all."""
        await eventually(lambda: len(self.about(event_type, **data)) >= count)
        return self.about(event_type, **data)
