"""Admission control: while the saga is too far behind, new orders wait at the door.

An accepted order is work owed: a reservation, a charge, a commit. Taking orders faster
than the saga finishes them only moves the queue inside the system, where it turns into
step timeouts, resent commands and compensations: more work, fewer orders confirmed.
So the service keeps count of the orders its saga still waits on and, above a ceiling,
answers ``503`` with ``Retry-After`` instead of accepting another.

The ceiling rises with the saga's pace, to the orders it finishes in ``seconds_in_hand``.
Turned away, polite clients all come back a whole second later (``Retry-After`` has no
finer unit): a fixed ceiling of fewer orders than a fast saga finishes in that second and
what its stages hold leaves them idle each time, which on a two-core machine cost a
fifth of the saga's throughput. The configured ceiling stays the floor, and four times it
the top: a mass cancel or a drained backlog reads as a burst of pace.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import structlog
from prometheus_client import Counter, Gauge

from bus.db import Database
from order_svc import store

log = structlog.get_logger(__name__)

IN_FLIGHT = Gauge("microshop_orders_in_flight", "Orders whose saga waits on a reply")
CEILING = Gauge("microshop_orders_in_flight_ceiling", "Orders in flight past which new ones wait")
TURNED_AWAY = Counter(
    "microshop_orders_turned_away_total", "Orders refused because too many were in flight"
)


MAX_RISE = 4  # the ceiling rises to at most this many times the configured one
# Orders in hand rise to this share of a saga step's timeout times the saga's pace: 4 s
# with the default 10 s. That keeps every stage busy while turned-away clients wait their
# second (2 s in hand confirmed 81-90 orders/s where 4 s did 90-99, in interleaved runs);
# past capacity an order then takes about 4 s from placed to done, inside its steps'
# timeouts.
IN_HAND_OF_STEP_TIMEOUT = 0.4


@dataclass
class Admission:
    """The ceiling on orders in flight, and the count it is held to.

    The count is read from the database every second or so (it covers every instance)
    and, in between, grows by the orders this instance accepted since. The orders that
    left between two counts give the saga's pace; with other instances taking orders
    too it reads low, and the ceiling stays nearer ``limit``.
    """

    limit: int  # the ceiling at the least (0: none)
    seconds_in_hand: float = 0.0  # the ceiling rises to this much of the saga's pace
    counted: int = 0
    admitted_since: int = 0
    pace: float = 0.0  # orders finished a second, smoothed

    @property
    def in_flight(self) -> int:
        """Orders in flight, as far as this instance knows."""
        return self.counted + self.admitted_since

    @property
    def ceiling(self) -> int:
        """Orders in flight past which new ones are turned away: ``limit`` at the least,
        and at most ``MAX_RISE`` times it, whatever a burst of finished orders suggests."""
        in_hand = self.pace * self.seconds_in_hand
        return int(min(self.limit * MAX_RISE, max(self.limit, in_hand)))

    def has_room(self) -> bool:
        """Whether one more order may come in (a ``limit`` of 0: no ceiling).

        The ceiling is soft: requests that find room at the same moment all come in.
        """
        if self.limit and self.in_flight >= self.ceiling:
            TURNED_AWAY.inc()
            return False
        return True

    def took_one(self) -> None:
        """An order was placed: it counts as in flight until the next recount."""
        self.admitted_since += 1

    def recount(self, in_flight: int, elapsed: float) -> None:
        """The database's count, ``elapsed`` seconds after the last, replaces the estimate."""
        finished = max(0, self.in_flight - in_flight)
        if elapsed > 0:
            self.pace += 0.3 * (finished / elapsed - self.pace)
        self.counted, self.admitted_since = in_flight, 0
        IN_FLIGHT.set(in_flight)
        if self.limit:
            CEILING.set(self.ceiling)


async def keep_counting(admission: Admission, db: Database, interval: float) -> None:
    """Recount the orders in flight every ``interval`` seconds, for as long as it runs."""
    last = time.monotonic()
    while True:
        try:
            async with db.reading() as session:
                in_flight = await store.orders_in_flight(session)
            now = time.monotonic()
            admission.recount(in_flight, now - last)
            last = now
        except Exception:
            log.exception("counting orders in flight failed")
        await asyncio.sleep(interval)
