"""What the user service's integration tests share: an HTTP client and an event log.

No tests live here; the name only follows the files this service owns (test_user_*).
"""

from __future__ import annotations

from typing import Any

from bus.amqp import AmqpBroker
from bus.broker import Delivery
from bus.envelope import Envelope, MessageRegistry
from tests.integration.service_http import ServiceHttp
from tests.support import eventually
from user_svc.messages import USER_EVENTS

ADMIN_EMAIL = "Root@Example.COM"
ADMIN_PASSWORD = "admin-password-1"
ADMIN_SETTINGS = {"admin_email": ADMIN_EMAIL, "admin_password": ADMIN_PASSWORD}


class UserHttp(ServiceHttp):
    """The user service over HTTP, as another process sees it."""

    async def register(self, name: str, email: str, password: str) -> dict[str, Any]:
        """Register an account and return it; fails the test unless the answer is 201."""
        answer = await self.call(
            "POST", "/users", json={"name": name, "email": email, "password": password}
        )
        assert answer.status == 201, answer.body
        return dict(answer.body)

    async def login(self, email: str, password: str) -> str:
        """Log in and return the bearer token; fails the test unless the answer is 200."""
        answer = await self.call("POST", "/auth/login", json={"email": email, "password": password})
        assert answer.status == 200, answer.body
        return str(answer.body["access_token"])

    async def sign_in(self, email: str, password: str) -> tuple[str, str]:
        """Log in; the bearer token and the account's id (from ``/auth/me``)."""
        token = await self.login(email, password)
        me = await self.call("GET", "/auth/me", token=token)
        assert me.status == 200, me.body
        return token, str(me.body["id"])


class EventLog:
    """The user events seen on the real broker by a watch queue of the test's own."""

    def __init__(self) -> None:
        self.envelopes: list[Envelope] = []

    @classmethod
    async def watch(cls, amqp: AmqpBroker, unique: str) -> EventLog:
        """Bind a queue to ``user.*``; call it before causing the events."""
        log = cls()

        async def record(delivery: Delivery) -> None:
            log.envelopes.append(delivery.envelope)

        await amqp.consume(f"{unique}-watch", ["user.*"], record, MessageRegistry(USER_EVENTS))
        return log

    def about(self, user_id: str, event_type: str | None = None) -> list[Envelope]:
        """The events about ``user_id`` (other tests share the broker), of one type if given."""
        return [
            envelope
            for envelope in self.envelopes
            if envelope.data.get("user_id") == user_id
            and (event_type is None or envelope.type == event_type)
        ]

    async def wait_for(self, event_type: str, user_id: str) -> Envelope:
        """The first ``event_type`` about ``user_id``, waiting for it with a deadline."""
        await eventually(lambda: bool(self.about(user_id, event_type)))
        return self.about(user_id, event_type)[0]
