"""Helpers for tests: waiting with a deadline, tokens to refuse, and RabbitMQ's topic routing
table."""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Literal

from bus.auth import SigningKey, TokenVerifier
from bus.messages import ServiceHeartbeat
from microshop.local import free_port

__all__ = [
    "AUDIENCE",
    "ISSUER",
    "ROUTING_TABLE",
    "Tokens",
    "eventually",
    "free_port",
    "refused_tokens",
]

Condition = Callable[[], bool | Awaitable[bool]]


async def eventually(condition: Condition, *, within: float = 10.0, every: float = 0.02) -> None:
    """Wait until ``condition()`` holds, failing the test after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within}s: {condition}")
        await asyncio.sleep(every)


# what the user service writes into every token it mints
ISSUER, AUDIENCE = "microshop-user", "microshop"


class Tokens:
    """Mints tokens as the user service would, and the verifier that trusts them."""

    def __init__(self, key: SigningKey | None = None) -> None:
        self.key = key or SigningKey.generate()
        self.verifier = TokenVerifier.from_jwks(self.key.jwks(), issuer=ISSUER, audience=AUDIENCE)

    def mint(self, user_id: str, role: str = "user") -> str:
        """A bearer token for ``user_id`` with ``role``."""
        return self.key.mint(subject=user_id, role=role, issuer=ISSUER, audience=AUDIENCE)


def _b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _claims(token: str) -> dict[str, object]:
    payload = token.split(".")[1]
    decoded: dict[str, object] = json.loads(base64.urlsafe_b64decode(payload + "=="))
    return decoded


def refused_tokens(key: SigningKey) -> dict[str, str | None]:
    """Tokens a verifier trusting ``key`` must refuse, by why."""
    good = key.mint(subject="u-1", role="user", issuer=ISSUER, audience=AUDIENCE)
    header, _, signature = good.split(".")
    promoted = {**_claims(good), "role": "admin"}
    return {
        "missing": None,
        "expired": key.mint(
            subject="u-1",
            role="user",
            issuer=ISSUER,
            audience=AUDIENCE,
            ttl=60,
            now=int(time.time()) - 3600,
        ),
        "tampered": f"{header}.{_b64(promoted)}.{signature}",
        "alg none": f"{_b64({'alg': 'none', 'typ': 'JWT', 'kid': key.kid})}.{_b64(promoted)}.",
        "another key": SigningKey.generate().mint(
            subject="u-1", role="admin", issuer=ISSUER, audience=AUDIENCE
        ),
        "wrong audience": key.mint(subject="u-1", role="user", issuer=ISSUER, audience="other"),
        "garbage": "not-a-token",
    }


# (binding pattern, routing key, does RabbitMQ's topic exchange route it?)
# Checked against RabbitMQ itself by tests/integration/test_broker_contract.py.
ROUTING_TABLE: list[tuple[str, str, bool]] = [
    ("order.created", "order.created", True),
    ("order.created", "order.confirmed", False),
    ("order.*", "order.created", True),
    ("order.*", "order", False),
    ("order.*", "order.status.changed", False),
    ("order.#", "order", True),
    ("order.#", "order.created", True),
    ("order.#", "order.status.changed", True),
    ("order.#", "orders.created", False),
    ("*.created", "order.created", True),
    ("*.created", "created", False),
    ("*.created", "user.deep.created", False),
    ("#.created", "created", True),
    ("#.created", "user.deep.created", True),
    ("#.created", "user.created.not", False),
    ("#", "anything.at.all", True),
    ("#", "x", True),
    ("*", "x", True),
    ("*", "x.y", False),
    ("*.*", "x.y", True),
    ("*.*", "x", False),
    ("a.#.b", "a.b", True),
    ("a.#.b", "a.x.y.b", True),
    ("a.#.b", "a.x.y.c", False),
    ("a.*.#", "a", False),
    ("a.*.#", "a.x", True),
    ("a.*.#", "a.x.y", True),
    ("#.#", "a.b", True),
    ("a.#.#.b", "a.b", True),
    ("#.*", "x", True),
    ("#.*.#", "a.b.c", True),
    ("a..b", "a..b", True),
    ("a.*.b", "a..b", True),
    ("a.#", "a..", True),
    ("a", "A", False),
]


def heartbeat(
    url: str,
    instance_id: str = "i-1",
    status: Literal["ready", "draining"] = "ready",
    *,
    service: str = "inventory",
) -> ServiceHeartbeat:
    """A service instance's heartbeat, as the gateway hears it."""
    return ServiceHeartbeat(
        instance_id=instance_id,
        service=service,
        url=url,
        version="1",
        status=status,
        started_at=datetime.now(UTC),
        interval_seconds=5,
    )
