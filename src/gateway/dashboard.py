"""What the dashboard shows of the bus: message rates, and orders' sagas as they happen.

The gateway watches every event type on a private queue (never commands: a queue bound to
a command would hide, from its publisher, that its owner's queue is missing).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from aiohttp import web
from pydantic_core import to_json

from gateway.pages import Page

STEPS = {
    "order.created": "placed",
    "stock.reserved": "stock reserved",
    "stock.rejected": "out of stock",
    "payment.succeeded": "paid",
    "payment.failed": "payment declined",
    "stock.committed": "stock committed",
    "order.confirmed": "confirmed",
    "order.cancelled": "cancelled",
    "stock.released": "stock released",
    "stock.expired": "stock reservation expired",
    "payment.refunded": "refunded",
    "payment.refund_failed": "refund failed",
}
_STATUS_OF = {
    "order.created": "pending",
    "order.confirmed": "confirmed",
    "order.cancelled": "cancelled",
}


@dataclass(slots=True)
class OrderTrack:
    """One order as the bus has told of it."""

    order_id: str
    status: str = "pending"
    updated_at: str = ""
    steps: list[dict[str, str]] = field(default_factory=list)


class Activity:
    """Counts messages by type and follows the latest orders; tells waiters of changes."""

    def __init__(
        self,
        *,
        max_orders: int = 20,
        window: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Rates over the last ``window`` seconds; the ``max_orders`` latest orders."""
        self.window = window
        self._clock = clock
        self._max_orders = max_orders
        self._recent: deque[tuple[float, str]] = deque(maxlen=100_000)
        self._totals: Counter[str] = Counter()
        self._orders: OrderedDict[str, OrderTrack] = OrderedDict()
        self._changed = asyncio.Event()

    def record(self, message_type: str, data: Mapping[str, Any], at: datetime) -> None:
        """Count one message; if it is about an order, add it to that order's steps."""
        self._recent.append((self._clock(), message_type))
        self._totals[message_type] += 1
        order_id = data.get("order_id")
        if isinstance(order_id, str):
            self._follow(order_id, message_type, data, at)
        # wake every waiter at once; later waiters wait for the next change
        self._changed.set()
        self._changed = asyncio.Event()

    def _follow(
        self, order_id: str, message_type: str, data: Mapping[str, Any], at: datetime
    ) -> None:
        track = self._orders.pop(order_id, None) or OrderTrack(order_id)
        self._orders[order_id] = track  # latest at the end
        while len(self._orders) > self._max_orders:
            self._orders.popitem(last=False)
        if message_type == "order.status_changed":
            track.status = str(data.get("new_status", track.status))
            label = f"→ {track.status}"
        else:
            track.status = _STATUS_OF.get(message_type, track.status)
            label = STEPS.get(message_type, message_type)
        track.updated_at = at.isoformat()
        if len(track.steps) < 50:
            track.steps.append({"type": message_type, "label": label, "at": track.updated_at})

    def rates(self) -> list[dict[str, Any]]:
        """Messages a second over the window, and in all, by type."""
        since = self._clock() - self.window
        while self._recent and self._recent[0][0] < since:
            self._recent.popleft()
        recent = Counter(message_type for _, message_type in self._recent)
        return [
            {"type": kind, "per_second": round(recent[kind] / self.window, 2), "total": total}
            for kind, total in sorted(self._totals.items())
        ]

    def orders(self) -> list[dict[str, Any]]:
        """The latest orders, newest first."""
        return [
            {
                "order_id": t.order_id,
                "status": t.status,
                "updated_at": t.updated_at,
                "steps": t.steps,
            }
            for t in reversed(self._orders.values())
        ]

    async def wait_for_change(self, seconds: float) -> None:
        """Return after the next recorded message, or after ``seconds``."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._changed.wait()


class Dashboard:
    """``/dashboard``: the page, its state as JSON, and the state as server-sent events."""

    def __init__(
        self,
        activity: Activity,
        state: Callable[[], dict[str, Any]],
        *,
        stream_seconds: float = 300.0,
    ) -> None:
        """``state()`` gives everything but the activity (services, instances, gateway).

        An event stream ends after ``stream_seconds``: the page connects again, and its
        token is checked again, so a token that expired or a staff role taken away stops
        the flow of everyone's orders within that time.
        """
        self.activity = activity
        self._state = state
        self.stream_seconds = stream_seconds
        self._page = Page.load("dashboard.html")
        self.closing = asyncio.Event()

    def add_to(self, app: web.Application) -> None:
        """Add the dashboard's routes to ``app``."""
        app.router.add_get("/dashboard", self.page)
        app.router.add_get("/dashboard/state", self.state)
        app.router.add_get("/dashboard/events", self.events)

    def snapshot(self) -> dict[str, Any]:
        """Everything the page shows."""
        return {**self._state(), "rates": self.activity.rates(), "orders": self.activity.orders()}

    async def page(self, _: web.Request) -> web.Response:
        """The dashboard page."""
        return self._page.response()

    async def state(self, _: web.Request) -> web.Response:
        """The dashboard's state as JSON, for pollers."""
        return web.Response(body=to_json(self.snapshot()), content_type="application/json")

    async def events(self, request: web.Request) -> web.StreamResponse:
        """The state as server-sent events: now, on every change, and every second, for
        ``stream_seconds``."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        loop = asyncio.get_running_loop()
        ends_at = loop.time() + self.stream_seconds
        try:
            while not self.closing.is_set() and loop.time() < ends_at:
                await response.write(b"event: state\ndata: " + to_json(self.snapshot()) + b"\n\n")
                await self.activity.wait_for_change(1.0)
                await asyncio.sleep(0.1)  # a burst of messages becomes one update
        except ConnectionError:
            pass  # the page was closed
        return response
