"""Helpers for tests: waiting with a deadline, and RabbitMQ's topic routing table."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable

from microshop.local import free_port

__all__ = ["ROUTING_TABLE", "eventually", "free_port"]

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
