"""Admission control: while the saga is too far behind, new orders wait at the door.

An accepted order is work owed: a reservation, a charge, a commit. Taking orders faster
than the saga finishes them only moves the queue inside the system, where it turns into
step timeouts, resent commands and compensations: more work, fewer orders confirmed.
So the service keeps count of the orders its saga still waits on and, above a ceiling,
answers ``503`` with ``Retry-After`` instead of accepting another.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import structlog
from prometheus_client import Counter, Gauge

from bus.db import Database
from order_svc import store

log = structlog.get_logger(__name__)

IN_FLIGHT = Gauge("microshop_orders_in_flight", "Orders whose saga waits on a reply")
TURNED_AWAY = Counter(
    "microshop_orders_turned_away_total", "Orders refused because too many were in flight"
)


@dataclass
class Admission:
    """The ceiling on orders in flight, and the count it is held to.

    The count is read from the database every second or so (it covers every instance)
    and, in between, grows by the orders this instance accepted since.
    """

    limit: int
    counted: int = 0
    admitted_since: int = 0

    @property
    def in_flight(self) -> int:
        """Orders in flight, as far as this instance knows."""
        return self.counted + self.admitted_since

    def has_room(self) -> bool:
        """Whether one more order may come in (a ``limit`` of 0: no ceiling).

        The ceiling is soft: requests that find room at the same moment all come in.
        """
        if self.limit and self.in_flight >= self.limit:
            TURNED_AWAY.inc()
            return False
        return True

    def took_one(self) -> None:
        """An order was placed: it counts as in flight until the next recount."""
        self.admitted_since += 1

    def recount(self, in_flight: int) -> None:
        """The database's count replaces the estimate."""
        self.counted, self.admitted_since = in_flight, 0
        IN_FLIGHT.set(in_flight)


async def keep_counting(admission: Admission, db: Database, interval: float) -> None:
    """Recount the orders in flight every ``interval`` seconds, for as long as it runs."""
    while True:
        try:
            async with db.reading() as session:
                admission.recount(await store.orders_in_flight(session))
        except Exception:
            log.exception("counting orders in flight failed")
        await asyncio.sleep(interval)
