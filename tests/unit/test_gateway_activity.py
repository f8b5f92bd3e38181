"""What the dashboard shows of the bus: message rates and each order's saga."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.dashboard import Activity, Dashboard

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def test_an_orders_saga_becomes_its_steps_and_status() -> None:
    activity = Activity()
    for kind, data in [
        ("order.created", {"order_id": "o-1"}),
        ("stock.reserved", {"order_id": "o-1"}),
        ("order.status_changed", {"order_id": "o-1", "new_status": "payment_processing"}),
        ("payment.succeeded", {"order_id": "o-1"}),
        ("order.confirmed", {"order_id": "o-1"}),
    ]:
        activity.record(kind, data, NOW)
    (order,) = activity.orders()
    assert order["order_id"] == "o-1"
    assert order["status"] == "confirmed"
    labels = [step["label"] for step in order["steps"]]
    assert labels == ["placed", "stock reserved", "→ payment_processing", "paid", "confirmed"]


def test_a_declined_payment_cancels_the_order() -> None:
    activity = Activity()
    activity.record("order.created", {"order_id": "o-1"}, NOW)
    activity.record("payment.failed", {"order_id": "o-1"}, NOW)
    activity.record("order.cancelled", {"order_id": "o-1", "reason": "declined"}, NOW)
    (order,) = activity.orders()
    assert order["status"] == "cancelled"
    assert "payment declined" in [step["label"] for step in order["steps"]]


def test_only_the_latest_orders_are_kept_newest_first() -> None:
    activity = Activity(max_orders=2)
    for order_id in ("o-1", "o-2", "o-3"):
        activity.record("order.created", {"order_id": order_id}, NOW)
    activity.record("stock.reserved", {"order_id": "o-2"}, NOW)
    assert [o["order_id"] for o in activity.orders()] == ["o-2", "o-3"]


def test_rates_count_the_window_and_totals_count_everything() -> None:
    clock = Clock()
    activity = Activity(window=10, clock=clock)
    for _ in range(5):
        activity.record("user.created", {"user_id": "u"}, NOW)
    clock.now += 20
    activity.record("user.created", {"user_id": "u"}, NOW)
    assert activity.rates() == [{"type": "user.created", "per_second": 0.1, "total": 6}]
    assert activity.orders() == []


async def test_waiters_wake_on_the_next_message() -> None:
    activity = Activity()
    waiter = asyncio.create_task(activity.wait_for_change(5))
    await asyncio.sleep(0)
    activity.record("order.created", {"order_id": "o-1"}, NOW)
    await asyncio.wait_for(waiter, 1)


async def test_waiting_gives_up_after_its_seconds() -> None:
    activity = Activity()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(activity.wait_for_change(5), 0.05)
    await activity.wait_for_change(0.01)  # returns quietly


async def test_an_event_stream_ends_so_the_page_shows_its_token_again() -> None:
    dashboard = Dashboard(Activity(), dict, stream_seconds=0.3)
    app = web.Application()
    dashboard.add_to(app)
    async with TestClient(TestServer(app)) as client:
        started = asyncio.get_running_loop().time()
        response = await client.get("/dashboard/events")
        body = await asyncio.wait_for(response.read(), 5)  # the server ends it
        lasted = asyncio.get_running_loop().time() - started
    assert body.startswith(b"event: state\ndata: ")
    assert 0.3 <= lasted < 3
