"""What the user service's integration tests share: an HTTP client and an event log.

No tests live here; the name only follows the files this service owns (test_user_*).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aiohttp
from multidict import CIMultiDictProxy

from bus.amqp import AmqpBroker
from bus.broker import Delivery
from bus.envelope import Envelope, MessageRegistry
from tests.support import eventually
from user_svc.messages import USER_EVENTS

ISSUER = "microshop-user"
AUDIENCE = "microshop"
ADMIN_EMAIL = "Root@Example.COM"
ADMIN_PASSWORD = "admin-password-1"
ADMIN_SETTINGS = {"admin_email": ADMIN_EMAIL, "admin_password": ADMIN_PASSWORD}


@dataclass(frozen=True)
class Answer:
    """An HTTP answer: status, parsed JSON body (None when empty), headers."""

    status: int
    body: Any
    headers: CIMultiDictProxy[str]


class UserHttp:
    """The user service over HTTP, as another process sees it."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self._http = aiohttp.ClientSession()

    async def __aenter__(self) -> UserHttp:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._http.close()

    async def call(
        self, method: str, path: str, *, token: str | None = None, json: Any = None
    ) -> Answer:
        """Send one request; the body is sent as JSON when given."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self._http.request(
            method, f"{self.base_url}{path}", json=json, headers=headers
        ) as response:
            text = await response.text()
            body = await response.json(content_type=None) if text else None
            return Answer(response.status, body, response.headers)

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
